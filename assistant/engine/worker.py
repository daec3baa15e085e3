"""The engine's worker thread: the only place that touches the backend, the model and the KV caches.

Loop, one iteration per decode step:
1. drain the command queue (block only when there is nothing to decode): user turns to prepare, responses to start,
   cancellations, session closes/resets, stop;
2. run `backend.prepare` once for all user turns that arrived together (audio encoding is batched), speculative
   ones included (kept aside in `Conversation.speculative`); a confirmed speculation skips the backend;
3. apply cancellations (a cancelled response ends before the next step: "within one decode step");
4. admit waiting responses while fewer than `max_active` decode (all at once when idle, one per step while others
   decode, so a burst of prefills never stalls running answers for long): build the prompt, reuse the session's
   cache by longest common prefix (`conversation.plan_cache`), prefill only the new tokens with audio embeddings
   spliced, pick the first token; a session whose cache is empty (new, evicted, rebuilt) first copies the shared
   system-prompt snapshot (`prefix_cache.PrefixSnapshots`), so only the part after the system message is prefilled;
5. one batched `lm.decode` for every active response, pick each next token, stream its text.

What a response leaves in the history (the user heard what was streamed):
- completed / incomplete (max tokens): the answered turns with the reply text;
- cancelled after some text: the answered turns with the partial reply (what was actually said);
- cancelled before any text: the turns go back to pending and are answered with the next response;
- failed: the turns are dropped (retrying a turn that broke the model would likely break it again) and the
  session's cache is reset; the engine keeps serving everyone else.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from assistant.backends.base import Backend, DecoderLM, PreparedTurn, Prompt, Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine import metrics
from assistant.engine.api import ResponseDone, ResponseOptions, TextDelta, TurnInfo
from assistant.engine.conversation import CachePlan, Conversation, Speculation, evict_lru, merge_turns, plan_cache
from assistant.engine.decoding import TokenStream, sampling_params
from assistant.engine.prefix_cache import PrefixSnapshots
from assistant.engine.stream import ResponseStream
from assistant.models.kv_cache import KVCache
from assistant.models.splice import splice_audio

log = logging.getLogger(__name__)


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000.0, 3)


def prefill_prompt(lm: DecoderLM, cache: KVCache, prompt: Prompt, reuse: int) -> torch.Tensor:
    """Prefill `prompt.ids[reuse:]` onto `cache` (which holds exactly the first `reuse` positions), with the audio
    embeddings spliced over their placeholder runs; returns the last position's logits [1, vocab]."""
    new_ids = prompt.ids[reuse:]
    x = lm.embed(torch.tensor(new_ids, dtype=torch.long, device=lm.device))  # [T_new, hidden]
    spans = splice_audio(x, prompt.audio, reuse)
    logits = lm.prefill(x, cache)
    cache.token_ids[reuse:] = new_ids
    cache.segment_keys.extend(spans)
    return logits


# ---- commands from the event loop ---------------------------------------------------------------------------------
@dataclass
class PrepareCmd:
    conv: Conversation
    utterance: Utterance
    submitted_s: float
    reply: Any  # concurrent.futures.Future[TurnInfo]
    confirm: bool = False  # reuse a matching speculation of the same key (Engine.confirm_user_turn)

    def live(self) -> bool:
        return not self.reply.done()


@dataclass
class SpeculateCmd:
    conv: Conversation
    utterance: Utterance
    submitted_s: float

    def live(self) -> bool:
        return not self.conv.closed


@dataclass
class DiscardCmd:
    conv: Conversation
    key: str


@dataclass
class RespondCmd:
    job: Job


@dataclass
class CancelCmd:
    response_id: str
    reason: str


@dataclass
class SessionCmd:
    conv: Conversation
    action: str  # "close" | "reset" | "instructions"
    value: str | None = None


@dataclass
class StopCmd:
    pass


@dataclass
class Job:
    """One response from admission to `ResponseDone`."""

    response_id: str
    conv: Conversation
    options: ResponseOptions
    stream: ResponseStream
    submitted_s: float
    on_finish: Any  # callable(job) run on the worker after ResponseDone (admission bookkeeping)
    turns: list[PreparedTurn] = field(default_factory=list)
    encode_ms: float = 0.0
    prompt: Prompt | None = None
    cached_tokens: int = 0
    tokens: TokenStream | None = None
    next_id: int | None = None  # sampled, streamed, not yet fed to the model
    cancel_reason: str | None = None
    t: dict[str, float] = field(default_factory=dict)


