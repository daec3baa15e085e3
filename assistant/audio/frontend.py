"""Qwen-Audio front end: 16 kHz waveform -> 80 x 3000 log-mel of one 30 s window, plus the window/length rules.

Exactly QWEN_AUDIO.md §1: zero-pad (the window is ALWAYS padded to 480000 samples before the STFT, so boundary
frames match the reference), STFT n_fft 400 / hop 160 / periodic Hann / centred reflect padding, drop the last
frame, power, 80 Slaney mel filters, log10 with a 1e-10 floor, clamp at (max over all 3000 frames - 8), (x + 4) / 4.

Long audio is never cut silently: `split_windows` cuts it into consecutive 30 s windows (each becomes its own audio
span in the prompt). A final piece shorter than `MIN_SAMPLES` (30 ms) is zero-padded to `MIN_SAMPLES` rather than
dropped. A whole clip under 30 ms is refused with `AudioTooShort` (the reference crashes on it).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from assistant.audio import MODEL_RATE_HZ

WINDOW_SAMPLES = 30 * MODEL_RATE_HZ  # 480000: one encoder window
N_FFT, HOP, N_MELS = 400, 160, 80
N_FRAMES = WINDOW_SAMPLES // HOP  # 3000
MIN_SAMPLES = 480  # 30 ms: shorter clips give fewer than 2 encoder frames


class AudioTooShort(ValueError):
    """The clip is shorter than 30 ms (480 samples at 16 kHz)."""


@functools.cache
def mel_filters() -> torch.Tensor:
    """[80, 201] Slaney-scale, Slaney-normalised filters (Whisper's mel_80), float32."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=MODEL_RATE_HZ / 2,
        sampling_rate=MODEL_RATE_HZ,
        norm="slaney",
        mel_scale="slaney",
    )  # [201, 80]
    return torch.from_numpy(np.ascontiguousarray(fb.T, dtype=np.float32))


def mel_frames(n_samples: int) -> int:
    """Valid mel frames of a clip: min(n, 480000) // 160."""
    return min(n_samples, WINDOW_SAMPLES) // HOP


def check_length(n_samples: int) -> None:
    if n_samples < MIN_SAMPLES:
        raise AudioTooShort(
            f"audio is {n_samples} samples ({n_samples / MODEL_RATE_HZ * 1000:.1f} ms at 16 kHz); expected at least "
            f"{MIN_SAMPLES} samples (30 ms): record a longer clip"
        )


def split_windows(audio: np.ndarray) -> list[np.ndarray]:
    """Consecutive 30 s windows covering the whole clip; a tail under 30 ms is zero-padded to 30 ms, never dropped."""
    check_length(len(audio))
    windows = [audio[i : i + WINDOW_SAMPLES] for i in range(0, len(audio), WINDOW_SAMPLES)]
    if len(windows[-1]) < MIN_SAMPLES:
        windows[-1] = np.pad(windows[-1], (0, MIN_SAMPLES - len(windows[-1])))
    return windows


def log_mel(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One window (<= 480000 samples, float32 at 16 kHz) -> [80, 3000] normalised log-mel (float32)."""
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio)
    x = x.to(torch.float32).flatten()
    check_length(x.shape[0])
    if x.shape[0] > WINDOW_SAMPLES:
        raise ValueError(f"log_mel takes one 30 s window (<= {WINDOW_SAMPLES} samples), got {x.shape[0]}: split it")
    x = torch.nn.functional.pad(x, (0, WINDOW_SAMPLES - x.shape[0]))  # pad BEFORE the STFT (boundary frames)
    window = torch.hann_window(N_FFT, periodic=True)
    spec = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2  # [201, 3000]: the 3001st frame is dropped
    mel = mel_filters() @ power  # [80, 3000]
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0
