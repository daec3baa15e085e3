"""Shared system-prompt snapshots (`assistant.engine.prefix_cache`) on the tiny random Qwen-Audio checkpoints: a new
session's first answer with a snapshot equals a fresh full prefill, different instructions never share one, the NTK
alpha must match, and eviction / reset / a tiny cache budget keep answers correct."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from assistant.backends.base import PreparedTurn
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine.api import ResponseDone, ResponseOptions
from assistant.engine.decoding import prefill_prompt
from assistant.engine.engine import Engine
from assistant.engine.prefix_cache import PrefixSnapshots
from assistant.models.kv_cache import KVCache

WAIT_S = 120.0  # the one timeout every wait in this file derives from
GEN = GenerationConfig(greedy=True, max_new_tokens=8)
GREEDY = ResponseOptions(greedy=True)
LONG = "Please describe, in a few careful sentences, " + "the weather and the sea and the sky, " * 6  # > 64 tokens


@pytest.fixture(scope="module")
def backend(tiny_qwen_dir):
    from assistant.backends.qwen_audio import QwenAudioBackend

    return QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ntk_backend(tiny_ntk_qwen_dir):
    from assistant.backends.qwen_audio import QwenAudioBackend

    return QwenAudioBackend.from_checkpoint(tiny_ntk_qwen_dir, device="cpu", dtype="float32")


async def _engine(backend, **engine_kw) -> Engine:
    reuse = engine_kw.pop("reuse", True)
    engine = Engine(backend, EngineConfig(**engine_kw), GEN, reuse_cache=reuse)
    await engine.start()
    return engine


async def _ask(engine: Engine, session: str, key: str, text: str, instructions: str | None = None) -> ResponseDone:
    from assistant.backends.base import Utterance

    if session not in engine.session_ids:
        engine.open_session(session, instructions)
    await engine.add_user_turn(session, Utterance(key=key, text=text))
    stream = engine.respond(session, dataclasses.replace(GREEDY, max_new_tokens=8))
    return await asyncio.wait_for(stream.wait_done(), WAIT_S)


async def _fresh_answers(backend, questions: list[tuple[str, str, str | None]]) -> list[ResponseDone]:
    """Each (session, text, instructions) answered by an engine that prefills every prompt whole."""
    fresh = await _engine(backend, reuse=False)
    try:
        return [await _ask(fresh, s, f"{s}{i}", t, ins) for i, (s, t, ins) in enumerate(questions)]
    finally:
        await fresh.stop()


def _prompt(backend, system: str, text: str):
    return backend.build_prompt(system, [], PreparedTurn(key="k", user_text=text), backend.max_window_tokens)


def test_restored_snapshot_logits_equal_a_full_prefill(backend):
    lm, system = backend.lm, backend.default_system_prompt
    snaps = PrefixSnapshots(backend, backend.max_window_tokens)
    p1, p2 = _prompt(backend, system, "Hello there, who are you?"), _prompt(backend, system, "What is two plus two?")
    n = snaps.boundary(system)
    assert 0 < n < min(len(p1.ids), len(p2.ids)) and p1.ids[:n] == p2.ids[:n] and p1.ids[n] != p2.ids[n]
    with torch.inference_mode():
        first = lm.new_cache()
        prefill_prompt(lm, first, p1, 0)
        alpha = lm.rope_alpha_for(len(p2.ids))
        assert snaps.store(system, p1, lm.rope_alpha_for(len(p1.ids)), first) and len(snaps) == 1
        assert snaps.tokens == n
        cache = lm.new_cache()
        assert snaps.restore(system, p2, alpha, cache) == n
        got = prefill_prompt(lm, cache, p2, n)
        full_cache = lm.new_cache()
        full = lm.prefill(lm.embed(torch.tensor(p2.ids)), full_cache)
    torch.testing.assert_close(got[-1], full[-1], atol=1e-4, rtol=0)
    assert cache.token_ids == p2.ids and cache.length == len(p2.ids)
    for layer in range(len(cache.k)):
        torch.testing.assert_close(
            cache.k[layer][:, : cache.length], full_cache.k[layer][:, : cache.length], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            cache.v[layer][:, : cache.length], full_cache.v[layer][:, : cache.length], atol=1e-4, rtol=0
        )


def test_copy_prefix_from_rejects_a_mismatched_cache(backend):
    cache = backend.lm.new_cache()
    other = KVCache(cache.n_layers, cache.n_kv_heads, cache.head_dim * 2, cache.dtype)
    with pytest.raises(ValueError, match="differs"):
        cache.copy_prefix_from(other, 0)
    with pytest.raises(ValueError, match="outside"):
        cache.copy_prefix_from(backend.lm.new_cache(), 1)


async def test_new_sessions_share_the_system_prefix_and_answer_like_a_full_prefill(backend):
    questions = [("a", "Hello there, who are you?", None), ("b", "What is two plus two?", None), ("c", "Hi", None)]
    engine = await _engine(backend)
    try:
        got = [await _ask(engine, s, f"{s}{i}", t, ins) for i, (s, t, ins) in enumerate(questions)]
        n = engine._worker.prefixes.boundary(backend.default_system_prompt)
        snapshots = len(engine._worker.prefixes)
    finally:
        await engine.stop()
    ref = await _fresh_answers(backend, questions)
    assert [d.prompt_ids for d in got] == [d.prompt_ids for d in ref]
    assert [d.output_ids for d in got] == [d.output_ids for d in ref]
    assert [d.cached_tokens for d in got] == [0, n, n] and n > 0
    assert snapshots == 1


async def test_different_instructions_never_share_a_snapshot(backend):
    pirate, poet = "You are a pirate. Answer like one.", "You are a poet. Answer in verse."
    questions = [("a", "Hello?", pirate), ("b", "Hello?", poet), ("c", "Hello?", pirate), ("d", "Hello?", None)]
    engine = await _engine(backend)
    try:
        got = [await _ask(engine, s, f"{s}{i}", t, ins) for i, (s, t, ins) in enumerate(questions)]
        snaps = engine._worker.prefixes
        keys = list(snaps._snapshots)
        n_pirate = snaps.boundary(pirate)
    finally:
        await engine.stop()
    ref = await _fresh_answers(backend, questions)
    assert [d.output_ids for d in got] == [d.output_ids for d in ref]
    # only the second pirate session finds a snapshot: the poet and the default system render other tokens
    assert [d.cached_tokens for d in got] == [0, 0, n_pirate, 0]
    assert len(keys) == 3 and len({k[0] for k in keys}) == 3


async def test_ntk_never_copies_a_snapshot_of_another_alpha(ntk_backend):
    lm = ntk_backend.lm
    questions = [("a", "Hi", None), ("b", LONG, None), ("c", LONG + " Thanks.", None), ("d", "Hey", None)]
    engine = await _engine(ntk_backend)
    try:
        got = [await _ask(engine, s, f"{s}{i}", t, ins) for i, (s, t, ins) in enumerate(questions)]
        alphas = sorted(k[1] for k in engine._worker.prefixes._snapshots)
        n = engine._worker.prefixes.boundary(ntk_backend.default_system_prompt)
    finally:
        await engine.stop()
    ref = await _fresh_answers(ntk_backend, questions)
    short, long_ = lm.rope_alpha_for(got[0].input_tokens), lm.rope_alpha_for(got[1].input_tokens)
    assert short == 1.0 and long_ > 1.0 and lm.rope_alpha_for(got[2].input_tokens) == long_
    assert [d.output_ids for d in got] == [d.output_ids for d in ref]
    # "b" needs another alpha than the only snapshot: full prefill; "c" and "d" find the snapshot of their alpha
    assert [d.cached_tokens for d in got] == [0, 0, n, n]
    assert alphas == [1.0, long_]


async def test_eviction_reset_and_a_tiny_budget_stay_correct(backend):
    questions = [(s, f"Question {turn} from {s}?", None) for turn in range(2) for s in ("a", "b", "c")]
    for budget in (60, 1):  # 60: sessions are evicted, the snapshot stays; 1: the snapshot is dropped too
        engine = await _engine(backend, cache_budget_tokens=budget)
        try:
            got = [await _ask(engine, s, f"{s}{i}", t, ins) for i, (s, t, ins) in enumerate(questions)]
            engine.reset_session("a")
            after_reset = await _ask(engine, "a", "a-reset", "Question 0 from a?")
        finally:
            await engine.stop()
        # Read the worker's state only once it has stopped: it enforces the budget just after pushing response.done.
        w = engine._worker
        n = w.prefixes.boundary(backend.default_system_prompt)
        held = sum(c.cache.length for c in w.conversations.values()) + w.prefixes.tokens
        snapshots = len(w.prefixes)
        ref = await _fresh_answers(backend, questions)
        assert [d.output_ids for d in got] == [d.output_ids for d in ref]
        assert after_reset.output_ids == ref[0].output_ids
        assert held <= budget
        if budget == 60:
            assert got[3].cached_tokens == n  # "a" was evicted: its second answer starts from the snapshot
            assert after_reset.cached_tokens == n and snapshots == 1
        else:
            assert after_reset.cached_tokens == 0 and snapshots == 0