class Worker:
    def __init__(self, backend: Backend, engine_cfg: EngineConfig, gen_cfg: GenerationConfig, reuse_cache: bool):
        self.backend, self.cfg, self.gen_cfg = backend, engine_cfg, gen_cfg
        self.reuse_cache = reuse_cache  # False = every response prefills its whole prompt (benchmark baseline)
        self.lm = backend.lm
        self.window_tokens = engine_cfg.max_window_tokens or backend.max_window_tokens
        self.prefixes = PrefixSnapshots(backend, self.window_tokens)  # shared system-prompt K/V (worker only)
        # unbounded on purpose: every producer is itself bounded (admission control for responses, one pending
        # prepare per awaiting caller, sessions bounded by the server), so this queue cannot grow without limit
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.conversations: dict[str, Conversation] = {}  # every open session; mutated on the worker only
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self.steps = 0  # batched decode steps run (tests, bench)
        self.max_batch = 0  # largest decode batch so far

    # ---- loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._drain_commands():
                        break
                    self._admit()
                    if self.active:
                        self._decode_step()
                except Exception as e:  # a bug here must not leave every stream waiting forever
                    log.exception("engine worker step failed; failing the responses in flight")
                    for job in self.waiting + self.active:
                        job.conv.cache.reset()
                        self._finish(job, "failed", None, error=f"engine error: {type(e).__name__}: {e}")
            for job in self.waiting + self.active:
                self._finish(job, "cancelled", "shutdown")
            self._refuse_leftovers()

    def _refuse_leftovers(self) -> None:
        """After a stop: nothing submitted late may wait forever."""
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, PrepareCmd) and not cmd.reply.done():
                cmd.reply.set_exception(RuntimeError("engine stopped before this turn was prepared"))
            elif isinstance(cmd, RespondCmd):
                self._finish(cmd.job, "cancelled", "shutdown")

    def _drain_commands(self) -> bool:
        """Handle every queued command; False once a stop was received."""
        block = not self.active and not self.waiting
        cmds = []
        try:
            cmds.append(self.commands.get(block=block))
            while True:
                cmds.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        prepares: list[PrepareCmd | SpeculateCmd] = []
        keep_running = True
        for cmd in cmds:
            if isinstance(cmd, PrepareCmd | SpeculateCmd):
                if isinstance(cmd, PrepareCmd) and cmd.confirm:
                    # its speculation has not run yet: no head start left, the confirm does the work itself
                    self._drop_unrun(prepares, cmd.conv, cmd.utterance.key, "missed")
                prepares.append(cmd)
                continue
            if isinstance(cmd, DiscardCmd):  # needs no flush: it only removes work that is not part of the session
                self._drop_unrun(prepares, cmd.conv, cmd.key, "discarded")
                if cmd.conv.speculative.pop(cmd.key, None) is not None:
                    metrics.SPECULATIONS.labels(outcome="discarded").inc()
                continue
            if prepares:  # keep order: a respond after a prepare must see its turn
                self._prepare(prepares)
                prepares = []
            if isinstance(cmd, RespondCmd):
                self.waiting.append(cmd.job)
            elif isinstance(cmd, CancelCmd):
                self._cancel(cmd.response_id, cmd.reason)
            elif isinstance(cmd, SessionCmd):
                self._session(cmd)
            elif isinstance(cmd, StopCmd):
                keep_running = False
        if prepares:
            self._prepare(prepares)
        metrics.QUEUED.set(len(self.waiting))
        return keep_running

    # ---- sessions and user turns --------------------------------------------------------------------------------
    def _session(self, cmd: SessionCmd) -> None:
        conv = cmd.conv
        if cmd.action == "open":
            self.conversations[conv.session_id] = conv
        elif cmd.action == "instructions":
            conv.system = cmd.value or self.backend.default_system_prompt
        elif cmd.action in ("close", "reset"):
            for job in self.waiting + self.active:
                if job.conv is conv:
                    job.cancel_reason = "session_closed" if cmd.action == "close" else "conversation_reset"
            self._reap_cancelled()
            conv.reset()
            if cmd.action == "close":
                conv.closed = True
                self.conversations.pop(conv.session_id, None)

    @staticmethod
    def _drop_unrun(prepares: list, conv: Conversation, key: str, outcome: str) -> bool:
        """Remove a not yet run speculation of `key` from this drain's batch; True if there was one."""
        for i, c in enumerate(prepares):
            if isinstance(c, SpeculateCmd) and c.conv is conv and c.utterance.key == key:
                del prepares[i]
                metrics.SPECULATIONS.labels(outcome=outcome).inc()
                return True
        return False

    def _take_speculation(self, cmd: PrepareCmd, number: int) -> Speculation | None:
        """The confirmed turn's speculation if it is still valid: same utterance, same "Audio k" number."""
        spec = cmd.conv.speculative.pop(cmd.utterance.key, None)
        if spec is None:
            return None
        if spec.matches(cmd.utterance) and spec.audio_number == number:
            metrics.SPECULATIONS.labels(outcome="confirmed").inc()
            return spec
        metrics.SPECULATIONS.labels(outcome="missed").inc()
        return None

    def _prepare(self, cmds: list[PrepareCmd | SpeculateCmd]) -> None:
        """One `backend.prepare` call for all turns that arrived together (audio encoding batched). "Audio k"
        numbers are taken in command order; a speculation renders with the number it would take, without taking it.
        """
        cmds = [c for c in cmds if c.live()]
        if not cmds:
            return
        counts = {id(c.conv): (c.conv, c.conv.audio_count) for c in cmds}  # to roll back a failed batch
        t0 = time.monotonic()
        plan: list[tuple[PrepareCmd | SpeculateCmd, int, Speculation | None]] = []
        for c in cmds:
            audio = c.utterance.audio is not None
            if isinstance(c, SpeculateCmd):
                plan.append((c, c.conv.audio_count + 1 if audio else c.conv.audio_count, None))
                continue
            number = c.conv.next_audio_number() if audio else c.conv.audio_count
            plan.append((c, number, self._take_speculation(c, number) if c.confirm else None))
        todo = [(c, n) for c, n, hit in plan if hit is None]
        turns: dict[int, PreparedTurn] = {}
        if todo:
            try:
                out = self.backend.prepare([c.utterance for c, _ in todo], [n for _, n in todo])
            except Exception as e:  # one bad utterance must not sink the others: retry them one by one
                for conv, count in counts.values():
                    conv.audio_count = count
                for c, _, hit in plan:
                    if hit is not None:
                        c.conv.speculative[hit.utterance.key] = hit
                if len(cmds) > 1:
                    for c in cmds:
                        self._prepare([c])
                    return
                log.warning("prepare failed for %s: %s", cmds[0].utterance.key, e)
                if isinstance(cmds[0], PrepareCmd):  # a failed speculation is simply redone (and fails) at confirm
                    cmds[0].reply.set_exception(e)
                return
            turns = {id(c): t for (c, _), t in zip(todo, out, strict=True)}
        encode_ms = _ms(t0, time.monotonic())
        for c, number, hit in plan:
            if c.conv.closed:
                continue
            if isinstance(c, SpeculateCmd):
                c.conv.add_speculation(Speculation(c.utterance, number, turns[id(c)], encode_ms))
                metrics.SPECULATIONS.labels(outcome="prepared").inc()
                continue
            turn, turn_encode_ms = (hit.turn, hit.encode_ms) if hit else (turns[id(c)], encode_ms)
            c.conv.add_pending(turn, turn_encode_ms)
            timings = {"queue": _ms(c.submitted_s, t0), "encode": turn_encode_ms}
            info = TurnInfo(turn.key, turn.transcript, turn.language, turn.audio_s, timings, hit is not None)
            if not c.reply.done():
                c.reply.set_result(info)

    # ---- responses ----------------------------------------------------------------------------------------------
    def _cancel(self, response_id: str, reason: str) -> None:
        for job in self.waiting + self.active:
            if job.response_id == response_id and job.cancel_reason is None:
                job.cancel_reason = reason
        self._reap_cancelled()

    def _reap_cancelled(self) -> None:
        for job in [j for j in self.waiting + self.active if j.cancel_reason]:
            self._finish(job, "cancelled", job.cancel_reason)

    def _admit(self) -> None:
        """Prefill waiting responses into free slots. While others are decoding, one prefill per step: each prefill
        stalls every active stream, so they are spread out (an active stream waits for at most one per token)."""
        budget = 1 if self.active else self.cfg.max_active
        while self.waiting and len(self.active) < self.cfg.max_active and budget > 0:
            budget -= 1
            job = self.waiting.pop(0)
            job.t["admitted"] = time.monotonic()
            try:
                if self._start(job):
                    self.active.append(job)
            except Exception as e:
                log.exception("response %s failed at prefill", job.response_id)
                self._finish(job, "failed", None, error=f"prefill failed: {type(e).__name__}: {e}")
        metrics.ACTIVE.set(len(self.active))
        metrics.QUEUED.set(len(self.waiting))

    def _start(self, job: Job) -> bool:
        """Prompt, cache reuse, prefill, first token. False when the response already ended."""
        conv = job.conv
        job.turns, job.encode_ms = conv.take_pending()
        if not job.turns:
            self._finish(job, "failed", None, error="no user turn to answer: commit audio or text before a response")
            return False
        turn = merge_turns(job.turns)
        prompt = self.backend.build_prompt(conv.system, conv.history, turn, self.window_tokens)
        conv.keep_window(prompt.history_kept)
        job.prompt = prompt
        cache = conv.cache
        if not self.reuse_cache:
            cache.reset()
        rope_alpha = self.lm.rope_alpha_for(len(prompt.ids))
        plan = plan_cache(cache, prompt, rope_alpha)
        if self.reuse_cache and plan.reuse == 0:
            restored = self.prefixes.restore(conv.system, prompt, rope_alpha, cache)
            metrics.PREFIX_SNAPSHOTS.labels(outcome="hit" if restored else "miss").inc()
            if restored:
                plan = CachePlan(restored, True, "system_prefix")
        metrics.CACHE_EVENTS.labels(event=plan.reason).inc()
        job.cached_tokens = plan.reuse
        logits = prefill_prompt(self.lm, cache, prompt, plan.reuse)
        if self.reuse_cache and plan.reuse == 0 and self.prefixes.store(conv.system, prompt, rope_alpha, cache):
            metrics.PREFIX_SNAPSHOTS.labels(outcome="stored").inc()
        job.t["prefilled"] = time.monotonic()
        metrics.TOKENS.labels(kind="prompt").inc(len(prompt.ids))
        metrics.TOKENS.labels(kind="reused").inc(plan.reuse)
        metrics.TOKENS.labels(kind="prefilled").inc(len(prompt.ids) - plan.reuse)
        params = sampling_params(self.gen_cfg, job.options, getattr(self.backend, "default_sampling", None))
        max_new = job.options.max_new_tokens or self.gen_cfg.max_new_tokens
        job.tokens = TokenStream(self.backend.tokenizer, params, max_new, prompt.ids)
        return self._take_token(job, logits[-1])

    def _take_token(self, job: Job, logits_row: torch.Tensor) -> bool:
        """Pick the next token from `logits_row`, stream its text; False when the response ended."""
        tokens = job.tokens
        token_id = tokens.pick(logits_row)
        now = time.monotonic()
        if "first_token" not in job.t:
            job.t["first_token"] = now
        if tokens.is_stop(token_id):
            self._finish(job, "completed", None)
            return False
        delta = tokens.append(token_id)
        if delta:
            job.stream.push(TextDelta(delta))
        if len(tokens.output_ids) >= tokens.max_new_tokens:
            self._finish(job, "incomplete", "max_output_tokens")
            return False
        job.next_id = token_id
        return True

    def _decode_step(self) -> None:
        jobs = list(self.active)
        metrics.BATCH_SIZE.observe(len(jobs))
        self.max_batch = max(self.max_batch, len(jobs))
        try:
            logits = self._decode(jobs)
        except Exception:
            logits = None
        if logits is None:  # isolate the failing response(s); the rest go on
            for job in jobs:
                try:
                    row = self._decode([job])[0]
                except Exception as e:
                    log.exception("response %s failed at decode", job.response_id)
                    job.conv.cache.reset()
                    self._finish(job, "failed", None, error=f"decode failed: {type(e).__name__}: {e}")
                    continue
                self._take_token_safely(job, row)
            self.steps += 1
            return
        self.steps += 1
        for job, row in zip(jobs, logits, strict=True):
            self._take_token_safely(job, row)

    def _take_token_safely(self, job: Job, row: torch.Tensor) -> None:
        try:
            self._take_token(job, row)
        except Exception as e:
            log.exception("response %s failed after decode", job.response_id)
            job.conv.cache.reset()
            self._finish(job, "failed", None, error=f"sampling failed: {type(e).__name__}: {e}")

    def _decode(self, jobs: list[Job]) -> torch.Tensor:
        ids = torch.tensor([j.next_id for j in jobs], dtype=torch.long, device=self.lm.device)
        caches = [j.conv.cache for j in jobs]
        lengths = [c.length for c in caches]
        try:
            logits = self.lm.decode(self.lm.embed(ids), caches)  # [B, vocab]
        except Exception:
            for c, n in zip(caches, lengths, strict=True):  # undo a partial step so a retry starts clean
                c.truncate(n)
            raise
        for j, c in zip(jobs, caches, strict=True):
            c.token_ids.append(j.next_id)
        return logits

    def _finish(self, job: Job, status: str, reason: str | None, error: str | None = None) -> None:
        if job.stream.finished:
            return
        if job in self.active:
            self.active.remove(job)
        if job in self.waiting:
            self.waiting.remove(job)
        conv = job.conv
        tokens = job.tokens
        if tokens:
            tail = tokens.flush()
            if tail:
                job.stream.push(TextDelta(tail))
        text = tokens.text() if tokens else ""
        if status == "failed":
            conv.cache.reset()
        elif job.turns and not conv.closed:
            if status == "cancelled" and not text:
                conv.restore_pending(job.turns, job.encode_ms)
            else:
                conv.record(merge_turns(job.turns), text)
        done = self._done_event(job, status, reason, text, error)
        conv.busy = False
        conv.touch()
        job.on_finish(job)
        job.stream.push(done)
        metrics.RESPONSES.labels(status=status).inc()
        metrics.TOKENS.labels(kind="output").inc(done.output_tokens)
        metrics.observe_timings(done.timings_ms)
        metrics.ACTIVE.set(len(self.active))
        self._enforce_cache_budget()

    def _enforce_cache_budget(self) -> None:
        """Snapshot tokens count in the budget: idle sessions are evicted first (a snapshot serves every new
        session), snapshots are dropped only when busy sessions alone still exceed the budget."""
        budget = self.cfg.cache_budget_tokens
        convs = list(self.conversations.values())
        evicted = evict_lru(convs, budget - self.prefixes.tokens)
        if evicted:
            metrics.CACHE_EVENTS.labels(event="evicted").inc(len(evicted))
        held = sum(c.cache.length for c in convs)
        while held + self.prefixes.tokens > budget and self.prefixes.drop_oldest():
            metrics.PREFIX_SNAPSHOTS.labels(outcome="dropped").inc()
        metrics.CACHED_TOKENS.set(held + self.prefixes.tokens)

    def _done_event(self, job: Job, status: str, reason: str | None, text: str, error: str | None) -> ResponseDone:
        t, now = job.t, time.monotonic()
        admitted = t.get("admitted", now)
        timings = {"queue": _ms(job.submitted_s, admitted), "encode": round(job.encode_ms, 3)}
        if "prefilled" in t:
            timings["prefill"] = _ms(admitted, t["prefilled"])
        if "first_token" in t:
            timings["first_token"] = _ms(job.submitted_s, t["first_token"])
            timings["decode"] = _ms(t["first_token"], now)
        timings["total"] = _ms(job.submitted_s, now)
        prompt_ids = job.prompt.ids if job.prompt else []
        output_ids = list(job.tokens.output_ids) if job.tokens else []
        return ResponseDone(
            response_id=job.response_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            text=text,
            prompt_ids=list(prompt_ids),
            output_ids=output_ids,
            input_tokens=len(prompt_ids),
            output_tokens=len(output_ids),
            timings_ms=timings,
            error=error,
            cached_tokens=job.cached_tokens,
        )
