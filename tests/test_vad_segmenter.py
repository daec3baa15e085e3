"""The VAD segmenter on espeak-ng speech with silences, noise, clicks; the streaming resampler."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from assistant.audio.io import load_audio
from assistant.audio.resample import StreamResampler
from assistant.audio.vad import Committed, SpeechStarted, SpeechStopped, VadParams, VadSegmenter
from tests.server_util import TIMEOUT_S, silence, vowel

RATE = 16000


def speak(tmp_path, text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: install Debian's espeak-ng (make system-deps)")
    path = tmp_path / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(path), text], check=True, timeout=TIMEOUT_S)
    pcm = np.round(load_audio(path) * 32768.0).clip(-32768, 32767).astype(np.int16)
    return trim(pcm)


def trim(pcm: np.ndarray, level: int = 200) -> np.ndarray:
    """Cut espeak's leading/trailing silence so the true onset and end are known."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return pcm[loud[0] : loud[-1] + 1]


def run(seg: VadSegmenter, pcm: np.ndarray, chunk_sizes=(320,)) -> list:
    """Feed `pcm` in chunks cycling through `chunk_sizes`; returns all events."""
    events, i, k = [], 0, 0
    while i < len(pcm):
        n = chunk_sizes[k % len(chunk_sizes)]
        events += seg.feed(pcm[i : i + n])
        i, k = i + n, k + 1
    return events


def ms(samples: int) -> int:
    return samples * 1000 // RATE


@pytest.fixture(scope="module")
def two_turns(tmp_path_factory):
    """1 s lead-in holding a click and a cough-like burst, question 1, 1.5 s silence, question 2, 1 s silence; all
    under steady background noise."""
    tmp = tmp_path_factory.mktemp("vad")
    a = speak(tmp, "What is the weather like in Paris today?")
    b = speak(tmp, "Please turn on the kitchen lights.")
    lead = silence(1000)
    lead[3200:3280] = 9000  # a 5 ms click at 200 ms
    rng = np.random.default_rng(0)
    lead[8000:9600] = (rng.normal(0, 3000, 1600)).astype(np.int16)  # a 100 ms cough-like burst at 500 ms
    gap = silence(1500)
    parts = [lead, a, gap, b, silence(1000)]
    pcm = np.concatenate(parts)
    onsets = [len(lead), len(lead) + len(a) + len(gap)]
    ends = [onsets[0] + len(a), onsets[1] + len(b)]
    noise = rng.normal(0, 60, len(pcm))  # steady background noise around -55 dBFS
    noisy = np.clip(pcm + noise, -32768, 32767).astype(np.int16)
    return noisy, onsets, ends


