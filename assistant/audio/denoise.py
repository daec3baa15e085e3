"""Noise reduction of a session's input audio: WebRTC's noise suppressor (`pywebrtc-audio`), at 16 kHz, before the VAD.

A session's `noise_reduction` (OpenAI's `audio.input.noise_reduction: {type}`, beta `input_audio_noise_reduction`)
picks the strength: `near_field` (a headset or a phone held close: little noise, so a moderate 12 dB keeps the voice
intact) or `far_field` (a laptop or room microphone: more noise, 18 dB). The VAD, the wake word and the recogniser
all hear the suppressed audio, as with OpenAI's. The suppressor is stateful (its noise estimate adapts over the first
hundreds of milliseconds) and processes any chunk size (it buffers to its 10 ms frames internally). Measured on noisy
espeak-ng speech by bench/noise_reduction.py (bench/results/noise_reduction-*.json).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pywebrtc_audio import NoiseSuppressor

from assistant.audio import MODEL_RATE_HZ

NoiseReductionType = Literal["near_field", "far_field"]
# WebRTC NS levels: 0 = 6 dB, 1 = 12 dB, 2 = 18 dB, 3 = 21 dB of suppression
NS_LEVELS: dict[str, int] = {"near_field": 1, "far_field": 2}


class Denoiser:
    """int16 16 kHz mono in, the same number of int16 samples out, noise suppressed."""

    def __init__(self, kind: NoiseReductionType) -> None:
        if kind not in NS_LEVELS:
            raise ValueError(f"noise reduction must be one of {', '.join(NS_LEVELS)}, got {kind!r}")
        self.kind = kind
        self._ns = NoiseSuppressor(sample_rate=MODEL_RATE_HZ, num_channels=1, level=NS_LEVELS[kind])

    def process(self, pcm16k: np.ndarray) -> np.ndarray:
        if len(pcm16k) == 0:
            return pcm16k
        return np.asarray(self._ns.process(np.ascontiguousarray(pcm16k, dtype=np.int16)), dtype=np.int16)
