"""The segmenter's tentative end (speculation): emitted during the end-of-turn silence with exactly the audio the
commit will carry, voided when speech resumes, never emitted when off or not earlier than the commit."""

from __future__ import annotations

import numpy as np
import pytest

from assistant.audio.vad import Committed, SpeechStarted, TentativeEnd, TentativeVoid, VadParams, VadSegmenter
from tests.server_util import silence, vowel

RATE = 16000


def events_with_time(seg: VadSegmenter, pcm: np.ndarray, chunk: int = 160) -> list[tuple[int, object]]:
    """Feed 10 ms chunks; each event with the stream position (ms) at which it came out."""
    out = []
    for i in range(0, len(pcm), chunk):
        for ev in seg.feed(pcm[i : i + chunk]):
            out.append((seg.position_ms, ev))
    return out


def test_tentative_end_carries_the_committed_audio_before_the_commit():
    params = VadParams(early_prepare_ms=200, prefix_padding_ms=300, silence_duration_ms=600)
    assert params.tentative_ms() == 300  # the trailing padding must be complete: max(200, 300)
    pcm = np.concatenate([silence(400), vowel(900), silence(1000)])
    evs = events_with_time(VadSegmenter(params), pcm)
    kinds = [type(e).__name__ for _, e in evs]
    assert kinds == ["SpeechStarted", "TentativeEnd", "SpeechStopped", "Committed"], kinds
    (t_tent, tent), (t_commit, committed) = evs[1], evs[3]
    assert isinstance(tent, TentativeEnd) and isinstance(committed, Committed)
    assert np.array_equal(tent.audio, committed.audio)
    assert (tent.audio_start_ms, tent.audio_end_ms) == (committed.audio_start_ms, committed.audio_end_ms)
    # 300 ms of trailing silence vs 600: the tentative end comes 300 ms (10 frames of 30 ms) of stream earlier
    assert t_commit - t_tent == pytest.approx(300, abs=30)


def test_without_whole_padding_the_tentative_end_comes_earlier_with_the_start_of_the_committed_audio():
    """For a recogniser that trims the silence (Whisper): the tentative end at `early_prepare_ms`, 100 ms of stream
    earlier here, lacking only trailing silence; trimmed as Whisper hears it, the clip is the committed one."""
    from assistant.audio.trim import trim_silence

    params = VadParams(early_prepare_ms=200, prefix_padding_ms=300, silence_duration_ms=600)
    assert params.tentative_ms(whole_padding=False) == 200
    pcm = np.concatenate([silence(400), vowel(900), silence(1000)])
    evs = events_with_time(VadSegmenter(params, whole_padding=False), pcm)
    assert [type(e).__name__ for _, e in evs] == ["SpeechStarted", "TentativeEnd", "SpeechStopped", "Committed"]
    (t_tent, tent), (t_commit, committed) = evs[1], evs[3]
    whole = [e for _, e in events_with_time(VadSegmenter(params), pcm) if isinstance(e, TentativeEnd)][0]
    assert t_commit - t_tent == pytest.approx(400, abs=30)  # 200 ms of trailing silence, not 300
    assert len(tent.audio) < len(committed.audio) and np.array_equal(committed.audio[: len(tent.audio)], tent.audio)
    assert not committed.audio[len(tent.audio) :].any()  # what it lacks is silence
    heard = [trim_silence(a.astype(np.float32) / 32768) for a in (tent.audio, committed.audio, whole.audio)]
    assert np.array_equal(heard[0], heard[1]) and np.array_equal(heard[1], heard[2])


def test_speech_resuming_voids_the_tentative_end_and_the_turn_keeps_all_audio():
    params = VadParams(early_prepare_ms=200, silence_duration_ms=600)
    pcm = np.concatenate([silence(300), vowel(700), silence(450), vowel(600), silence(1000)])
    evs = [e for _, e in events_with_time(VadSegmenter(params), pcm)]
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["SpeechStarted", "TentativeEnd", "TentativeVoid", "TentativeEnd", "SpeechStopped", "Committed"]
    first, void, second, committed = evs[1], evs[2], evs[3], evs[5]
    assert first.turn == void.turn == second.turn  # one turn throughout
    assert len(first.audio) < len(second.audio) == len(committed.audio)
    assert np.array_equal(second.audio, committed.audio)
    assert np.array_equal(committed.audio[: len(first.audio)], first.audio)  # the first was a prefix, now stale
    assert len(committed.audio) >= RATE * (700 + 450 + 600) // 1000


def test_off_or_too_late_means_no_tentative_events_and_same_turns():
    pcm = np.concatenate([silence(300), vowel(700), silence(900), vowel(500), silence(900)])
    base = [e for _, e in events_with_time(VadSegmenter(VadParams()), pcm)]
    late = VadParams(early_prepare_ms=200, prefix_padding_ms=300, silence_duration_ms=300)
    assert VadParams().tentative_ms() is None and late.tentative_ms() is None
    on = [e for _, e in events_with_time(VadSegmenter(VadParams(early_prepare_ms=100)), pcm)]
    for evs in (base, [e for _, e in events_with_time(VadSegmenter(late), pcm)]):
        assert not any(isinstance(e, TentativeEnd | TentativeVoid) for e in evs)
    plain = [e for e in on if not isinstance(e, TentativeEnd | TentativeVoid)]
    assert [type(e) for e in plain] == [type(e) for e in base]  # speculation never changes the turns
    for a, b in zip(plain, base, strict=True):
        if isinstance(a, Committed):
            assert np.array_equal(a.audio, b.audio)
    turns = {e.turn for e in on if isinstance(e, TentativeEnd)}
    assert turns == {1, 2} and sum(isinstance(e, SpeechStarted) for e in on) == 2
    with pytest.raises(ValueError, match="early_prepare_ms"):
        VadParams(early_prepare_ms=-1)
