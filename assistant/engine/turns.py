"""User-turn preparation on the worker: batched audio work, "Audio k" numbering and speculative turns.

`prepare_turns(backend, work)` runs one `backend.prepare` call for every turn that arrived in the same drain of the
command queue (audio encoding is batched). "Audio k" numbers are taken in command order; a speculation renders with
the number it would take, without taking it, and is kept aside in `Conversation.speculative`; a confirmed turn reuses
its speculation when the utterance is identical and its number unchanged. A failing batch is retried turn by turn,
so one bad utterance cannot sink the others. Worker thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from assistant.backends.base import Backend, PreparedTurn
from assistant.engine import metrics
from assistant.engine.api import TurnInfo
from assistant.engine.commands import PrepareCmd, SpeculateCmd, ms_between
from assistant.engine.conversation import Conversation, Speculation

log = logging.getLogger("assistant.engine")


@dataclass
class TurnWork:
    """A prepare or speculate command with the conversation it names (looked up by the worker)."""

    cmd: PrepareCmd | SpeculateCmd
    conv: Conversation

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


def drop_unrun(batch: list[TurnWork], conv: Conversation, key: str, outcome: str) -> bool:
    """Remove a not yet run speculation of `key` from this drain's batch; True if there was one."""
    for i, w in enumerate(batch):
        if w.speculative and w.conv is conv and w.key == key:
            del batch[i]
            metrics.SPECULATIONS.labels(outcome=outcome).inc()
            return True
    return False


def _take_speculation(w: TurnWork, number: int) -> Speculation | None:
    """The confirmed turn's speculation if it is still valid: same utterance, same "Audio k" number."""
    spec = w.conv.speculative.pop(w.key, None)
    if spec is None:
        return None
    if spec.matches(w.cmd.utterance) and spec.audio_number == number:
        metrics.SPECULATIONS.labels(outcome="confirmed").inc()
        return spec
    metrics.SPECULATIONS.labels(outcome="missed").inc()
    return None


def prepare_turns(backend: Backend, batch: list[TurnWork]) -> None:
    batch = [w for w in batch if w.live()]
    if not batch:
        return
    counts = {id(w.conv): (w.conv, w.conv.audio_count) for w in batch}  # to roll back a failed batch
    t0 = time.monotonic()
    plan: list[tuple[TurnWork, int, Speculation | None]] = []
    for w in batch:
        audio = w.cmd.utterance.audio is not None
        if w.speculative:
            plan.append((w, w.conv.audio_count + 1 if audio else w.conv.audio_count, None))
            continue
        number = w.conv.next_audio_number() if audio else w.conv.audio_count
        plan.append((w, number, _take_speculation(w, number) if w.cmd.confirm else None))
    todo = [(w, n) for w, n, hit in plan if hit is None]
    turns: dict[int, PreparedTurn] = {}
    if todo:
        try:
            out = backend.prepare([w.cmd.utterance for w, _ in todo], [n for _, n in todo])
        except Exception as e:  # one bad utterance must not sink the others: retry them one by one
            for conv, count in counts.values():
                conv.audio_count = count
            for w, _, hit in plan:
                if hit is not None:
                    w.conv.speculative[hit.utterance.key] = hit
            if len(batch) > 1:
                for w in batch:
                    prepare_turns(backend, [w])
                return
            log.warning("prepare failed for %s: %s", batch[0].key, e)
            if not batch[0].speculative:  # a failed speculation is simply redone (and fails) at confirm
                batch[0].cmd.reply.set_exception(e)
            return
        turns = {id(w): t for (w, _), t in zip(todo, out, strict=True)}
    encode_ms = ms_between(t0, time.monotonic())
    for w, number, hit in plan:
        if w.conv.closed:
            continue
        if w.speculative:
            w.conv.add_speculation(Speculation(w.cmd.utterance, number, turns[id(w)], encode_ms))
            metrics.SPECULATIONS.labels(outcome="prepared").inc()
            continue
        turn, turn_encode_ms = (hit.turn, hit.encode_ms) if hit else (turns[id(w)], encode_ms)
        w.conv.add_pending(turn, turn_encode_ms)
        timings = {"queue": ms_between(w.cmd.submitted_s, t0), "encode": turn_encode_ms}
        info = TurnInfo(turn.key, turn.transcript, turn.language, turn.audio_s, timings, hit is not None)
        if not w.cmd.reply.done():
            w.cmd.reply.set_result(info)
