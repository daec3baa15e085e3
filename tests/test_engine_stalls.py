"""Audio work never stalls the engine's worker for long, and no user turn is unbounded (tiny random Qwen-Audio model).

The worker prepares user turns in chunks of `prepare_batch` and runs its commands and one decode step between two
chunks: a running answer keeps streaming while a burst of turns is prepared, and a cancel ends a response before the
queued chunks run. Order is kept: a response answers every turn of its session queued before it, a reset forgets
the turns before it and not those after it, "Audio k" numbers follow command order. A user turn over
`engine.max_turn_tokens` is refused (`TurnTooLong`, code `turn_too_long`) and nothing of it enters the conversation.

`Traced` records, in order, every prepare call and every decode step on the worker thread, and can hold the worker
inside `prepare` (like `Gate` in test_engine_engine.py), so the tests check order and counts, never wall-clock time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import pytest

from assistant.backends.base import Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine.api import ResponseDone, ResponseOptions, TurnTooLong, UnknownSession
from assistant.engine.engine import Engine
from tests.server_util import TIMEOUT_S, RecordingBackend, golden_clips, worker_conversation

GEN = GenerationConfig(greedy=True, max_new_tokens=8)
GREEDY = ResponseOptions(greedy=True)
LONG = ResponseOptions(greedy=True, max_new_tokens=2000)  # runs until cancelled (`Traced` never picks a stop id)


@pytest.fixture(scope="module")
def clips():
    return golden_clips()


class _NoStopLM:
    """The real LM; logits never favour a stop id (answers run until cancelled); each decode step is logged."""

    def __init__(self, lm, stop_ids, log: list):
        self._lm, self._stop, self._log = lm, sorted(stop_ids), log

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def _mask(self, logits):
        logits[..., [i for i in self._stop if i < logits.shape[-1]]] = float("-inf")
        return logits

    def prefill(self, x, cache, all_logits=False):
        return self._mask(self._lm.prefill(x, cache, all_logits))

    def decode(self, x, caches):
        self._log.append(("decode", len(caches)))
        return self._mask(self._lm.decode(x, caches))


class Traced:
    """The real backend with `prepare_batch` turns per chunk, its prepare calls and decode steps logged in order.
    `watch` (a response stream): each logged prepare also says whether that response had ended (read on the worker,
    which ends it). While the gate is closed, the worker waits inside `prepare`."""

    def __init__(self, backend, prepare_batch: int):
        self._backend = backend
        self.prepare_batch = prepare_batch
        self.log: list[tuple] = []
        self.lm = _NoStopLM(backend.lm, backend.tokenizer.stop_ids, self.log)
        self.watch = None
        self.opened, self.entered = threading.Event(), threading.Event()
        self.opened.set()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prepare(self, utterances, audio_numbers):
        self.entered.set()
        if not self.opened.wait(TIMEOUT_S):
            raise TimeoutError("test gate was never opened")
        ended = self.watch.finished if self.watch is not None else None
        self.log.append(("prepare", [u.key for u in utterances], ended))
        return self._backend.prepare(utterances, audio_numbers)

    def close_gate(self) -> None:
        self.opened.clear()
        self.entered.clear()

    async def hold(self, engine: Engine) -> asyncio.Task:
        """Park the worker inside prepare (a turn of its own session); returns that turn's task."""
        self.close_gate()
        key = f"gate{next(_gate_keys)}"
        engine.open_session(key)
        task = asyncio.create_task(engine.add_user_turn(key, Utterance(key, text="hi")))
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT_S)
        return task

    def release(self) -> None:
        self.opened.set()

    def prepares(self, keys) -> list[tuple]:
        return [e for e in self.log if e[0] == "prepare" and set(e[1]) <= set(keys)]


_gate_keys = itertools.count()


@pytest.fixture
def traced(server_tiny_backend):
    return lambda prepare_batch: Traced(server_tiny_backend, prepare_batch)


async def _engine(backend, **engine_kw) -> Engine:
    engine = Engine(backend, EngineConfig(**engine_kw), GEN)
    await engine.start()
    return engine


async def _talking(engine: Engine, traced: Traced):
    """A response that is decoding (its first delta arrived)."""
    engine.open_session("talk")
    await engine.add_user_turn("talk", Utterance("t", text="Please talk for a long time."))
    stream = engine.respond("talk", LONG)
    await asyncio.wait_for(anext(stream), TIMEOUT_S)
    traced.watch = stream
    return stream


