"""Pure engine parts without a model: prefix reuse, cache plans, pending-turn merging, windowing, what was said
before (Whisper's previous text), LRU eviction, the bounded response stream and the UTF-8-safe text stream."""

from __future__ import annotations

import asyncio

import torch

from assistant.backends.base import AudioSpan, Exchange, PreparedTurn, Prompt
from assistant.engine.api import ResponseDone, TextDelta
from assistant.engine.conversation import Conversation, evict_lru, merge_turns, plan_cache, reusable_prefix
from assistant.engine.stream import ResponseStream
from assistant.models.kv_cache import KVCache

PAD = 7  # an audio placeholder id: identical for every audio, so only the span keys tell clips apart


def _cache(ids: list[int], segments: list[tuple[int, int, str]] = (), alpha: float = 1.0) -> KVCache:
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, dtype=torch.float32, capacity=4)
    cache.reserve(len(ids))
    cache.commit(len(ids))
    cache.token_ids = list(ids)
    cache.segment_keys = list(segments)
    cache.rope_alpha = alpha
    return cache


def _span(start: int, n: int, key: str) -> AudioSpan:
    return AudioSpan(start=start, embeds=torch.zeros(n, 2), key=key)


def test_prefix_is_the_common_id_prefix():
    cache = _cache([1, 2, 3, 4, 5])
    assert reusable_prefix(cache, Prompt(ids=[1, 2, 3, 9, 9, 9])) == 3
    assert reusable_prefix(cache, Prompt(ids=[1, 2, 3, 4, 5, 6, 7])) == 5
    assert reusable_prefix(cache, Prompt(ids=[8])) == 0


def test_same_placeholders_but_another_audio_is_not_reused():
    ids = [1, 2, 100, PAD, PAD, 101, 3]
    cache = _cache(ids, [(2, 6, "item_a")])
    same = Prompt(ids=ids + [4], audio=[_span(2, 4, "item_a")])
    other = Prompt(ids=ids + [4], audio=[_span(2, 4, "item_b")])
    assert reusable_prefix(cache, same) == 7
    assert reusable_prefix(cache, other) == 2  # up to the start of the differing audio


def test_prefix_never_ends_inside_an_audio_span():
    cache = _cache([1, 100, PAD, PAD])  # a cache cut off mid-span (e.g. cancelled or truncated bookkeeping)
    prompt = Prompt(ids=[1, 100, PAD, PAD, PAD, 101], audio=[_span(1, 5, "a")])
    assert reusable_prefix(cache, prompt) == 1


def test_plan_resets_on_ntk_alpha_change_and_truncates_otherwise():
    cache = _cache([1, 2, 3, 4], alpha=1.0)
    plan = plan_cache(cache, Prompt(ids=[1, 2, 3, 4, 5]), rope_alpha=3.0)
    assert (plan.reuse, plan.rebuilt, plan.reason, cache.length) == (0, True, "ntk_alpha", 0)

    cache = _cache([1, 2, 3, 4, 5, 6])
    plan = plan_cache(cache, Prompt(ids=[1, 2, 3, 9, 9]), rope_alpha=1.0)
    assert (plan.reuse, plan.rebuilt, cache.length, cache.token_ids) == (3, False, 3, [1, 2, 3])


def test_plan_recomputes_the_last_position_when_everything_is_cached():
    cache = _cache([1, 2, 3])
    plan = plan_cache(cache, Prompt(ids=[1, 2, 3]), rope_alpha=1.0)
    assert plan.reuse == 2 and cache.length == 2  # the last prompt position's logits pick the first token


def test_plan_rebuilds_when_the_window_dropped_the_first_turn():
    cache = _cache([5, 6, 10, 11, 20, 21])
    plan = plan_cache(cache, Prompt(ids=[9, 20, 21, 30]), rope_alpha=1.0)
    assert plan.rebuilt and plan.reuse == 0 and cache.length == 0


def _turn(key: str, text: str, embeds: dict | None = None, transcript: str | None = None) -> PreparedTurn:
    return PreparedTurn(key=key, user_text=text, transcript=transcript, audio_s=1.5, audio_embeds=embeds or {})


def test_pending_turns_are_answered_together_in_commit_order():
    a = _turn("i1", "Audio 1: <audio>i1</audio>\nQ", {"i1": torch.ones(3, 2)}, "hello")
    b = _turn("i2", "Audio 2: <audio>i2</audio>\nQ", {"i2": torch.zeros(4, 2)}, "there")
    merged = merge_turns([a, b])
    assert merged.user_text == a.user_text + "\n" + b.user_text
    assert set(merged.audio_embeds) == {"i1", "i2"}
    assert merged.transcript == "hello there" and merged.audio_s == 3.0
    assert merge_turns([a]) is a


