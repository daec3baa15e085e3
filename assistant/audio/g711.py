"""G.711 encoding of PCM16 (ITU-T G.711 mu-law and A-law, 8 bits a sample): the `audio/pcmu` / `audio/pcma`
(beta `g711_ulaw` / `g711_alaw`) output formats of the OpenAI protocol, used by telephony clients.

Pure numpy, vectorised, bit-exact with the classic Sun reference implementation (the one Python's `audioop` used;
audioop is gone from Python 3.13, so it is not used here). The caller resamples to 8 kHz first.

    ulaw_bytes = encode(pcm16, "g711_ulaw")
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Codec = Literal["g711_ulaw", "g711_alaw"]
RATE_HZ = 8000  # G.711 is 8 kHz by definition

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ULAW_CLIP = 8159  # 14-bit magnitude
_ULAW_BIAS = 0x84 >> 2


def _ulaw(pcm: np.ndarray) -> np.ndarray:
    val = pcm.astype(np.int32) >> 2
    mask = np.where(val < 0, 0x7F, 0xFF)
    val = np.minimum(np.abs(val), _ULAW_CLIP) + _ULAW_BIAS
    seg = np.searchsorted(_ULAW_SEG_END, val, side="left")
    code = (seg << 4) | ((val >> (np.minimum(seg, 7) + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def _alaw(pcm: np.ndarray) -> np.ndarray:
    val = pcm.astype(np.int32) >> 3
    negative = val < 0
    mask = np.where(negative, 0x55, 0xD5)
    val = np.where(negative, -val - 1, val)
    seg = np.searchsorted(_ALAW_SEG_END, val, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = (seg << 4) | ((val >> shift) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def encode(pcm16: np.ndarray, codec: Codec) -> bytes:
    """int16 samples -> one G.711 byte per sample."""
    if codec == "g711_ulaw":
        return _ulaw(pcm16).tobytes()
    if codec == "g711_alaw":
        return _alaw(pcm16).tobytes()
    raise ValueError(f"codec must be 'g711_ulaw' or 'g711_alaw', got {codec!r}")
