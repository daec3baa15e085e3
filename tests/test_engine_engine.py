"""The engine end to end on the tiny random Qwen-Audio checkpoint: batched == unbatched, cache reuse == fresh prefill,
window eviction, NTK rebuild, LRU eviction, cancellation, admission control, failures, many sessions at once.

The slow reference is `assistant.engine.decoding.generate_stream` (one sequence, fresh cache, whole prompt). Where a
test needs the worker to be at a known point, `Gate` holds it inside `backend.prepare` (the real backend, delayed), so
commands pile up and are taken together: no sleeps, no wall-clock bounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import numpy as np
import pytest
import torch

from assistant.backends.base import AudioSpan, Exchange, Prompt, Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine.api import ConversationBusy, ResponseDone, ResponseOptions, ServerBusy, TextDelta
from assistant.engine.conversation import plan_cache
from assistant.engine.decoding import generate_stream, prefill_prompt
from assistant.engine.engine import Engine
from assistant.engine.sampling import sampling_params
from tests.server_util import golden_clips

WAIT_S = 120.0  # the one timeout every wait in this file derives from (a hang fails instead of blocking CI)
GEN = GenerationConfig(greedy=True, max_new_tokens=8)
GREEDY = ResponseOptions(greedy=True)


@pytest.fixture(scope="session")
def qwen_backend(tiny_qwen_dir):
    from assistant.backends.qwen_audio import QwenAudioBackend

    return QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clips():
    return golden_clips()


class Gate:
    """The real backend, except that `prepare` can be held: while closed, the worker waits inside it."""

    def __init__(self, backend):
        self._backend = backend
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prepare(self, utterances, audio_numbers):
        self.entered.set()
        if not self.opened.wait(WAIT_S):
            raise TimeoutError("test gate was never opened")
        return self._backend.prepare(utterances, audio_numbers)

    async def hold(self, engine: Engine, session: str = "gate") -> asyncio.Task:
        """Park the worker inside prepare; returns the parked turn's task (done after `release`)."""
        self.opened.clear()
        self.entered.clear()
        if session not in engine.session_ids:
            engine.open_session(session)
        key = f"gate{next(_gate_keys)}"
        task = asyncio.create_task(engine.add_user_turn(session, Utterance(key=key, text="hi")))
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)
        return task

    def release(self) -> None:
        self.opened.set()


_gate_keys = itertools.count()


async def _engine(backend, **engine_kw) -> Engine:
    reuse = engine_kw.pop("reuse", True)
    engine = Engine(backend, EngineConfig(**engine_kw), GEN, reuse_cache=reuse)
    await engine.start()
    return engine


async def _ask(engine: Engine, session: str, key: str, text=None, audio=None, n: int = 8) -> ResponseDone:
    await engine.add_user_turn(session, Utterance(key=key, text=text, audio=audio))
    stream = engine.respond(session, dataclasses.replace(GREEDY, max_new_tokens=n))
    return await asyncio.wait_for(stream.wait_done(), WAIT_S)


def _reference_ids(backend, prompt: Prompt, n: int) -> list[int]:
    params = sampling_params(GEN, GREEDY, getattr(backend, "default_sampling", None))
    return [s.token_id for s in generate_stream(backend, prompt, params, n) if s.token_id is not None]


TEXTS = ["Hello there, who are you?", "What is two plus two?", "Tell me a joke about cats and dogs please.", "Hi"]


async def test_batched_greedy_equals_unbatched_reference(qwen_backend):
    gate = Gate(qwen_backend)
    engine = await _engine(gate, max_active=4)
    try:
        for i in range(4):
            engine.open_session(f"s{i}")
        held = await gate.hold(engine)
        turns = [
            asyncio.create_task(engine.add_user_turn(f"s{i}", Utterance(f"u{i}", text=t))) for i, t in enumerate(TEXTS)
        ]
        await asyncio.sleep(0)  # let the turn tasks enqueue their prepares before the responds
        streams = [engine.respond(f"s{i}", dataclasses.replace(GREEDY, max_new_tokens=10)) for i in range(4)]
        gate.release()
        await held
        await asyncio.gather(*turns)
        dones = await asyncio.wait_for(asyncio.gather(*(s.wait_done() for s in streams)), WAIT_S)
        steps = engine._worker.steps
        decoded_rows, decode_s = engine.decode_totals()
    finally:
        await engine.stop()
    assert engine._worker.max_batch == 4  # all four decoded together
    # every output token after each answer's first came from one decode-step row (the first comes from the prefill)
    assert decoded_rows == sum(max(0, d.output_tokens - 1) for d in dones) + sum(d.status == "completed" for d in dones)
    assert decode_s > 0
    for done in dones:
        assert done.status in ("completed", "incomplete")
        assert done.output_ids == _reference_ids(qwen_backend, Prompt(ids=done.prompt_ids), 10)
    assert steps <= 10  # four answers of <= 10 tokens in <= 10 batched steps


