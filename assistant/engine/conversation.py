"""Per-session conversation state and KV-cache bookkeeping (pure and synchronous; no threads, no event loop).

A `Conversation` owns what one session has said and heard: the system text, the finished exchanges (the rolling
history), the user turns not answered yet, the count of audios so far ("Audio k:" numbering) and the session's
`KVCache`, which is kept between turns so a new turn prefills only its new tokens.

Decisions written down here because callers rely on them:
- Several user turns before one response (push-to-talk committed twice) are answered together: `take_pending()`
  merges them into one user message (texts joined by a newline, audio spans of all of them), in commit order.
- History is a rolling window: the backend's `build_prompt` keeps the newest exchanges that fit the token budget
  (the system prompt always stays); exchanges that fell out of the window are dropped here for good, since adding
  turns only grows the newer part, so they can never fit again.
- Cache reuse: the longest prefix of the new prompt that equals what the cache holds (token ids, and for audio
  placeholder runs the same audio key at the same place) is kept, the rest is truncated and prefilled. A cache whose
  dynamic-NTK alpha differs from the one the new prompt needs is reset, so results equal a fresh prefill.
- What was heard: a spoken answer cut short (barge-in, `conversation.item.truncate`) keeps in the history only the
  text the listener heard (`truncate_reply`, by the response id each exchange records); the cache follows by the
  prefix rule above.
- Items a client deletes (`delete_item`): a user turn leaves the pending turns or its exchange (the others of a
  merged message stay), a reply loses its text and calls; an exchange left empty goes.
- Speculative turns (`speculative`): audio work done before the turn was committed, kept aside by key. They are not
  part of the conversation (no pending turn, no "Audio k" number taken, nothing in the cache) until confirmed, and
  a reset or close forgets them. At most `MAX_SPECULATIONS` are kept per session (oldest dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from assistant.backends.base import AudioSpan, Exchange, PreparedTurn, Prompt, Utterance
from assistant.backends.tools import ToolCall
from assistant.models.kv_cache import KVCache

MAX_SPECULATIONS = 2  # per session: the server keeps one; a misbehaving caller cannot grow this without bound


@dataclass
class Speculation:
    """A user turn prepared before its commit: reusable only for an identical utterance and the same audio number."""

    utterance: Utterance
    audio_number: int  # the "Audio k" number it was rendered with
    turn: PreparedTurn
    encode_ms: float

    def matches(self, utt: Utterance, heard: Callable[[np.ndarray], np.ndarray] | None = None) -> bool:
        """`utt` is the turn this speculation prepared: same key, text, language, prompts, and the same
        audio, or audio the backend hears alike (`heard`: the backend's `heard_audio`, what its recogniser takes of
        a clip; a speculation started before the trailing padding was complete lacks some silence the recogniser
        trims)."""
        mine = self.utterance
        if any(getattr(mine, f) != getattr(utt, f) for f in ("key", "text", "language", "prompt", "previous_text")):
            return False
        if (mine.audio is None) != (utt.audio is None):
            return False
        if mine.audio is None or np.array_equal(mine.audio, utt.audio):  # (arrays of other shapes are not equal)
            return True
        return heard is not None and np.array_equal(heard(mine.audio), heard(utt.audio))


def merge_turns(turns: list[PreparedTurn]) -> PreparedTurn:
    """One user message answering several pending turns together (see the module docstring)."""
    if not turns:
        raise ValueError("merge_turns: expected at least one pending user turn, got none")
    if len(turns) == 1:
        return turns[0]
    embeds: dict = {}
    for t in turns:
        embeds.update(t.audio_embeds)
    transcripts = [t.transcript for t in turns if t.transcript]
    languages = [t.language for t in turns if t.language]
    return PreparedTurn(
        key=turns[-1].key,
        user_text="\n".join(t.user_text for t in turns if t.user_text or not t.outputs),
        transcript=" ".join(transcripts) if transcripts else None,
        language=languages[-1] if languages else None,
        audio_s=sum(t.audio_s for t in turns),
        audio_embeds=embeds,
        audio_wavs=tuple(w for t in turns for w in t.audio_wavs),
        outputs=tuple(o for t in turns for o in t.outputs),
    )


def _span_bounds(span: AudioSpan) -> tuple[int, int]:
    return span.start, span.start + int(span.embeds.shape[0])


def reusable_prefix(cache: KVCache, prompt: Prompt) -> int:
    """How many leading positions of `prompt` the cache already holds with identical content.

    Token ids must match, and every audio run that starts inside the shared prefix must be the same audio (same key,
    same start and end) on both sides: placeholder ids are identical for every audio, so ids alone cannot tell two
    clips apart. The result never falls strictly inside an audio span of the prompt (a span is spliced whole).
    """
    cached = cache.token_ids[: cache.length]
    n = 0
    limit = min(len(cached), len(prompt.ids))
    while n < limit and cached[n] == prompt.ids[n]:
        n += 1
    prompt_spans = {(*_span_bounds(s), s.key) for s in prompt.audio}
    cache_spans = set(cache.segment_keys)
    for start, end, key in cache_spans:
        if start < n and (start, end, key) not in prompt_spans:
            n = min(n, start)
    for start, end, key in prompt_spans:
        if start < n and ((start, end, key) not in cache_spans or end > n):
            n = min(n, start)
    return n


@dataclass
class CachePlan:
    """What a respond must prefill: `reuse` cached positions are kept, `prompt.ids[reuse:]` are new."""

    reuse: int
    rebuilt: bool  # the cache was reset (NTK alpha change) or nothing was reusable
    reason: str  # "prefix" | "ntk_alpha" | "empty" | "diverged" | "system_prefix" (shared snapshot, worker)


def plan_cache(cache: KVCache, prompt: Prompt, rope_alpha: float) -> CachePlan:
    """Decide how much of `cache` serves `prompt` and truncate the cache to exactly that (mutates `cache`)."""
    if cache.length and cache.rope_alpha != rope_alpha:
        cache.reset()
        return CachePlan(0, True, "ntk_alpha")
    if cache.length == 0:
        cache.reset()
        return CachePlan(0, True, "empty")
    reuse = reusable_prefix(cache, prompt)
    if reuse >= len(prompt.ids):
        # the whole prompt is cached: recompute the last position anyway, its logits choose the first token
        reuse = len(prompt.ids) - 1
        while any(s < reuse < e for s, e, _ in cache.segment_keys):
            reuse -= 1
    if reuse == 0:
        cache.reset()
        return CachePlan(0, True, "diverged")
    cache.truncate(reuse)
    return CachePlan(reuse, False, "prefix")


@dataclass
class Conversation:
    """State of one session (see the module docstring). Used only on the engine's worker thread after opening."""

    session_id: str
    system: str
    cache: KVCache
    history: list[Exchange] = field(default_factory=list)
    pending: list[PreparedTurn] = field(default_factory=list)
    pending_encode_ms: float = 0.0  # audio work of the pending turns (goes into the response's timings)
    audio_count: int = 0  # audios so far, for "Audio k:" numbering (across the whole conversation)
    last_used_s: float = field(default_factory=time.monotonic)
    busy: bool = False  # a response is queued or running
    closed: bool = False
    speculative: dict[str, Speculation] = field(default_factory=dict)  # key -> prepared, not yet committed

    def add_speculation(self, spec: Speculation) -> None:
        self.speculative.pop(spec.utterance.key, None)
        while len(self.speculative) >= MAX_SPECULATIONS:
            del self.speculative[next(iter(self.speculative))]
        self.speculative[spec.utterance.key] = spec

    def said_before(self) -> str:
        """What the user said so far, as heard: the transcripts of the turns in the history, then of the pending ones
        (`Utterance.previous_text` of the next spoken turn)."""
        turns = [t for ex in self.history for t in ex.turns] + self.pending
        return " ".join(t.transcript.strip() for t in turns if t.transcript and t.transcript.strip())

    def next_audio_number(self) -> int:
        self.audio_count += 1
        return self.audio_count

    def add_pending(self, turn: PreparedTurn, encode_ms: float) -> None:
        self.pending.append(turn)
        self.pending_encode_ms += encode_ms

    def take_pending(self) -> tuple[list[PreparedTurn], float]:
        turns, encode_ms = self.pending, self.pending_encode_ms
        self.pending, self.pending_encode_ms = [], 0.0
        return turns, encode_ms

    def restore_pending(self, turns: list[PreparedTurn], encode_ms: float) -> None:
        """Put turns back in front (a response ended before saying anything): they are answered next time."""
        self.pending = turns + self.pending
        self.pending_encode_ms += encode_ms

    def keep_window(self, history_kept: int) -> None:
        """Drop exchanges that fell out of the window (`Prompt.history_kept` newest ones stay)."""
        if history_kept < len(self.history):
            del self.history[: len(self.history) - history_kept]

    def record(
        self,
        turns: PreparedTurn | list[PreparedTurn],
        reply: str,
        response_id: str | None = None,
        calls: tuple[ToolCall, ...] = (),
    ) -> None:
        """An answer ended: its turns (merged into one user message) and its reply text and function calls."""
        turns = [turns] if isinstance(turns, PreparedTurn) else list(turns)
        self.history.append(Exchange(merge_turns(turns), reply, response_id, calls, turns))

    def delete_item(self, key: str | None = None, response_id: str | None = None) -> bool:
        """`conversation.item.delete`: the user turn `key` (pending or answered) or the reply of `response_id` (its
        text and calls) leaves every later prompt. An exchange left with neither turns nor reply goes. False when
        nothing matched (never entered, or already out of the window)."""
        if key is not None:
            for i, turn in enumerate(self.pending):
                if turn.key == key:
                    del self.pending[i]
                    return True
        for i, ex in enumerate(self.history):
            if key is not None and any(t.key == key for t in ex.turns):
                ex.turns = [t for t in ex.turns if t.key != key]
                ex.user = merge_turns(ex.turns) if ex.turns else PreparedTurn(key=key, user_text="")
            elif response_id is not None and ex.response_id == response_id:
                ex.reply, ex.calls = "", ()
            else:
                continue
            if not ex.turns and not ex.reply and not ex.calls:
                del self.history[i]
            return True
        return False

    def truncate_reply(self, response_id: str, text: str) -> bool:
        """The listener heard only `text` of the reply of `response_id` (a spoken answer cut short): the history keeps
        that. Nothing heard at all, for the newest exchange with no response running: its turn goes back to pending
        and is answered with the next response, as for an answer cancelled before it said anything. False when
        that exchange is no longer in the history (it fell out of the window, or a reset forgot it)."""
        for i, ex in enumerate(self.history):
            if ex.response_id != response_id:
                continue
            if not text.strip() and i == len(self.history) - 1 and not self.busy:
                del self.history[i]
                self.pending[:0] = ex.turns or [ex.user]
            else:
                ex.reply = text.strip()
            return True
        return False

    def reset(self) -> None:
        """`conversation.reset`: forget history, pending turns, audio numbering and the cache."""
        self.history.clear()
        self.pending.clear()
        self.pending_encode_ms = 0.0
        self.audio_count = 0
        self.speculative.clear()
        self.cache.release()

    def touch(self) -> None:
        self.last_used_s = time.monotonic()


def evict_lru(conversations: list[Conversation], budget_tokens: int) -> list[str]:
    """Release caches of idle conversations, least recently used first, until all caches hold <= budget tokens.

    Busy conversations are never evicted (their caches are in use). Returns the evicted session ids.
    """
    total = sum(c.cache.length for c in conversations)
    evicted: list[str] = []
    for conv in sorted((c for c in conversations if not c.busy and c.cache.length), key=lambda c: c.last_used_s):
        if total <= budget_tokens:
            break
        total -= conv.cache.length
        conv.cache.release()
        evicted.append(conv.session_id)
    return evicted
