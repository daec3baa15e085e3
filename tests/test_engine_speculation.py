"""Speculative user turns on the real engine (tiny random Qwen-Audio checkpoint): a confirmed speculation reuses its
audio work and answers exactly like the normal path (greedy); a changed utterance, a stale "Audio k" number, a
discard, a reset or a close leave no trace and fall back to the normal path.

The backend is the real one, recorded (`RecordingBackend`): tests count its prepare runs per turn and wait for a
speculation to have run without sleeping.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from assistant.backends.base import Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine.api import ResponseDone, ResponseOptions
from assistant.engine.engine import Engine
from tests.server_util import TIMEOUT_S, RecordingBackend, golden_clips, worker_conversation

GEN = GenerationConfig(greedy=True, max_new_tokens=8)
GREEDY = ResponseOptions(greedy=True)


@pytest.fixture(scope="module")
def clips():
    return golden_clips()


@pytest.fixture
async def rec_engine(server_tiny_backend):
    rec = RecordingBackend(server_tiny_backend)
    engine = Engine(rec, EngineConfig(), GEN)
    await engine.start()
    try:
        yield rec, engine
    finally:
        await engine.stop()


async def _answer(engine: Engine, sid: str) -> ResponseDone:
    return await asyncio.wait_for(engine.respond(sid, GREEDY).wait_done(), TIMEOUT_S)


async def _speculated(rec: RecordingBackend, engine: Engine, sid: str, utt: Utterance) -> None:
    """Speculate `utt` and wait until its audio work ran (so a later confirm can only find it done)."""
    before = len(rec.calls)
    engine.speculate_user_turn(sid, utt)
    await asyncio.to_thread(rec.wait_for_runs, before + 1)


async def _baseline(engine: Engine, sid: str, turns: list[Utterance]) -> list[ResponseDone]:
    engine.open_session(sid)
    out = []
    for utt in turns:
        await engine.add_user_turn(sid, utt)
        out.append(await _answer(engine, sid))
    return out


def _same(a: ResponseDone, b: ResponseDone) -> None:
    assert a.status == b.status
    assert (a.prompt_ids, a.output_ids, a.text) == (b.prompt_ids, b.output_ids, b.text)


async def test_confirmed_speculation_runs_prepare_once_and_answers_the_same(rec_engine, clips):
    rec, engine = rec_engine
    u1, u2 = Utterance("a1", audio=clips[0]), Utterance("a2", audio=clips[1])
    base = await _baseline(engine, "base", [u1, u2])
    calls_before = len(rec.calls)
    engine.open_session("s")
    await engine.add_user_turn("s", u1)
    first = await _answer(engine, "s")
    await _speculated(rec, engine, "s", u2)
    conv = await worker_conversation(engine, "s")
    assert not conv.pending and len(conv.history) == 1 and conv.audio_count == 1  # nothing entered yet
    info = await engine.confirm_user_turn("s", Utterance("a2", audio=clips[1].copy()))
    second = await _answer(engine, "s")
    assert info.speculative and info.item_id == "a2" and info.audio_s == pytest.approx(len(clips[1]) / 16000)
    # the session's prepare runs: a1 once, a2 once (the speculation), nothing at the confirm
    assert [k for call in rec.calls[calls_before:] for k, _ in call] == ["a1", "a2"]
    _same(first, base[0])
    _same(second, base[1])
    assert "Audio 2:" in rec.tokenizer.decode_bytes(second.prompt_ids).decode(errors="replace")
    assert not conv.speculative
    # the speculation's prompt was prefilled before the commit: the answer recomputed only its last position
    assert second.cached_tokens == len(second.prompt_ids) - 1


async def test_speculative_prefill_is_skipped_when_switched_off(server_tiny_backend, clips):
    rec = RecordingBackend(server_tiny_backend)
    engine = Engine(rec, EngineConfig(speculative_prefill=False), GEN)
    await engine.start()
    try:
        engine.open_session("s")
        await engine.add_user_turn("s", Utterance("a1", audio=clips[0]))
        await _answer(engine, "s")
        await _speculated(rec, engine, "s", Utterance("a2", audio=clips[1]))
        await engine.confirm_user_turn("s", Utterance("a2", audio=clips[1]))
        second = await _answer(engine, "s")
    finally:
        await engine.stop()
    assert engine._worker.speculative_prefills == 0
    assert second.cached_tokens < len(second.prompt_ids) - 1  # the new turn was prefilled at the answer


async def test_changed_audio_discards_the_speculation_and_does_the_work_again(rec_engine, clips):
    """Speech resumed after the tentative end: the committed audio is longer, the speculative result is not used."""
    rec, engine = rec_engine
    full = np.concatenate([clips[0], clips[1]])
    [base] = await _baseline(engine, "base", [Utterance("x", audio=full)])
    engine.open_session("s")
    await _speculated(rec, engine, "s", Utterance("x", audio=clips[0]))
    info = await engine.confirm_user_turn("s", Utterance("x", audio=full))
    done = await _answer(engine, "s")
    assert not info.speculative and info.audio_s == pytest.approx(len(full) / 16000)
    assert rec.runs("x")[-2:] == [len(clips[0]), len(full)]
    _same(done, base)  # the speculative prefill of the shorter turn left no trace in the answer
    assert not (await worker_conversation(engine, "s")).speculative


async def test_stale_audio_number_is_not_reused(rec_engine, clips):
    """A speculation rendered as "Audio 1" cannot become the second audio of the conversation."""
    rec, engine = rec_engine
    u1, u2 = Utterance("a1", audio=clips[0]), Utterance("a2", audio=clips[1])
    base = await _baseline(engine, "base", [u1, u2])
    engine.open_session("s")
    await _speculated(rec, engine, "s", u2)  # speculated before turn a1 was even submitted
    await engine.add_user_turn("s", u1)
    first = await _answer(engine, "s")
    info = await engine.confirm_user_turn("s", u2)
    second = await _answer(engine, "s")
    assert not info.speculative and rec.runs("a2")[-2:] == [len(clips[1])] * 2
    _same(first, base[0])
    _same(second, base[1])


async def test_discard_reset_and_close_leave_no_trace(rec_engine, clips):
    rec, engine = rec_engine
    u1, u2 = Utterance("a1", audio=clips[0]), Utterance("a2", audio=clips[1])
    [base1] = await _baseline(engine, "base", [u1])
    engine.open_session("s")
    conv = await worker_conversation(engine, "s")
    # discard: nothing pending, so a response has nothing to answer; history and cache untouched
    await _speculated(rec, engine, "s", u2)
    engine.discard_user_turn("s", "a2")
    failed = await _answer(engine, "s")
    assert failed.status == "failed" and "no user turn" in failed.error
    assert not conv.speculative and not conv.pending and not conv.history and conv.audio_count == 0
    assert conv.cache.length == 0
    confirmed = await engine.confirm_user_turn("s", u2)  # nothing left to reuse: the normal path
    assert not confirmed.speculative
    await _answer(engine, "s")
    # reset during speculation: the speculation goes with the conversation
    await _speculated(rec, engine, "s", u1)
    engine.reset_session("s")
    info = await engine.confirm_user_turn("s", u1)
    after_reset = await _answer(engine, "s")
    assert not info.speculative and len(conv.history) == 1
    _same(after_reset, base1)  # exactly a fresh conversation's first turn
    # a discard that overtakes its speculation in the queue: the speculation never runs
    runs = len(rec.runs("late"))
    engine.speculate_user_turn("s", Utterance("late", audio=clips[0]))
    engine.discard_user_turn("s", "late")
    await engine.add_user_turn("s", Utterance("t", text="sync"))  # the worker has handled both by now
    assert len(rec.runs("late")) - runs <= 1 and not conv.speculative
    # close during speculation
    await _speculated(rec, engine, "s", u2)
    engine.close_session("s")
    engine.open_session("sync")
    await engine.add_user_turn("sync", Utterance("t2", text="sync"))
    assert conv.closed and not conv.speculative and not conv.pending and not conv.history
    engine.discard_user_turn("s", "a2")  # a closed session: ignored


def _padded(clip: np.ndarray, ms: int) -> np.ndarray:
    return np.concatenate([clip, np.zeros(16 * ms, np.float32)])


@pytest.mark.slow
async def test_a_speculation_short_of_trailing_silence_is_reused_when_whisper_hears_it_alike(embedded_backend, clips):
    """The VAD without whole padding speculates on a clip lacking some trailing silence (`VadSegmenter`): Whisper
    trims it away, so the commit reuses the work; a clip that differs in what Whisper hears is prepared again."""
    rec = RecordingBackend(embedded_backend)
    engine = Engine(rec, EngineConfig(), GEN)
    await engine.start()
    try:
        engine.open_session("s")
        await _speculated(rec, engine, "s", Utterance("a1", audio=_padded(clips[0], 100)))
        info = await engine.confirm_user_turn("s", Utterance("a1", audio=_padded(clips[0], 300)))
        assert info.speculative and rec.runs("a1") == [len(clips[0]) + 1600]  # one prepare: the speculation's
        assert info.audio_s == pytest.approx(len(clips[0]) / 16000 + 0.3)  # the committed clip's length
        await _answer(engine, "s")
        louder = _padded(clips[1], 300)
        await _speculated(rec, engine, "s", Utterance("a2", audio=_padded(clips[1], 100)))
        louder[-1600:] = 0.2  # a sound in the padding: heard, so not the same clip
        info = await engine.confirm_user_turn("s", Utterance("a2", audio=louder))
        assert not info.speculative and rec.runs("a2") == [len(clips[1]) + 1600, len(louder)]
    finally:
        await engine.stop()


async def test_an_exact_backend_never_reuses_a_speculation_short_of_trailing_silence(rec_engine, clips):
    rec, engine = rec_engine  # the qwen-audio backend: its encoder hears the whole clip
    engine.open_session("s")
    await _speculated(rec, engine, "s", Utterance("a1", audio=_padded(clips[0], 100)))
    info = await engine.confirm_user_turn("s", Utterance("a1", audio=_padded(clips[0], 300)))
    assert not info.speculative and len(rec.runs("a1")) == 2
