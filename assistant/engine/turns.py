"""User-turn preparation on the worker, in bounded steps: chunks, "Audio k" numbering, speculative turns, turn length.

`TurnQueue` holds the audio work of user turns in command order, with the few commands that must stay in order with
it (a reset of a session that has turns queued, a `call` while anything is queued). The worker runs one `step()`
per loop iteration, between draining its commands and one batched decode step, so a cancel, a close or a running
answer waits for at most one step of audio work, never for a whole burst of turns:
- a chunk is at most `backend.prepare_batch` consecutive turns (default `PREPARE_BATCH`); its audio work runs as the
  steps of `prepare_steps` when the backend's class defines it (a generator that yields between bounded pieces of
  work: the embedded backend's Whisper encodes one 30 s window per step, then decodes the chunk), else as one
  `backend.prepare` call;
- "Audio k" numbers are taken in command order when a chunk starts; a speculation renders with the number it would
  take, without taking it, and is kept aside in `Conversation.speculative`; a confirmed turn reuses its speculation
  when the utterance is identical and its number unchanged;
- a failing chunk is rolled back and its turns are retried one per chunk, so one bad utterance cannot sink others;
- a response waits while its session has turns (or a reset) queued before it (`blocks`): it answers its turns;
- a user turn over `max_turn_tokens` is refused with `TurnTooLong` and nothing enters the conversation: typed text
  over `CHARS_PER_TOKEN` characters per token at once, before any tokenizing; typed text over the limit in tokens
  before its chunk takes numbers; a transcript (with its typed text) over the limit once it is known.
Worker thread only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain

from assistant.backends.base import Backend, PreparedTurn, Steps, Utterance
from assistant.engine import metrics
from assistant.engine.api import TurnInfo, TurnTooLong, UnknownSession
from assistant.engine.commands import PrepareCmd, SpeculateCmd, ms_between, refuse_stopped
from assistant.engine.conversation import Conversation, Speculation

log = logging.getLogger("assistant.engine")

PREPARE_BATCH = 8  # turns per chunk for a backend that does not say (`prepare_batch`)
CHARS_PER_TOKEN = 16  # typed text longer than max_turn_tokens * this is refused before it is tokenized


@dataclass
class TurnWork:
    """A prepare or speculate command with the conversation it names (looked up by the worker)."""

    cmd: PrepareCmd | SpeculateCmd
    conv: Conversation
    seq: int  # position in command order (`TurnQueue.blocks`)
    alone: bool = False  # its chunk failed: retried in a chunk of its own
    dropped: bool = False  # a speculation discarded while its chunk ran: its result is thrown away
    utterance: Utterance | None = None  # as prepared: the command's, told what was said before (when its chunk starts)

    @property
    def speculative(self) -> bool:
        return isinstance(self.cmd, SpeculateCmd)

    @property
    def key(self) -> str:
        return self.cmd.utterance.key

    def live(self) -> bool:
        if self.speculative:
            return not self.conv.closed
        return not self.cmd.reply.done()

    def refuse(self, err: Exception) -> None:
        """The work will not be done: a turn's caller gets `err`; a speculation's listener (`heard`) gets None."""
        if self.speculative:
            self.heard(None)
        elif not self.cmd.reply.done():
            self.cmd.reply.set_exception(err)

    def heard(self, info: TurnInfo | None) -> None:
        fut = self.cmd.heard if isinstance(self.cmd, SpeculateCmd) else None
        if fut is not None and not fut.done():
            fut.set_result(info)


@dataclass
class Ordered:
    """A command kept in order with the queued turns: it runs when it reaches the head of the queue."""

    seq: int
    conv: Conversation | None  # a reset names its session; a call none (it waits for everything queued before it)
    run: Callable[[], None]
    refuse: Callable[[], None]  # the engine stopped before it ran
    speculative = False


@dataclass
class Chunk:
    """Turns whose audio work runs together, in steps."""

    plan: list[tuple[TurnWork, int, Speculation | None]]  # work, its "Audio k" number, the speculation it reuses
    counts: dict[int, tuple[Conversation, int]]  # audio counts before the chunk took numbers (to roll back)
    steps: Steps | None  # None: every turn reuses a speculation, no audio work
    started_s: float
    busy_s: float = 0.0  # time spent in its steps (its turns' `encode` timing)
    todo: list[TurnWork] = field(default_factory=list)  # the works `steps` prepares, in order

    @property
    def works(self) -> list[TurnWork]:
        return [w for w, _, _ in self.plan]


def _take_speculation(w: TurnWork, number: int, backend: Backend) -> Speculation | None:
    """The confirmed turn's speculation if it is still valid: the same utterance (as the backend hears it), the
    same "Audio k" number."""
    spec = w.conv.speculative.pop(w.key, None)
    if spec is None:
        return None
    if spec.matches(w.utterance, getattr(backend, "heard_audio", None)) and spec.audio_number == number:
        metrics.SPECULATIONS.labels(outcome="confirmed").inc()
        return spec
    metrics.SPECULATIONS.labels(outcome="missed").inc()
    return None


def _whole(backend: Backend, utterances: list[Utterance], audio_numbers: list[int]) -> Steps:
    """`backend.prepare` as one step."""
    yield from ()
    return backend.prepare(utterances, audio_numbers)


class TurnQueue:
    """The worker's queue of user-turn work (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        max_turn_tokens: int,
        on_speculation: Callable[[Conversation, PreparedTurn], None] | None = None,
    ):
        self.backend = backend
        self.max_turn_tokens = max_turn_tokens
        self.on_speculation = on_speculation  # called when a speculation is ready (the worker's speculative prefill)
        self.batch = max(1, int(getattr(backend, "prepare_batch", PREPARE_BATCH)))
        self.items: deque[TurnWork | Ordered] = deque()
        self.running: Chunk | None = None
        self._seq = 0
        self.chunks = 0  # chunks started (tests, bench)
        self.longest_step_s = 0.0  # the longest step of audio work so far (bench)

    @property
    def idle(self) -> bool:
        return not self.items and self.running is None

    def mark(self) -> int:
        """The sequence number of the next command: a response records it and waits for the turns before it."""
        return self._seq

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _queued(self) -> Iterable[TurnWork | Ordered]:
        return chain(self.running.works if self.running else (), self.items)

    def blocks(self, conv: Conversation, seq: int) -> bool:
        """True while `conv` has a user turn or a reset queued or running from before `seq`."""
        return any(w.conv is conv and w.seq < seq and not w.speculative for w in self._queued())

    # ---- commands -----------------------------------------------------------------------------------------------
    def add(self, cmd: PrepareCmd | SpeculateCmd, conv: Conversation) -> None:
        output = cmd.utterance.output
        text = (cmd.utterance.text or "") + (output.output if output is not None else "")
        if len(text) > self.max_turn_tokens * CHARS_PER_TOKEN:
            if isinstance(cmd, PrepareCmd) and not cmd.reply.done():
                cmd.reply.set_exception(TurnTooLong.characters(len(text), self.max_turn_tokens, CHARS_PER_TOKEN))
            return  # a speculation of it would be refused at its confirm anyway
        if isinstance(cmd, PrepareCmd) and cmd.confirm:
            # its speculation has not run yet: no head start left, the confirm does the work itself
            self._drop_unrun(conv, cmd.utterance.key, "missed")
        self.items.append(TurnWork(cmd, conv, self._next_seq()))

    def discard(self, conv: Conversation, key: str) -> None:
        """Forget the speculations of `key`: not yet run (it never runs), running (its result is dropped), done."""
        self._drop_unrun(conv, key, "discarded")
        for w in self.running.works if self.running else ():
            if w.speculative and w.conv is conv and w.key == key and not w.dropped:
                w.dropped = True
                w.heard(None)
                metrics.SPECULATIONS.labels(outcome="discarded").inc()
        if conv.speculative.pop(key, None) is not None:
            metrics.SPECULATIONS.labels(outcome="discarded").inc()

    def _drop_unrun(self, conv: Conversation, key: str, outcome: str) -> bool:
        for item in self.items:
            if isinstance(item, TurnWork) and item.speculative and item.conv is conv and item.key == key:
                self.items.remove(item)
                item.heard(None)
                metrics.SPECULATIONS.labels(outcome=outcome).inc()
                return True
        return False

    def in_order(self, run: Callable[[], None], refuse: Callable[[], None], conv: Conversation | None = None) -> None:
        """Run `run` now if nothing it must follow is queued (`conv`'s turns, or any turn when `conv` is None), else
        once the queue reaches it."""
        if conv is None and self.idle or conv is not None and not any(w.conv is conv for w in self._queued()):
            run()
        else:
            self.items.append(Ordered(self._next_seq(), conv, run, refuse))

    def close(self, conv: Conversation) -> None:
        """The session is gone: its queued turns are answered `UnknownSession` (a running chunk's, when it ends)."""
        for item in [i for i in self.items if i.conv is conv]:
            self.items.remove(item)
            if isinstance(item, TurnWork):
                item.refuse(UnknownSession(conv.session_id))

    def refuse_all(self) -> None:
        """The engine stopped: nothing queued will run."""
        for item in self._queued():
            if isinstance(item, Ordered):
                item.refuse()
            elif not item.speculative:
                refuse_stopped(item.cmd.reply)
            else:
                item.heard(None)
        self.items.clear()
        self.running = None

    # ---- steps --------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One bounded step of audio work (after any ordered commands that reached the head of the queue)."""
        if self.running is None:
            while self.items and isinstance(self.items[0], Ordered):
                self.items.popleft().run()
            self.running = self._start_chunk()
            if self.running is None:
                return
        chunk = self.running
        if chunk.steps is None:
            self.running = None
            self._finish(chunk, [])
            return
        t0 = time.monotonic()
        try:
            next(chunk.steps)
        except StopIteration as end:
            self._took(chunk, t0)
            self.running = None
            self._finish(chunk, end.value)
        except Exception as e:
            self.running = None
            self._failed(chunk, e)
        else:
            self._took(chunk, t0)

    def _took(self, chunk: Chunk, t0: float) -> None:
        took = time.monotonic() - t0
        chunk.busy_s += took
        self.longest_step_s = max(self.longest_step_s, took)

    def _start_chunk(self) -> Chunk | None:
        works: list[TurnWork] = []
        while self.items and isinstance(self.items[0], TurnWork) and len(works) < self.batch:
            w = self.items[0]
            if w.alone and works:
                break
            self.items.popleft()
            if self._admissible(w):
                works.append(w)
            if w.alone:
                break
        if not works:
            return None
        self.chunks += 1
        counts = {id(w.conv): (w.conv, w.conv.audio_count) for w in works}
        plan: list[tuple[TurnWork, int, Speculation | None]] = []
        hears_previous = getattr(self.backend, "hears_previous_text", False)
        for w in works:
            audio = w.cmd.utterance.audio is not None
            said = w.conv.said_before() if audio and hears_previous else ""
            w.utterance = dataclasses.replace(w.cmd.utterance, previous_text=said)
            if w.speculative:
                plan.append((w, w.conv.audio_count + 1 if audio else w.conv.audio_count, None))
                continue
            number = w.conv.next_audio_number() if audio else w.conv.audio_count
            plan.append((w, number, _take_speculation(w, number, self.backend) if w.cmd.confirm else None))
        todo = [(w, n) for w, n, hit in plan if hit is None]
        steps = None
        if todo:
            utterances, numbers = [w.utterance for w, _ in todo], [n for _, n in todo]
            prepare_steps = getattr(type(self.backend), "prepare_steps", None)  # a wrapper's own prepare wins
            if prepare_steps is not None:
                steps = prepare_steps(self.backend, utterances, numbers)
            else:
                steps = _whole(self.backend, utterances, numbers)
        return Chunk(plan, counts, steps, time.monotonic(), todo=[w for w, _ in todo])

    def _admissible(self, w: TurnWork) -> bool:
        if not w.live():
            w.heard(None)
            return False
        if w.conv.closed:
            w.refuse(UnknownSession(w.conv.session_id))
            return False
        text = w.cmd.utterance.text
        if not w.speculative and text and (err := self._too_long(text)):
            w.refuse(err)
            return False
        return True

    def _too_long(self, *texts: str) -> TurnTooLong | None:
        n = sum(len(self.backend.tokenizer.encode(t)) for t in texts)
        return TurnTooLong.tokens(n, self.max_turn_tokens) if n > self.max_turn_tokens else None

    def _failed(self, chunk: Chunk, e: Exception) -> None:
        """Roll back the numbers and reused speculations; retry each turn alone (a lone turn's caller gets `e`)."""
        for conv, count in chunk.counts.values():
            conv.audio_count = count
        for w, _, hit in chunk.plan:
            if hit is not None:
                w.conv.speculative[hit.utterance.key] = hit
        works = [w for w in chunk.works if not w.dropped]
        if len(chunk.plan) > 1:
            for w in works:
                w.alone = True
            self.items.extendleft(reversed(works))
            return
        log.warning("prepare failed for %s: %s", chunk.plan[0][0].key, e)
        for w in works:  # a failed speculation is simply redone (and fails) at confirm
            w.refuse(e)

    def _finish(self, chunk: Chunk, prepared: list[PreparedTurn]) -> None:
        turns = {id(w): t for w, t in zip(chunk.todo, prepared, strict=True)}
        encode_ms = round(chunk.busy_s * 1000.0, 3)
        for w, number, hit in chunk.plan:
            if w.dropped:
                continue
            if w.conv.closed:
                w.refuse(UnknownSession(w.conv.session_id))
                continue
            if w.speculative:
                turn = turns[id(w)]
                w.conv.add_speculation(Speculation(w.utterance, number, turn, encode_ms))
                w.heard(TurnInfo(turn.key, turn.transcript, turn.language, turn.audio_s, {"encode": encode_ms}))
                metrics.SPECULATIONS.labels(outcome="prepared").inc()
                if self.on_speculation is not None:
                    self.on_speculation(w.conv, turn)
                continue
            turn, turn_encode_ms = (hit.turn, hit.encode_ms) if hit else (turns[id(w)], encode_ms)
            if hit is not None and turn.audio_s != w.cmd.utterance.audio_s:  # heard alike, not as long: the commit's
                turn = dataclasses.replace(turn, audio_s=w.cmd.utterance.audio_s)
            if turn.transcript and (err := self._too_long(turn.transcript, w.cmd.utterance.text or "")):
                if w.cmd.utterance.audio is not None and number == w.conv.audio_count:
                    w.conv.audio_count -= 1  # its number is given back (a later one was rendered: it stays taken)
                w.refuse(err)
                continue
            if w.cmd.utterance.output is not None:  # a client's function result: no audio, no text of its own
                turn = dataclasses.replace(turn, outputs=(w.cmd.utterance.output,))
            w.conv.add_pending(turn, turn_encode_ms)
            timings = {"queue": ms_between(w.cmd.submitted_s, chunk.started_s), "encode": turn_encode_ms}
            info = TurnInfo(turn.key, turn.transcript, turn.language, turn.audio_s, timings, hit is not None)
            if not w.cmd.reply.done():
                w.cmd.reply.set_result(info)