async def _submit(engine: Engine, keys: list[str], clips) -> list[asyncio.Task]:
    """One spoken turn per new session, enqueued now (in this order)."""
    for k in keys:
        engine.open_session(k)
    tasks = [asyncio.create_task(engine.add_user_turn(k, Utterance(k, audio=clips[i % 2]))) for i, k in enumerate(keys)]
    await asyncio.sleep(0)  # each task puts its command before its first await
    return tasks


async def _burst(tr: Traced, keys: list[str], clips, cancel_first: bool):
    """While an answer decodes, park the worker, queue one spoken turn per key (cancelling the answer first if asked),
    release it. Returns the turns' `TurnInfo`s, the answer's `ResponseDone` and its token count when parked."""
    engine = await _engine(tr)
    try:
        stream = await _talking(engine, tr)
        held = await tr.hold(engine)
        produced = len(engine._worker.active[0].tokens.output_ids)  # the worker is parked: this is final
        turns = await _submit(engine, keys, clips)
        if cancel_first:
            assert stream.cancel()
        tr.release()
        await held
        infos = await asyncio.wait_for(asyncio.gather(*turns), TIMEOUT_S)
        stream.cancel()
        done = await asyncio.wait_for(stream.wait_done(), TIMEOUT_S)
    finally:
        await engine.stop()
    return infos, done, produced


async def test_a_running_answer_decodes_between_prepare_chunks(traced, clips):
    tr = traced(2)
    keys = [f"k{i}" for i in range(8)]
    infos, done, _ = await _burst(tr, keys, clips, cancel_first=False)
    assert [e[1] for e in tr.prepares(keys)] == [keys[i : i + 2] for i in range(0, 8, 2)]  # chunks in command order
    assert all(e[2] is False for e in tr.prepares(keys))  # the answer was running through all of them
    calls = [i for i, e in enumerate(tr.log) if e[0] == "prepare"]
    for a, b in itertools.pairwise(calls[-5:]):  # the held gate's chunk, then the four chunks of the burst
        assert ("decode", 1) in tr.log[a + 1 : b], f"no decode step between two prepare chunks: {tr.log[a : b + 1]}"
    assert [i.item_id for i in infos] == keys and all(i.audio_s > 2.0 for i in infos)
    assert done.status == "cancelled"


async def test_cancel_ends_the_response_before_the_queued_chunks_run(traced, clips):
    tr = traced(1)
    keys = [f"k{i}" for i in range(6)]
    _, done, produced = await _burst(tr, keys, clips, cancel_first=True)
    assert done.status == "cancelled" and done.reason == "client_cancelled"
    assert len(done.output_ids) <= produced + 1  # within one decode step of the cancel
    chunks = tr.prepares(keys)
    assert len(chunks) == len(keys)  # one per turn
    assert all(ended for _, _, ended in chunks)  # the response had ended before the first of them ran


async def test_order_is_kept_across_chunks(traced, clips):
    """A response answers the turns queued before it; a reset forgets the turns before it, not those after it;
    "Audio k" follows command order; a close answers its queued turns `UnknownSession`."""
    tr = traced(1)
    engine = await _engine(tr)
    try:
        held = await tr.hold(engine)
        others = await _submit(engine, ["o1", "o2", "o3"], clips)
        engine.open_session("s")
        engine.open_session("gone")
        first = asyncio.create_task(engine.add_user_turn("s", Utterance("s1", text="Forgotten?")))
        lost = asyncio.create_task(engine.add_user_turn("gone", Utterance("g1", text="Anyone?")))
        await asyncio.sleep(0)
        engine.reset_session("s")
        engine.close_session("gone")
        later = [
            asyncio.create_task(engine.add_user_turn("s", Utterance("s2", audio=clips[0]))),
            asyncio.create_task(engine.add_user_turn("s", Utterance("s3", audio=clips[1], text="Both?"))),
        ]
        await asyncio.sleep(0)
        stream = engine.respond("s", dataclasses.replace(LONG, max_new_tokens=4))
        tr.release()
        await held
        done = await asyncio.wait_for(stream.wait_done(), TIMEOUT_S)
        forgotten = await first
        with pytest.raises(UnknownSession):
            await lost
        await asyncio.gather(*others, *later)
    finally:
        await engine.stop()
    assert forgotten.item_id == "s1"  # prepared, then forgotten by the reset
    text = tr.tokenizer.decode_bytes(done.prompt_ids).decode(errors="replace")
    assert done.status == "incomplete" and "Forgotten?" not in text
    assert text.index("Audio 1: <audio>") < text.index("Audio 2: <audio>") < text.index("Both?")
    assert [e[1] for e in tr.prepares(["s1", "s2", "s3"])] == [["s1"], ["s2"], ["s3"]]


