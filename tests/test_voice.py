"""The voice module: clause splitting of streamed text (property-tested) and real Piper synthesis in the shared pool."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assistant.audio.voice import (
    ClauseSplitter,
    SpeechPool,
    VoiceParams,
    installed_voices,
    speakable_text,
    text_language,
    unspeakable_reason,
)


def split_streamed(text: str, step: int) -> list[str]:
    s = ClauseSplitter()
    out: list[str] = []
    for i in range(0, len(text), step):
        out += s.feed(text[i : i + step])
    return out + s.flush()


def test_sentences_and_long_clauses_split_where_a_reader_pauses():
    text = (
        "The capital of France is Paris. It has about 2.1 million people, and it is known for the Eiffel Tower, "
        "e.g. Mr. Smith visited it! Is that all? 法国的首都是巴黎。好的"
    )
    assert split_streamed(text, 3) == [
        "The capital of France is Paris.",
        "It has about 2.1 million people, and it is known for the Eiffel Tower,",
        "e.g. Mr. Smith visited it!",
        "Is that all?",
        "法国的首都是巴黎。",
        "好的",
    ]


def test_a_clause_is_released_as_soon_as_it_is_complete_not_at_the_end():
    s = ClauseSplitter()
    assert s.feed("Paris is the capital") == []
    assert s.feed(".") == ["Paris is the capital."]  # a '.' after a word ends the sentence at once
    assert s.feed(" It has 2") == []
    assert s.feed(".") == []  # after a digit it may be a decimal point: wait for the next character
    assert s.feed("1 million people") == []
    assert s.feed("!") == ["It has 2.1 million people!"]
    assert s.feed(" Dr") == [] and s.feed(".") == []  # an abbreviation
    assert s.feed(" Who is big") == []
    assert s.flush() == ["Dr. Who is big"]
    assert s.flush() == []


def test_a_long_run_without_punctuation_is_cut_at_a_space():
    words = " ".join(["word"] * 100)
    clauses = split_streamed(words, 7)
    assert len(clauses) > 1 and all(len(c) <= 220 for c in clauses)
    assert " ".join(clauses) == words


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .,!?;:\n3。e")), max_size=300), st.integers(1, 50))
def test_nothing_is_lost_or_reordered_whatever_the_chunking(text, step):
    clauses = split_streamed(text, step)
    assert all(c == " ".join(c.split()) and c for c in clauses)
    assert "".join("".join(clauses).split()) == "".join(text.split())


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .,!?;:\n3。e")), max_size=300), st.integers(1, 50), st.integers(0, 30))
def test_raw_pieces_are_the_streamed_text_exactly(text, step, first_clause_chars):
    s = ClauseSplitter(first_clause_chars=first_clause_chars)
    pieces: list[str] = []
    for i in range(0, len(text), step):
        pieces += s.feed_raw(text[i : i + step])
    assert "".join(pieces + s.flush_raw()) == text


def test_the_first_clause_may_end_early_at_a_word_boundary():
    tokens = ["The", " capital", " of", " France", " is", " Paris", ".", " It", " is", " on", " the", " Seine", "."]
    s = ClauseSplitter(first_clause_chars=10)
    out = [c for t in tokens for c in s.feed(t)] + s.flush()
    # "The capital" is complete once " of" shows the word ended; later clauses wait for their sentence end
    assert out == ["The capital", "of France is Paris.", "It is on the Seine."]
    assert ClauseSplitter().feed("The capital of") == []  # off by default


def test_text_that_the_english_voice_cannot_read_is_reported_not_spoken():
    assert text_language("法国的首都是巴黎。") == "zh"
    assert text_language("Paris, France.") == "en"
    assert "no installed voice speaks 'zh'" in unspeakable_reason("法国的首都是巴黎。", "joe")
    assert unspeakable_reason("The capital is Paris.", "joe") is None
    assert unspeakable_reason("...", "joe") == "nothing to say"
    assert speakable_text("**Paris** is `the` capital") == "Paris is the capital"


@pytest.mark.slow
@pytest.mark.skipif("joe" not in installed_voices(), reason="the voice extra is not installed")
def test_the_pool_synthesises_clauses_at_the_requested_rate_and_speed():
    pool = SpeechPool(VoiceParams(name="joe", threads=1, max_concurrent=1))
    try:
        pool.load().result()
        normal = pool.submit("The capital of France is Paris.", speed=1.0, out_rate_hz=24000).result()
        fast = pool.submit("The capital of France is Paris.", speed=1.5, out_rate_hz=16000).result()
        assert normal.pcm.dtype == np.int16 and normal.rate_hz == 24000
        assert 1000 < normal.audio_ms < 4000
        assert fast.rate_hz == 16000 and fast.audio_ms < normal.audio_ms * 0.85
        assert np.abs(normal.pcm).max() > 3000  # speech, not silence
        with pytest.raises(ValueError, match="speaking speed"):
            pool.submit("x", speed=3.0)
    finally:
        pool.close()


def test_without_the_voice_the_server_answers_in_text_and_says_so_once(monkeypatch, caplog):
    import assistant.audio.voice as voice

    caplog.set_level("INFO", logger="assistant.voice")
    assert voice.open_pool(VoiceParams(name="")) is None
    monkeypatch.setattr(voice, "installed_voices", lambda: [])  # as after `pip install .` without the extra
    assert voice.open_pool(VoiceParams(name="joe")) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("text only" in line for line in lines)
    assert "pip install '.[voice]'" in lines[1] and "GPL-3.0-or-later" in lines[1]
