"""The silence cut before recognition (assistant/audio/trim.py): the same samples whatever digital silence surrounds
a clip, the speech and its margin kept whole, a clip without speech left as it is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from assistant.audio.trim import MARGIN_S, trim_silence

RATE = 16000


def burst(seed: int = 0, n: int = 4000) -> np.ndarray:
    """A noise burst with a soft start (a quiet 'h' before the loud part), as speech has."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * 0.3
    x[:400] *= 0.02  # 25 ms at -34 dB: inside the 40 dB range, so part of the speech
    return x


@settings(max_examples=40, deadline=None)
@given(lead=st.integers(0, 20000), trail=st.integers(0, 20000), seed=st.integers(0, 3))
def test_any_digital_silence_around_a_clip_gives_the_same_samples(lead, trail, seed):
    x = burst(seed)
    padded = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    assert np.array_equal(trim_silence(padded), trim_silence(x))


def test_the_speech_and_a_margin_of_silence_are_kept():
    x = burst()
    out = trim_silence(np.concatenate([np.zeros(RATE, np.float32), x, np.zeros(RATE, np.float32)]))
    lo, hi = int(MARGIN_S * RATE), int(MARGIN_S * RATE) + RATE // 100  # the margin, plus at most one 10 ms window
    before = int(np.flatnonzero(out)[0])
    after = len(out) - before - len(x)
    assert lo <= before <= hi and lo <= after <= hi, (before, after)
    assert np.array_equal(out[before : before + len(x)], x)  # the soft start too


def test_a_clip_without_speech_is_left_whole():
    quiet = (np.random.default_rng(0).standard_normal(RATE) * 1e-4).astype(np.float32)  # under -60 dBFS
    assert np.array_equal(trim_silence(quiet), quiet)
    assert np.array_equal(trim_silence(np.zeros(500, np.float32)), np.zeros(500, np.float32))
