"""Where the speech is in a clip, to the sample: the silence around it is cut to a fixed margin before recognition.

Whisper is not shift-invariant: the same words heard 0.3 s later in its window can come out as other words (or
another language; measured in bench/asr_peers.py). Push-to-talk, the VAD's pre-roll and `ask` files surround one
question with different amounts of silence, so the recogniser gets every clip cut to `margin_s` around the span of
the 10 ms windows whose RMS is above the threshold. The cut is shift-equivariant (a window sliding sample by sample
over the zero-extended clip, margins zero-filled where the clip is shorter), so a clip padded with any amount of
digital silence gives exactly the same samples. A clip with nothing above the threshold is returned whole (the
recogniser's no-speech rule judges it).
"""

from __future__ import annotations

import numpy as np

from assistant.audio import MODEL_RATE_HZ

RMS_WINDOW = MODEL_RATE_HZ // 100  # 10 ms
# Speech is where the 10 ms RMS is within REL_DB of the clip's loudest 10 ms and above FLOOR_RMS (-60 dBFS): 40 dB
# keeps the soft onsets ("h", "wh") of espeak-ng and microphone speech; the margin keeps what lies just below it.
REL_DB = 40.0
FLOOR_RMS = 1e-3
MARGIN_S = 0.1


def speech_span(audio: np.ndarray) -> tuple[int, int] | None:
    """[start, end) sample indices covering every 10 ms window above the threshold, or None when no window is."""
    x = np.asarray(audio, dtype=np.float64)
    if len(x) == 0:
        return None
    # rms[i] covers x[i - RMS_WINDOW + 1 .. i] (zeros outside the clip).
    rms = np.sqrt(np.maximum(np.convolve(x * x, np.full(RMS_WINDOW, 1.0 / RMS_WINDOW), mode="full"), 0.0))
    threshold = max(FLOOR_RMS, float(rms.max()) * 10 ** (-REL_DB / 20))
    above = np.flatnonzero(rms > threshold)
    if len(above) == 0:
        return None
    return max(0, int(above[0]) - RMS_WINDOW + 1), min(len(x), int(above[-1]) + 1)


def trim_silence(audio: np.ndarray, margin_s: float = MARGIN_S) -> np.ndarray:
    """`audio` cut to `margin_s` of what surrounds its speech span (zero-filled where the clip has less), float32."""
    margin = int(round(margin_s * MODEL_RATE_HZ))
    # Zero-extended by one RMS window plus the margin on both sides, the span never touches an edge: the result is
    # then the same for the clip and for the clip with any digital silence added at either end.
    pad = np.zeros(RMS_WINDOW + margin, np.float32)
    ext = np.concatenate([pad, np.asarray(audio, dtype=np.float32), pad])
    span = speech_span(ext)
    if span is None:
        return np.asarray(audio, dtype=np.float32)
    return ext[span[0] - margin : span[1] + margin].copy()