async def test_speculation_discarded_or_confirmed_while_its_chunk_runs(traced, clips):
    tr = traced(1)
    engine = await _engine(tr)
    try:
        engine.open_session("s")
        utt = Utterance("a1", audio=clips[0])
        for confirm in (False, True):
            tr.close_gate()
            engine.speculate_user_turn("s", utt)
            assert await asyncio.to_thread(tr.entered.wait, TIMEOUT_S)  # its chunk is running
            if confirm:
                task = asyncio.create_task(engine.confirm_user_turn("s", utt))
            else:
                engine.discard_user_turn("s", "a1")
                task = asyncio.create_task(engine.call(lambda _b: None))  # after the discard
            await asyncio.sleep(0)
            tr.release()
            info = await asyncio.wait_for(task, TIMEOUT_S)
            conv = await worker_conversation(engine, "s")
            if confirm:
                assert info.speculative and len(conv.pending) == 1  # the finished speculation was reused
            else:
                assert not conv.speculative and not conv.pending  # its result was thrown away
    finally:
        await engine.stop()
    assert len(tr.prepares(["a1"])) == 2  # once per speculation, never again at the confirm


async def test_a_one_megabyte_text_turn_is_refused_at_once_and_the_session_goes_on(server_tiny_backend):
    rec = RecordingBackend(server_tiny_backend)
    engine = await _engine(rec)  # default engine.max_turn_tokens (1024)
    try:
        engine.open_session("s")
        with pytest.raises(TurnTooLong) as refused:
            await engine.add_user_turn("s", Utterance("big", text="x" * 1_000_000))
        await engine.add_user_turn("s", Utterance("ok", text="What is two plus two?"))
        done = await asyncio.wait_for(engine.respond("s", GREEDY).wait_done(), TIMEOUT_S)
        conv = await worker_conversation(engine, "s")
    finally:
        await engine.stop()
    err = refused.value
    assert err.code == "turn_too_long" and "1000000 characters" in str(err) and "engine.max_turn_tokens" in str(err)
    assert rec.runs("big") == []  # refused before any backend work (or tokenizing)
    assert done.status in ("completed", "incomplete") and done.input_tokens < 200
    assert [ex.user.key for ex in conv.history] == ["ok"]


async def test_turns_over_the_token_limit_are_refused_and_leave_no_trace(server_tiny_backend, clips):
    class LongTranscript(RecordingBackend):
        """A transcript (as the embedded backend makes) of 60 words for the turn keyed "heard"."""

        def prepare(self, utterances, audio_numbers):
            turns = super().prepare(utterances, audio_numbers)
            return [dataclasses.replace(t, transcript="word " * 60) if t.key == "heard" else t for t in turns]

    rec = LongTranscript(server_tiny_backend)
    engine = await _engine(rec, max_turn_tokens=16)  # 256 characters at most
    try:
        engine.open_session("s")
        with pytest.raises(TurnTooLong, match=r"of \d+ tokens is over engine.max_turn_tokens = 16"):
            await engine.add_user_turn("s", Utterance("typed", text="many words " * 20))  # 220 characters
        with pytest.raises(TurnTooLong, match="tokens"):
            await engine.add_user_turn("s", Utterance("heard", audio=clips[0]))
        await engine.add_user_turn("s", Utterance("next", audio=clips[1]))
        done: ResponseDone = await asyncio.wait_for(engine.respond("s", GREEDY).wait_done(), TIMEOUT_S)
        conv = await worker_conversation(engine, "s")
    finally:
        await engine.stop()
    assert rec.runs("typed") == []  # refused before its audio work
    text = server_tiny_backend.tokenizer.decode_bytes(done.prompt_ids).decode(errors="replace")
    assert "Audio 1: <audio>" in text and "Audio 2" not in text  # the refused audio took no number
    assert "many words" not in text and "word word" not in text
    assert [ex.user.key for ex in conv.history] == ["next"] and conv.audio_count == 1