def test_window_drops_oldest_exchanges_for_good():
    conv = Conversation("s", "sys", _cache([]))
    for i in range(4):
        conv.record(_turn(f"i{i}", f"q{i}"), f"r{i}")
    conv.keep_window(2)
    assert [e.reply for e in conv.history] == ["r2", "r3"]
    conv.keep_window(5)  # more room later does not bring anything back
    assert len(conv.history) == 2 and isinstance(conv.history[0], Exchange)


def test_restore_pending_puts_unanswered_turns_first():
    conv = Conversation("s", "sys", _cache([]))
    conv.add_pending(_turn("i1", "a"), 5.0)
    turns, encode_ms = conv.take_pending()
    conv.add_pending(_turn("i2", "b"), 1.0)
    conv.restore_pending(turns, encode_ms)
    assert [t.key for t in conv.pending] == ["i1", "i2"] and conv.pending_encode_ms == 6.0


def test_lru_eviction_skips_busy_sessions_and_stops_under_budget():
    convs = [Conversation(f"s{i}", "sys", _cache(list(range(10)))) for i in range(4)]
    for i, c in enumerate(convs):
        c.last_used_s = float(i)
    convs[0].busy = True  # oldest, but its cache is in use
    evicted = evict_lru(convs, budget_tokens=20)
    assert evicted == ["s1", "s2"]
    assert [c.cache.length for c in convs] == [10, 0, 0, 10]
    assert evict_lru(convs, budget_tokens=20) == []


def _done(rid: str = "r") -> ResponseDone:
    return ResponseDone(rid, "completed", None, "", [], [], 0, 0, {})


async def test_stream_is_bounded_by_merging_deltas_and_ends_with_done():
    loop = asyncio.get_running_loop()
    stream = ResponseStream("r", "s", loop, max_items=3, cancel_fn=lambda rid, reason: True)
    for piece in "abcdef":
        stream.push(TextDelta(piece))
    stream.push(_done())
    stream.push(TextDelta("after done is ignored"))
    events = [e async for e in stream]
    assert len(events) == 4 and isinstance(events[-1], ResponseDone)
    assert "".join(e.text for e in events[:-1]) == "abcdef"


async def test_stream_wakes_the_loop_from_another_thread():
    loop = asyncio.get_running_loop()
    stream = ResponseStream("r", "s", loop, max_items=8, cancel_fn=lambda rid, reason: True)

    def produce():
        for piece in ("x", "y"):
            stream.push(TextDelta(piece))
        stream.push(_done())

    await asyncio.to_thread(produce)
    done = await stream.wait_done()
    assert done.status == "completed"


def test_a_reply_cut_to_what_was_heard_replaces_it_and_nothing_heard_reopens_the_turn():
    conv = Conversation("s", "sys", _cache([]))
    q1, q2 = PreparedTurn(key="q1", user_text="Tell me about Paris."), PreparedTurn(key="q2", user_text="And Rome?")
    conv.record(q1, "Paris is the capital of France. It has many museums.", "resp_1")
    conv.record(q2, "Rome is the capital of Italy.", "resp_2")
    assert conv.truncate_reply("resp_1", "Paris is the capital of France. ")
    assert [ex.reply for ex in conv.history] == ["Paris is the capital of France.", "Rome is the capital of Italy."]
    assert not conv.truncate_reply("resp_gone", "x")  # fell out of the window, or never recorded
    # the newest answer was not heard at all: its question is answered again with the next response
    assert conv.truncate_reply("resp_2", "")
    assert [ex.user.key for ex in conv.history] == ["q1"] and [t.key for t in conv.pending] == ["q2"]
    # an older answer heard not at all stays, empty (later turns already built on it)
    conv.record(q2, "Rome.", "resp_3")
    assert conv.truncate_reply("resp_1", "") and conv.history[0].reply == ""


def test_said_before_is_every_transcript_so_far_and_a_speculation_needs_the_same():
    """Whisper's previous text (`Utterance.previous_text`): the transcripts of the answered turns (merged ones one by
    one), then of the pending ones; typed turns have none. A speculation told another text is not the commit's."""
    import numpy as np

    from assistant.backends.base import Utterance
    from assistant.engine.conversation import Speculation

    conv = Conversation("s", "sys", _cache([]))
    assert conv.said_before() == ""
    conv.record([_turn("i1", "Audio 1", transcript="My sister is Emma."), _turn("i2", "x", transcript=" ")], "OK.")
    conv.record(_turn("t1", "typed only"), "Sure.")
    conv.add_pending(_turn("i3", "Audio 2", transcript="She lives in Paris."), 1.0)
    assert conv.said_before() == "My sister is Emma. She lives in Paris."
    audio = np.zeros(1600, dtype=np.float32)
    spec = Speculation(Utterance("i4", audio=audio, previous_text=conv.said_before()), 3, _turn("i4", "q"), 1.0)
    assert spec.matches(Utterance("i4", audio=audio.copy(), previous_text="My sister is Emma. She lives in Paris."))
    assert not spec.matches(Utterance("i4", audio=audio, previous_text="My sister is Emma."))