async def test_deltas_concatenate_to_the_history_text(qwen_backend):
    engine = await _engine(qwen_backend)
    try:
        engine.open_session("s")
        await engine.add_user_turn("s", Utterance("u1", text="Say something long."))
        stream = engine.respond("s", dataclasses.replace(GREEDY, max_new_tokens=20))
        events = [e async for e in stream]
    finally:
        await engine.stop()
    done = events[-1]
    assert isinstance(done, ResponseDone) and all(isinstance(e, TextDelta) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == done.text
    assert done.output_tokens == len(done.output_ids) > 0 and done.input_tokens == len(done.prompt_ids)
    assert set(done.timings_ms) >= {"queue", "encode", "prefill", "first_token", "decode", "total"}


async def test_audio_turns_reuse_the_cache_and_match_a_fresh_prefill(qwen_backend, clips):
    engine = await _engine(qwen_backend)
    fresh = await _engine(qwen_backend, reuse=False)
    try:
        got, ref = [], []
        for eng, out in ((engine, got), (fresh, ref)):
            eng.open_session("s")
            out.append(await _ask(eng, "s", "item_1", audio=clips[0]))
            out.append(await _ask(eng, "s", "item_2", audio=clips[1]))
            out.append(await _ask(eng, "s", "item_3", text="And in one word?"))
    finally:
        await engine.stop()
        await fresh.stop()
    for a, b in zip(got, ref, strict=True):
        assert a.prompt_ids == b.prompt_ids and a.output_ids == b.output_ids
    assert [d.cached_tokens for d in ref] == [0, 0, 0]
    assert got[0].cached_tokens == 0
    for prev, cur in zip(got, got[1:], strict=False):
        # turn N reuses at least the whole previous prompt: it prefills only the new tokens
        assert cur.cached_tokens >= prev.input_tokens
        assert cur.input_tokens - cur.cached_tokens < cur.input_tokens - prev.input_tokens + prev.output_tokens + 2


def test_turn_n_logits_with_reuse_equal_a_fresh_prefill(qwen_backend, clips):
    b, lm = qwen_backend, qwen_backend.lm
    t1, t2 = b.prepare([Utterance("a1", audio=clips[0]), Utterance("a2", audio=clips[1])], [1, 2])
    with torch.inference_mode():
        p1 = b.build_prompt(b.default_system_prompt, [], t1, 6144)
        cache = lm.new_cache()
        logits = prefill_prompt(lm, cache, p1, 0)
        out = []
        for _ in range(5):  # a greedy reply, fed through the cache like the engine does
            out.append(int(logits[-1].argmax()))
            logits = lm.decode(lm.embed(torch.tensor(out[-1:])), [cache])
            cache.token_ids.append(out[-1])
        reply = b.tokenizer.decode_bytes(out).decode("utf-8", errors="replace")
        p2 = b.build_prompt(b.default_system_prompt, [Exchange(t1, reply)], t2, 6144)
        plan = plan_cache(cache, p2, lm.rope_alpha_for(len(p2.ids)))
        reused = prefill_prompt(lm, cache, p2, plan.reuse)
        full_cache = lm.new_cache()
        x = lm.embed(torch.tensor(p2.ids))
        for s in p2.audio:
            x[s.start : s.start + len(s.embeds)] = s.embeds
        full = lm.prefill(x, full_cache, all_logits=True)
    assert not plan.rebuilt and plan.reuse >= len(p1.ids)
    torch.testing.assert_close(reused[-1], full[-1], atol=1e-4, rtol=0)
    for layer in range(len(cache.k)):  # the cached keys/values equal those of the full prefill
        torch.testing.assert_close(
            cache.k[layer][:, : cache.length], full_cache.k[layer][:, : cache.length], atol=1e-4, rtol=0
        )


async def test_window_drops_oldest_turn_and_answers_equal_a_rebuild(qwen_backend):
    window = 70  # the system prompt (~10 tokens) plus about two short exchanges
    engine = await _engine(qwen_backend, max_window_tokens=window)
    fresh = await _engine(qwen_backend, max_window_tokens=window, reuse=False)
    questions = ["First question here?", "Second one, slightly longer than that?", "Third?", "Fourth and last?"]
    try:
        got, ref = [], []
        for eng, out in ((engine, got), (fresh, ref)):
            eng.open_session("s")
            for i, q in enumerate(questions):
                out.append(await _ask(eng, "s", f"q{i}", text=q))
        history = [ex.user.user_text for ex in engine._worker.conversations["s"].history]
    finally:
        await engine.stop()
        await fresh.stop()
    assert [d.output_ids for d in got] == [d.output_ids for d in ref]
    assert [d.prompt_ids for d in got] == [d.prompt_ids for d in ref]
    assert questions[0] not in history  # dropped from the window, and from the session for good
    dropped = [i for i in range(1, 4) if got[i].input_tokens < got[i - 1].input_tokens + 2]
    assert dropped, "the window never dropped a turn; lower `window`"
    for i in dropped:  # the prompt no longer starts like the cache: only the system prompt is kept
        assert got[i].cached_tokens < got[i - 1].input_tokens


async def test_ntk_alpha_change_rebuilds_the_cache(tiny_ntk_qwen_dir, clips):
    from assistant.backends.qwen_audio import QwenAudioBackend

    backend = QwenAudioBackend.from_checkpoint(tiny_ntk_qwen_dir, device="cpu", dtype="float32")
    engine = await _engine(backend)
    try:
        engine.open_session("s")
        first = await _ask(engine, "s", "t1", text="Hi")  # short: alpha 1 (seq_length 64)
        second = await _ask(engine, "s", "a1", audio=clips[1])  # > 64 tokens: alpha > 1, cache rebuilt
    finally:
        await engine.stop()
    assert backend.lm.rope_alpha_for(first.input_tokens) == 1.0
    assert backend.lm.rope_alpha_for(second.input_tokens) > 1.0
    assert second.cached_tokens == 0
    conv_prompt = backend.build_prompt(
        backend.default_system_prompt,
        [Exchange(backend.prepare([Utterance("t1", text="Hi")], [0])[0], first.text)],
        backend.prepare([Utterance("a1", audio=clips[1])], [1])[0],
        backend.max_window_tokens,
    )
    assert conv_prompt.ids == second.prompt_ids
    assert second.output_ids == _reference_ids(backend, conv_prompt, 8)


async def test_lru_eviction_keeps_answers_correct(qwen_backend):
    engine = await _engine(qwen_backend, cache_budget_tokens=60)  # room for about one idle conversation
    fresh = await _engine(qwen_backend, reuse=False)
    try:
        got, ref = {}, {}
        for eng, out in ((engine, got), (fresh, ref)):
            for s in ("a", "b", "c"):
                eng.open_session(s)
            for turn in range(2):
                for s in ("a", "b", "c"):
                    out[s, turn] = await _ask(eng, s, f"{s}{turn}", text=f"Question {turn} from {s}?")
    finally:
        await engine.stop()
        await fresh.stop()
    # Read the worker's state only once it has stopped: it enforces the budget just after pushing response.done.
    cached = sum(c.cache.length for c in engine._worker.conversations.values())
    prefix_tokens = engine._worker.prefixes.tokens
    assert {k: d.output_ids for k, d in got.items()} == {k: d.output_ids for k, d in ref.items()}
    # "a" was evicted while "b" and "c" spoke: only the shared system-prompt snapshot serves its next answer
    assert got["a", 1].cached_tokens == prefix_tokens
    assert cached + prefix_tokens <= 60


async def test_admission_limit_raises_server_busy_at_once(qwen_backend):
    gate = Gate(qwen_backend)
    engine = await _engine(gate, max_active=1, max_queued=1)
    try:
        for s in ("a", "b", "c"):
            engine.open_session(s)
            await engine.add_user_turn(s, Utterance(f"{s}1", text="Hello?"))
        held = await gate.hold(engine)
        first = engine.respond("a", GREEDY)
        second = engine.respond("b", GREEDY)
        with pytest.raises(ConversationBusy):
            engine.respond("a", GREEDY)
        with pytest.raises(ServerBusy):
            engine.respond("c", GREEDY)
        gate.release()
        await held
        done = await asyncio.wait_for(asyncio.gather(first.wait_done(), second.wait_done()), WAIT_S)
        third = await asyncio.wait_for(engine.respond("c", GREEDY).wait_done(), WAIT_S)  # slots are free again
    finally:
        await engine.stop()
    assert [d.status for d in done] != ["failed", "failed"] and third.status != "failed"
    assert engine.outstanding == 0


async def test_cancel_stops_within_one_step_frees_the_slot_and_keeps_partial_text(qwen_backend):
    class HeldDecode:
        """The real LM, except that its first `decode` (the step after the first token) waits until opened."""

        def __init__(self, lm):
            self._lm, self.entered, self.opened = lm, threading.Event(), threading.Event()

        def __getattr__(self, name):
            return getattr(self._lm, name)

        def decode(self, *args, **kwargs):
            if not self.entered.is_set():
                self.entered.set()
                if not self.opened.wait(WAIT_S):
                    raise TimeoutError("test hold was never opened")
            return self._lm.decode(*args, **kwargs)

    backend = Gate(qwen_backend)
    backend.lm = held = HeldDecode(qwen_backend.lm)  # the worker takes `backend.lm` when it starts
    engine = await _engine(backend, max_active=1, max_queued=0)
    try:
        for s in ("a", "b"):
            engine.open_session(s)
            await engine.add_user_turn(s, Utterance(f"{s}1", text="Please talk for a long time."))
        stream = engine.respond("a", dataclasses.replace(GREEDY, max_new_tokens=2000))
        assert await asyncio.to_thread(held.entered.wait, WAIT_S)  # the worker waits inside the second step
        produced = engine._worker.active[0].tokens.output_ids.copy()  # safe: the worker is parked
        with pytest.raises(ServerBusy):
            engine.respond("b", GREEDY)
        assert stream.cancel()
        held.opened.set()
        done = await asyncio.wait_for(stream.wait_done(), WAIT_S)
        other = await asyncio.wait_for(engine.respond("b", GREEDY).wait_done(), WAIT_S)
        history = engine._worker.conversations["a"].history
    finally:
        held.opened.set()
        await engine.stop()
    assert len(produced) == 1  # the first token, from the prefill
    assert done.status == "cancelled" and done.reason == "client_cancelled"
    assert done.output_ids[: len(produced)] == produced and len(done.output_ids) <= len(produced) + 1  # one step
    assert other.status in ("completed", "incomplete")
    assert len(history) == 1 and history[0].reply == done.text  # the partial answer, as the user heard it


async def test_cancel_before_any_text_keeps_the_turn_pending(qwen_backend):
    gate = Gate(qwen_backend)
    engine = await _engine(gate)
    try:
        engine.open_session("s")
        await engine.add_user_turn("s", Utterance("u1", text="First question?"))
        held = await gate.hold(engine)
        stream = engine.respond("s", GREEDY)
        stream.cancel("turn_detected")
        gate.release()
        await held
        cancelled = await asyncio.wait_for(stream.wait_done(), WAIT_S)
        done = await _ask(engine, "s", "u2", text="Second question?")
    finally:
        await engine.stop()
    assert cancelled.status == "cancelled" and cancelled.reason == "turn_detected" and cancelled.output_ids == []
    text = qwen_backend.tokenizer.decode_bytes(done.prompt_ids).decode()
    assert "First question?\nSecond question?" in text  # both pending turns answered together


async def test_failure_inside_the_model_ends_only_that_response(qwen_backend):
    class Broken(Gate):
        def build_prompt(self, system, history, turn, max_window_tokens):
            prompt = self._backend.build_prompt(system, history, turn, max_window_tokens)
            if "BREAK" in turn.user_text:  # an embedding of the wrong width: the model's prefill raises
                prompt.audio.append(AudioSpan(start=3, embeds=torch.zeros(2, 7), key="bad"))
            return prompt

    engine = await _engine(Broken(qwen_backend), max_active=4)
    try:
        engine.open_session("ok")
        engine.open_session("bad")
        results = await asyncio.gather(_ask(engine, "bad", "b1", text="BREAK"), _ask(engine, "ok", "o1", text="Hi"))
        again = await _ask(engine, "bad", "b2", text="Now fine?")
    finally:
        await engine.stop()
    assert results[0].status == "failed" and results[0].error
    assert results[1].status in ("completed", "incomplete")
    assert again.status in ("completed", "incomplete")


async def test_many_sessions_at_once(qwen_backend):
    engine = await _engine(qwen_backend, max_active=4, max_queued=12)
    try:

        async def conversation(i: int) -> list[ResponseDone]:
            engine.open_session(f"s{i}")
            return [await _ask(engine, f"s{i}", f"s{i}t{t}", text=f"Turn {t} of session {i}?", n=6) for t in (0, 1)]

        results = await asyncio.wait_for(asyncio.gather(*(conversation(i) for i in range(12))), WAIT_S)
        batch = engine._worker.max_batch
    finally:
        await engine.stop()
    assert batch > 1
    for dones in results:
        for done in dones:
            assert done.status in ("completed", "incomplete")
            assert done.output_ids == _reference_ids(qwen_backend, Prompt(ids=done.prompt_ids), 6)


async def test_bad_utterance_raises_to_its_caller_only(qwen_backend):
    engine = await _engine(qwen_backend)
    try:
        engine.open_session("s")
        with pytest.raises(Exception, match="at least 480 samples"):
            await engine.add_user_turn("s", Utterance("tiny", audio=np.zeros(10, dtype=np.float32)))
        done = await _ask(engine, "s", "u1", text="Still there?")
    finally:
        await engine.stop()
    assert done.status in ("completed", "incomplete")


async def test_stop_ends_every_outstanding_response(qwen_backend):
    gate = Gate(qwen_backend)
    engine = await _engine(gate)
    engine.open_session("s")
    await engine.add_user_turn("s", Utterance("u1", text="Hello?"))
    held = await gate.hold(engine)
    stream = engine.respond("s", GREEDY)
    stop = asyncio.create_task(engine.stop())
    gate.release()
    await held
    await asyncio.wait_for(stop, WAIT_S)
    done = await asyncio.wait_for(stream.wait_done(), WAIT_S)
    assert done.status == "cancelled" and done.reason == "shutdown"
    with pytest.raises(RuntimeError, match="not running"):
        engine.respond("s", GREEDY)


async def test_metrics_count_responses_and_phases(qwen_backend):
    from prometheus_client import REGISTRY

    def sample(name, labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = sample("assistant_engine_responses_total", {"status": "incomplete"})
    phases = sample("assistant_engine_phase_seconds_count", {"phase": "first_token"})
    engine = await _engine(qwen_backend)
    try:
        engine.open_session("s")
        done = await _ask(engine, "s", "u1", text="Count to fifty please.", n=3)
    finally:
        await engine.stop()
    assert sample("assistant_engine_responses_total", {"status": done.status}) >= 1
    if done.status == "incomplete":
        assert sample("assistant_engine_responses_total", {"status": "incomplete"}) == before + 1
    assert sample("assistant_engine_phase_seconds_count", {"phase": "first_token"}) == phases + 1


async def test_a_bad_utterance_in_a_batch_does_not_sink_the_others(qwen_backend, clips):
    gate = Gate(qwen_backend)
    engine = await _engine(gate)
    try:
        engine.open_session("bad")
        engine.open_session("good")
        held = await gate.hold(engine)
        bad = asyncio.create_task(engine.add_user_turn("bad", Utterance("b", audio=np.zeros(10, dtype=np.float32))))
        good = asyncio.create_task(engine.add_user_turn("good", Utterance("g", audio=clips[1])))
        await asyncio.sleep(0)
        gate.release()
        await held
        results = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), WAIT_S)
        done = await asyncio.wait_for(engine.respond("good", GREEDY).wait_done(), WAIT_S)
    finally:
        await engine.stop()
    assert isinstance(results[0], Exception) and results[1].audio_s > 2.0
    assert done.status in ("completed", "incomplete")
    assert "Audio 1:" in qwen_backend.tokenizer.decode_bytes(done.prompt_ids).decode()  # numbering not skewed


async def test_a_reply_cut_to_what_was_heard_is_what_the_next_prompt_holds(qwen_backend):
    engine = await _engine(qwen_backend, threads=1)
    try:
        engine.open_session("s")
        first = await _ask(engine, "s", "u1", text="Tell me something.", n=12)
        heard = first.text[: len(first.text) // 2]
        engine.truncate_reply("s", first.response_id, heard)
        engine.truncate_reply("gone", first.response_id, "")  # a closed session: ignored
        done = await _ask(engine, "s", "u2", text="And then?")
        threads = await engine.call(lambda b: torch.get_num_threads())
    finally:
        await engine.stop()
    prompt = qwen_backend.tokenizer.decode_bytes(done.prompt_ids).decode()
    assert heard.strip() in prompt and first.text not in prompt
    assert threads == 1  # `[engine] threads` is applied on the worker, which runs all model code