@pytest.mark.slow
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_turn_boundaries_on_speech_with_noise(two_turns, frame_ms):
    pcm, onsets, ends = two_turns
    seg = VadSegmenter(VadParams(frame_ms=frame_ms))
    events = run(seg, pcm, chunk_sizes=(160, 777, 3200, 1))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    commits = [e for e in events if isinstance(e, Committed)]
    assert len(starts) == len(stops) == len(commits) == 2, events  # the click and the burst are not turns
    for i in range(2):
        assert abs(starts[i].audio_start_ms - ms(onsets[i])) <= 120, (i, starts[i], ms(onsets[i]))
        assert -60 <= stops[i].audio_end_ms - ms(ends[i]) <= 300, (i, stops[i], ms(ends[i]))
        c = commits[i]
        assert not c.forced and len(c.audio) == (c.audio_end_ms - c.audio_start_ms) * RATE // 1000
        # pre-roll kept: the commit starts prefix_padding_ms before the onset, and covers the whole utterance
        assert 250 <= starts[i].audio_start_ms - c.audio_start_ms <= 310
        assert c.audio_end_ms >= ms(ends[i])
        expected = pcm[c.audio_start_ms * RATE // 1000 : c.audio_end_ms * RATE // 1000]
        assert np.array_equal(c.audio, expected)  # exactly the stream's samples, in order


@pytest.mark.slow
def test_max_utterance_forces_commits(tmp_path):
    long_speech = np.concatenate([speak(tmp_path, "one two three four five six seven eight nine ten")] * 2)
    pcm = np.concatenate([silence(500), long_speech, silence(1000)])
    seg = VadSegmenter(VadParams(max_utterance_ms=2000))
    commits = [e for e in run(seg, pcm, (480,)) if isinstance(e, Committed)]
    assert len(commits) >= len(long_speech) // (2 * RATE)
    assert all(len(c.audio) <= 2 * RATE for c in commits)
    forced = [c for c in commits if c.forced]
    assert forced and all(len(c.audio) > 2 * RATE - 30 * RATE // 1000 for c in forced)  # cut within one frame of 2 s


def test_chunking_does_not_change_results():
    pcm = np.concatenate([silence(700), vowel(800), silence(900), vowel(600), silence(800)])
    results = []
    for sizes in [(160,), (1,), (4799, 13), (len(pcm),)]:
        events = run(VadSegmenter(), pcm, sizes)
        stamps = [getattr(e, "audio_start_ms", getattr(e, "audio_end_ms", 0)) for e in events]
        results.append([(type(e).__name__, t) for e, t in zip(events, stamps, strict=True)])
    assert all(r == results[0] for r in results) and len(results[0]) == 6


def test_min_speech_filters_short_bursts():
    pcm = np.concatenate([silence(500), vowel(120), silence(1000)])
    assert [e for e in run(VadSegmenter(VadParams(min_speech_ms=250)), pcm) if isinstance(e, Committed)] == []
    commits = [e for e in run(VadSegmenter(VadParams(min_speech_ms=60)), pcm) if isinstance(e, Committed)]
    assert len(commits) == 1


def test_silence_duration_ends_turn():
    # a 600 ms pause inside speech does not end the turn at 900 ms silence, but does at 300 ms
    pcm = np.concatenate([silence(300), vowel(600), silence(600), vowel(600), silence(1500)])
    n_long = sum(isinstance(e, Committed) for e in run(VadSegmenter(VadParams(silence_duration_ms=900)), pcm))
    n_short = sum(isinstance(e, Committed) for e in run(VadSegmenter(VadParams(silence_duration_ms=300)), pcm))
    assert (n_long, n_short) == (1, 2)


def test_commit_now_reset_and_offset():
    seg = VadSegmenter(stream_offset_ms=5000)
    assert seg.commit_now() == []
    events = seg.feed(np.concatenate([silence(300), vowel(500)]))
    assert isinstance(events[0], SpeechStarted) and 5280 <= events[0].audio_start_ms <= 5320
    stopped, committed = seg.commit_now()
    assert isinstance(stopped, SpeechStopped) and isinstance(committed, Committed)
    assert committed.audio_end_ms == seg.position_ms == 5800
    seg.feed(vowel(500))
    seg.reset()
    assert not seg.in_speech and seg.commit_now() == []


def test_params_validated():
    with pytest.raises(ValueError, match="frame_ms"):
        VadParams(frame_ms=25)
    with pytest.raises(ValueError, match="max_utterance_ms"):
        VadParams(max_utterance_ms=31000)
    with pytest.raises(ValueError, match="int16"):
        VadSegmenter().feed(np.zeros(10, dtype=np.float32))


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resampler_streams_like_one_shot(rate):
    t = np.arange(rate) / rate
    x = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    r = StreamResampler(rate)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.integers(0, len(x), 40))
    out = np.concatenate([r.process(c) for c in np.split(x, cuts)] + [r.flush()])
    assert abs(len(out) - RATE) <= 2  # one second in, one second out
    spectrum = np.abs(np.fft.rfft(out[2000:-2000].astype(np.float64)))
    assert abs(np.argmax(spectrum) * RATE / len(out[2000:-2000]) - 440) < 3  # pitch preserved
    again = StreamResampler(rate)
    whole = np.concatenate([again.process(x), again.flush()])
    # chunking changes nothing beyond soxr's int16 rounding (an LSB or two)
    assert np.abs(out.astype(np.int32) - whole).max() <= 2
    # after flush a new stream starts cleanly
    assert len(np.concatenate([r.process(x), r.flush()])) == len(out)


def test_resampler_rejects_bad_rates():
    with pytest.raises(ValueError, match="8000"):
        StreamResampler(96000)
    assert np.array_equal(StreamResampler(16000).process(np.arange(5, dtype=np.int16)), np.arange(5))


@pytest.mark.slow
@pytest.mark.parametrize("noise_std", [300, 1000])
def test_turn_ends_under_loud_noise(tmp_path, noise_std):
    """White noise up to ~-30 dBFS (std 1000) still lets the turn start at the onset and end after the speech."""
    speech = speak(tmp_path, "What is the weather like in Paris today?")
    pcm = np.concatenate([silence(1000), speech, silence(2000)])
    noisy = np.clip(pcm + np.random.default_rng(1).normal(0, noise_std, len(pcm)), -32768, 32767).astype(np.int16)
    events = [e for e in VadSegmenter().feed(noisy) if not isinstance(e, Committed)]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert abs(events[0].audio_start_ms - 1000) <= 120
    assert 0 <= events[1].audio_end_ms - ms(RATE + len(speech)) <= 300
