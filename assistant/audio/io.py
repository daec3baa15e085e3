"""Audio file loading: any common file (WAV of any width/rate/channels, FLAC, OGG, MP3) -> 16 kHz mono float32.

The result is on the 16-bit PCM grid (int16 / 32768), as the reference decodes every file to s16le first: channels
are averaged, the rate is converted with soxr (high quality), then the samples are rounded to int16. A 16 kHz mono
16-bit WAV passes through bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr

from assistant.audio import MODEL_RATE_HZ


def to_pcm16_grid(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> nearest int16 value / 32768 (clipped), float32."""
    return (np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def to_16k_mono(samples: np.ndarray, rate_hz: int) -> np.ndarray:
    """[n] or [n, channels] float samples at `rate_hz` -> [m] float32 at 16 kHz on the int16 grid."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if rate_hz != MODEL_RATE_HZ:
        x = soxr.resample(x, rate_hz, MODEL_RATE_HZ, quality="HQ")
    return to_pcm16_grid(x)


def load_audio(path: str | Path) -> np.ndarray:
    """Read `path` and return 16 kHz mono float32 samples on the int16 grid."""
    import soundfile

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"audio file {p} does not exist; pass an existing WAV/FLAC/OGG/MP3 file")
    try:
        info = soundfile.info(str(p))
        if info.subtype == "PCM_16" and info.samplerate == MODEL_RATE_HZ and info.channels == 1:
            # The common case, exactly: integer samples / 32768, no float round trip.
            return soundfile.read(str(p), dtype="int16")[0].astype(np.float32) / 32768.0
        data, rate = soundfile.read(str(p), dtype="float64", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise ValueError(f"cannot read audio file {p}: {e}; expected WAV, FLAC, OGG or MP3") from None
    return to_16k_mono(data, rate)
