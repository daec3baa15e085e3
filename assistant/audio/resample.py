"""Streaming resampling of PCM16 mono audio to the models' 16 kHz (owner: server side, engineer D).

`StreamResampler` wraps `soxr.ResampleStream`: chunks of any size go in, resampled int16 comes out with the filter
state carried across chunks, so chunk boundaries leave no clicks. soxr holds back a few milliseconds of output (its
filter delay); `flush()` returns them at the end of an utterance and starts a fresh stream. Input at the target rate
passes through untouched (no filter, no delay).
"""

from __future__ import annotations

import numpy as np
import soxr

from assistant.audio import MODEL_RATE_HZ

MIN_RATE_HZ = 8000
MAX_RATE_HZ = 48000


class StreamResampler:
    """int16 mono at `in_rate_hz` -> int16 mono at `out_rate_hz`, chunk by chunk."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int = MODEL_RATE_HZ) -> None:
        if not MIN_RATE_HZ <= in_rate_hz <= MAX_RATE_HZ:
            raise ValueError(f"input sample rate must be in [{MIN_RATE_HZ}, {MAX_RATE_HZ}] Hz, got {in_rate_hz}")
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        self._stream: soxr.ResampleStream | None = None
        self._new_stream()

    def _new_stream(self) -> None:
        if self.in_rate_hz == self.out_rate_hz:
            self._stream = None
        else:
            # "HQ" is soxr's default quality; VQ costs more CPU for no audible gain on speech going into a 16 kHz model.
            self._stream = soxr.ResampleStream(self.in_rate_hz, self.out_rate_hz, 1, dtype="int16", quality="HQ")

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Resample one chunk (int16, 1-D). May return fewer samples than the rate ratio suggests (filter delay)."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"expected a 1-D int16 array, got dtype {pcm.dtype} with shape {pcm.shape}")
        if self._stream is None:
            return pcm.copy()
        return self._stream.resample_chunk(pcm, last=False)

    def flush(self) -> np.ndarray:
        """Output still held in the filter; the next `process` starts a new stream (call at an utterance's end)."""
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self._new_stream()
        return tail
