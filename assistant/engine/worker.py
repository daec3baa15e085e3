"""The engine's worker thread: the only place that touches the backend, the model and the KV caches.

Loop, one iteration per decode step:
1. drain the command queue (block only when there is nothing to do): user turns are queued for preparation
   (`turns.TurnQueue`), responses wait for admission, cancellations and closes apply at once (a cancelled response
   ends before the next step: "within one decode step"), resets and `call`s keep their order with queued turns;
2. one bounded step of audio work (`TurnQueue.step`): a chunk of at most `prepare_batch` turns, in the backend's
   steps (Whisper: one 30 s window encoded per step, then the chunk decoded), speculative ones included (kept aside in
   `Conversation.speculative`); a confirmed speculation skips the backend. A burst of turns is prepared over many
   iterations, so cancellations and running answers never wait for more than one step of it;
3. admit waiting responses while fewer than `max_active` decode (all at once when idle, one per step while others
   decode, so a burst of prefills never stalls running answers for long; a response whose session still has turns
   queued before it waits for them). Each: build the prompt, reuse the session's cache by longest common prefix
   (`conversation.plan_cache`), prefill only the new tokens with audio embeddings spliced, pick the first token; a
   session whose cache is empty (new, evicted, rebuilt) first copies the shared system-prompt snapshot
   (`prefix_cache.PrefixSnapshots`), so only the part after the system message is prefilled;
4. one batched `lm.decode` for every active response, pick each next token, stream its text.
A remote backend (`openai`, `remote.py`) has no model here: admission starts the answer's HTTP stream instead of a
prefill, its deltas reach the client without the worker, and its end comes back as a `RemoteDoneCmd`.

What a response leaves in the history (the user heard what was streamed):
- completed / incomplete (max tokens): the answered turns with the reply text;
- cancelled after some text: the answered turns with the partial reply (what was actually said);
- cancelled before any text: the turns go back to pending and are answered with the next response;
- a spoken answer cut short: later, only what the listener heard (`TruncateReplyCmd` from the session core, which
  knows what audio was sent and played; `Conversation.truncate_reply`);
- failed: the turns are dropped (retrying a turn that broke the model would likely break it again) and the
  session's cache is reset; the engine keeps serving everyone else.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from assistant.backends.base import Backend, PreparedTurn
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine import metrics, tool_calls
from assistant.engine.api import ResponseDone, TextDelta, ToolCallStarted, UnknownSession, new_id
from assistant.engine.commands import (
    CallCmd,
    CancelCmd,
    CloseSessionCmd,
    Command,
    DeleteItemCmd,
    DiscardCmd,
    InstructionsCmd,
    Job,
    OpenSessionCmd,
    PrepareCmd,
    RemoteDoneCmd,
    ResetSessionCmd,
    RespondCmd,
    SpeculateCmd,
    StopCmd,
    TruncateReplyCmd,
    refuse_stopped,
)
from assistant.engine.conversation import CachePlan, Conversation, evict_lru, merge_turns, plan_cache
from assistant.engine.decoding import TokenStream, prefill_prompt
from assistant.engine.prefix_cache import PrefixSnapshots
from assistant.engine.remote import RemoteResponses, empty_cache, is_remote
from assistant.engine.sampling import sampling_params
from assistant.engine.turns import TurnQueue

log = logging.getLogger(__name__)


class Worker:
    """Owns the backend, every `Conversation` and every KV cache; runs on `thread` only (see the module docstring).
    `load` (when given) builds the backend on this thread first, so every torch call of the process that touches
    the model runs on one thread: a second OpenMP team (a thread that loaded the weights and lives on) slowed the
    batched decode by ~40% on a 2-core machine."""

    def __init__(
        self,
        engine_cfg: EngineConfig,
        gen_cfg: GenerationConfig,
        reuse_cache: bool,
        backend: Backend | None = None,
        load: Callable[[], Backend] | None = None,
    ):
        if (backend is None) == (load is None):
            raise ValueError("Worker: pass exactly one of backend= (already loaded) or load= (built on the worker)")
        self.cfg, self.gen_cfg = engine_cfg, gen_cfg
        self.reuse_cache = reuse_cache  # False = every response prefills its whole prompt (benchmark baseline)
        self._load = load or (lambda: backend)
        self.loaded: concurrent.futures.Future[Backend] = concurrent.futures.Future()
        # unbounded on purpose: every producer is itself bounded (admission control for responses, one pending
        # prepare per awaiting caller, sessions bounded by the hub), so this queue cannot grow without limit
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.conversations: dict[str, Conversation] = {}  # every open session, by id
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self.steps = 0  # batched decode steps run (tests, bench)
        self.max_batch = 0  # largest decode batch so far
        # rows decoded and seconds spent in decode steps, prefills excluded (the decode speed: `Engine.decode_totals`)
        self.decoded_rows, self.decode_s = 0, 0.0

    def _attach(self, backend: Backend) -> None:
        self.backend = backend
        # a remote backend (`ChatBackend`) has no model here: its answers stream from a server (`remote.py`)
        self.remote = RemoteResponses(backend, self.gen_cfg, self.commands.put) if is_remote(backend) else None
        self.lm = None if self.remote else backend.lm
        self.window_tokens = self.cfg.max_window_tokens or backend.max_window_tokens
        self.prefixes = PrefixSnapshots(backend, self.window_tokens)  # shared system-prompt K/V
        self.turns = TurnQueue(backend, self.cfg.max_turn_tokens, None if self.remote else self._prefill_speculation)
        self.speculative_prefill = self.cfg.speculative_prefill  # worker thread only (a bench compares on and off)
        self.speculative_prefills = 0  # prompts prefilled ahead of their commit (tests, bench)

    # ---- loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cfg.threads:  # the budget applies to this thread, which runs all model code
            torch.set_num_threads(self.cfg.threads)
        try:
            self._attach(self._load())
        except BaseException as e:  # handed to Engine.start, which raises it on the loop
            self.loaded.set_exception(e)
            self._refuse_leftovers()
            return
        self.loaded.set_result(self.backend)
        with torch.inference_mode():
            while True:
                try:
                    if not self._drain_commands():
                        break
                    self.turns.step()
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
            self.turns.refuse_all()
            self._refuse_leftovers()
            if self.remote:
                self.backend.close()

    def _refuse_leftovers(self) -> None:
        """After a stop (or a failed load): nothing submitted late may wait forever."""
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, PrepareCmd | CallCmd):
                refuse_stopped(cmd.reply)
            elif isinstance(cmd, RespondCmd):
                cmd.on_finish(cmd.session_id, cmd.response_id)
                cmd.stream.push(
                    ResponseDone.refused(cmd.response_id, "the engine stopped before this response started")
                )

    def _drain_commands(self) -> bool:
        """Handle every queued command; False once a stop was received."""
        # nothing to do until a command comes: no local decode, no audio work, no waiting response with a free slot
        # (remote answers in `active` end with a RemoteDoneCmd)
        decoding = any(job.reply is None for job in self.active)
        admissible = self.waiting and len(self.active) < self.cfg.max_active
        block = not decoding and not admissible and self.turns.idle
        cmds: list[Command] = []
        try:
            cmds.append(self.commands.get(block=block))
            while True:
                cmds.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        keep_running = True
        for cmd in cmds:
            if isinstance(cmd, PrepareCmd | SpeculateCmd | DiscardCmd):
                self._turn_command(cmd)
            elif isinstance(cmd, RespondCmd):
                self._respond(cmd)
            elif isinstance(cmd, CancelCmd):
                self._cancel(cmd.response_id, cmd.reason)
            elif isinstance(cmd, CallCmd):  # after every turn queued before it
                self.turns.in_order(lambda cmd=cmd: self._call(cmd), lambda cmd=cmd: refuse_stopped(cmd.reply))
            elif isinstance(cmd, StopCmd):
                keep_running = False
            elif isinstance(cmd, RemoteDoneCmd):
                for job in [j for j in self.active if j.response_id == cmd.response_id]:
                    self._finish(job, cmd.status, cmd.reason, error=cmd.error)
            else:
                self._session(cmd)
        metrics.QUEUED.set(len(self.waiting))
        return keep_running

    # ---- sessions and user turns --------------------------------------------------------------------------------
    def _session(
        self,
        cmd: OpenSessionCmd | CloseSessionCmd | ResetSessionCmd | InstructionsCmd | TruncateReplyCmd | DeleteItemCmd,
    ) -> None:
        if isinstance(cmd, OpenSessionCmd):
            cache = empty_cache() if self.remote else self.lm.new_cache()
            cache.release()  # storage grows on the first prefill; an idle session costs nothing
            system = cmd.instructions or self.backend.default_system_prompt
            self.conversations[cmd.session_id] = Conversation(cmd.session_id, system, cache)
            return
        conv = self.conversations.get(cmd.session_id)
        if conv is None:
            return
        if isinstance(cmd, InstructionsCmd):
            conv.system = cmd.instructions or self.backend.default_system_prompt
            return
        if isinstance(cmd, TruncateReplyCmd):
            conv.truncate_reply(cmd.response_id, cmd.text)
            return
        if isinstance(cmd, DeleteItemCmd):  # after the session's turns queued before it (the turn may be one)
            delete = lambda: conv.delete_item(cmd.key, cmd.response_id)  # noqa: E731
            self.turns.in_order(delete, lambda: None, conv)
            return
        closing = isinstance(cmd, CloseSessionCmd)
        for job in self.waiting + self.active:
            if job.conv is conv:
                job.cancel_reason = "session_closed" if closing else "conversation_reset"
        self._reap_cancelled()
        if closing:
            self.turns.close(conv)
            conv.reset()
            conv.closed = True
            del self.conversations[cmd.session_id]
        else:  # after the session's turns queued before it (they enter, then the reset forgets them)
            self.turns.in_order(conv.reset, conv.reset, conv)

    def _turn_command(self, cmd: PrepareCmd | SpeculateCmd | DiscardCmd) -> None:
        conv = self.conversations.get(cmd.session_id)
        if conv is None:
            if isinstance(cmd, PrepareCmd) and not cmd.reply.done():
                cmd.reply.set_exception(UnknownSession(cmd.session_id))
            elif isinstance(cmd, SpeculateCmd) and cmd.heard is not None and not cmd.heard.done():
                cmd.heard.set_result(None)
        elif isinstance(cmd, DiscardCmd):
            self.turns.discard(conv, cmd.key)
        else:
            self.turns.add(cmd, conv)

    def _call(self, cmd: CallCmd) -> None:
        if not cmd.reply.set_running_or_notify_cancel():
            return
        try:
            cmd.reply.set_result(cmd.fn(self.backend))
        except Exception as e:
            cmd.reply.set_exception(e)

    # ---- responses ----------------------------------------------------------------------------------------------
    def _respond(self, cmd: RespondCmd) -> None:
        conv = self.conversations.get(cmd.session_id)
        if conv is None:  # closed between respond() and here: the stream still ends
            cmd.on_finish(cmd.session_id, cmd.response_id)
            cmd.stream.push(ResponseDone.refused(cmd.response_id, f"session {cmd.session_id!r} is closed"))
            return
        conv.busy = True
        self.waiting.append(Job(cmd, conv, turns_before=self.turns.mark()))

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
        for job in list(self.waiting):
            if len(self.active) >= self.cfg.max_active or budget == 0:
                break
            if self.turns.blocks(job.conv, job.turns_before):  # its turns are still being prepared
                continue
            budget -= 1
            self.waiting.remove(job)
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
        if self.remote:
            return self.remote.start(job, turn, self.window_tokens)
        opts = job.options
        tool = tool_calls.choose(self.backend, turn, opts.tools, opts.tool_choice) if opts.tools else None
        if tool is not None:
            args = (self.backend, conv.system, conv.history, turn, opts.tools, tool.name, self.window_tokens)
            prompt = tool_calls.call_prompt(*args)
            job.call, job.call_end = tool_calls.ToolCall(new_id("call"), tool.name, ""), tool_calls.ArgumentsEnd()
            job.call_text = "{"  # opened by the prompt
            job.stream.push(ToolCallStarted(job.call.call_id, tool.name))
            job.stream.push(TextDelta("{"))
        else:
            prompt = self.backend.build_prompt(conv.system, conv.history, turn, self.window_tokens)
        conv.keep_window(prompt.history_kept)
        job.prompt = prompt
        plan, logits = self._prefill(conv, prompt)
        metrics.CACHE_EVENTS.labels(event=plan.reason).inc()
        job.cached_tokens = plan.reuse
        job.t["prefilled"] = time.monotonic()
        metrics.TOKENS.labels(kind="prompt").inc(len(prompt.ids))
        metrics.TOKENS.labels(kind="reused").inc(plan.reuse)
        metrics.TOKENS.labels(kind="prefilled").inc(len(prompt.ids) - plan.reuse)
        params = sampling_params(self.gen_cfg, job.options, getattr(self.backend, "default_sampling", None))
        max_new = job.options.max_new_tokens or self.gen_cfg.max_new_tokens
        if job.call is not None:
            params, max_new = tool_calls.GREEDY, min(max_new, tool_calls.MAX_ARGUMENT_TOKENS)
        job.tokens = TokenStream(self.backend.tokenizer, params, max_new, prompt.ids)
        return self._take_token(job, logits[-1])

    def _prefill(self, conv: Conversation, prompt) -> tuple[CachePlan, torch.Tensor]:
        """Prefill what `conv.cache` lacks of `prompt`: its own longest usable prefix is kept, else the shared
        system-prompt snapshot is copied in, and a full prefill leaves a snapshot for the next new session. The plan
        (how much was reused) and the last position's logits."""
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
        logits = prefill_prompt(self.lm, cache, prompt, plan.reuse)
        if self.reuse_cache and plan.reuse == 0 and self.prefixes.store(conv.system, prompt, rope_alpha, cache):
            metrics.PREFIX_SNAPSHOTS.labels(outcome="stored").inc()
        return plan, logits

    def _prefill_speculation(self, conv: Conversation, turn: PreparedTurn) -> None:
        """A speculative turn is ready before its commit: prefill the prompt its answer would have (the pending
        turns and this one, as `_start` builds it) into the session's cache now, in the VAD's remaining silence, so
        the answer's own prefill finds it cached (`plan_cache` keeps only an identical prefix, so a turn that ends
        differently costs nothing but this work). Skipped while the session answers (its cache is in use)."""
        if not self.speculative_prefill or conv.busy or conv.closed or not self.reuse_cache:
            return
        prompt = self.backend.build_prompt(
            conv.system, conv.history, merge_turns([*conv.pending, turn]), self.window_tokens
        )
        self._prefill(conv, prompt)
        self.speculative_prefills += 1

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
        if job.call is not None and delta:
            end = job.call_end.feed(delta)
            delta = delta if end is None else delta[:end]
            job.call_text += delta
            job.stream.push(TextDelta(delta))
            if end is not None:
                self._finish(job, "completed", None)
                return False
        elif delta:
            job.stream.push(TextDelta(delta))
        if len(tokens.output_ids) >= tokens.max_new_tokens:
            self._finish(job, "incomplete", "max_output_tokens")
            return False
        job.next_id = token_id
        return True

    def _decode_step(self) -> None:
        jobs = [job for job in self.active if job.reply is None]  # remote answers stream elsewhere
        if not jobs:
            return
        metrics.BATCH_SIZE.observe(len(jobs))
        self.max_batch = max(self.max_batch, len(jobs))
        t0 = time.perf_counter()
        try:
            logits = self._decode(jobs)
        except Exception:
            logits = None
        else:
            dt = time.perf_counter() - t0
            self.decoded_rows, self.decode_s = self.decoded_rows + len(jobs), self.decode_s + dt
            metrics.DECODE_SECONDS.inc(dt)
            metrics.TOKENS.labels(kind="decoded").inc(len(jobs))
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
        if job.reply is not None:
            text = job.reply.close()  # a remote answer: its stream stops here
        if job.call is not None:
            text = ""  # a call says nothing; an unfinished one leaves its turns pending (cancelled) or fails
            if status in ("completed", "incomplete"):
                try:
                    job.call = tool_calls.ToolCall(job.call.call_id, job.call.name, tool_calls.finish_arguments(
                        job.call.name, job.call_text))  # fmt: skip
                    status, reason = "completed", None
                except ValueError as e:
                    status, reason, error = "failed", None, str(e)
        if status == "failed":
            conv.cache.reset()
        elif job.turns and not conv.closed:
            if status == "cancelled" and not text:
                conv.restore_pending(job.turns, job.encode_ms)
            else:
                calls = (job.call,) if job.call is not None else ()
                conv.record(job.turns, text, job.response_id, calls)
        done = job.done(status, reason, text, error)
        if job.reply is not None:
            done = job.reply.amend(done, self.backend.tokenizer)
        conv.busy = False
        conv.touch()
        job.cmd.on_finish(conv.session_id, job.response_id)
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
