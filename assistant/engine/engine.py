"""`Engine`: the asyncio-facing shell of the inference engine (public surface documented in `api.py`).

Every method here runs on the event loop and only enqueues commands for the worker thread (`worker.py`), which
owns the backend, the model and every KV cache; the event loop never runs model code. Results come back through
concurrent futures (user turns) and bounded `ResponseStream`s (responses).

Admission control is decided here, synchronously: at most `max_active` responses decode together and at most
`max_queued` more wait for a slot; `respond` beyond that raises `ServerBusy` at once (never an unbounded wait).
One response at a time per session: a second `respond` while one is queued or running raises
`ConversationBusy` (OpenAI code `conversation_already_has_active_response`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time

from assistant.backends.base import Backend, Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine import metrics
from assistant.engine.api import ConversationBusy, ResponseOptions, ServerBusy, TurnInfo, UnknownSession
from assistant.engine.conversation import Conversation
from assistant.engine.stream import ResponseStream
from assistant.engine.worker import (
    CancelCmd,
    DiscardCmd,
    Job,
    PrepareCmd,
    RespondCmd,
    SessionCmd,
    SpeculateCmd,
    StopCmd,
    Worker,
)

_ids = itertools.count(1)


class Engine:
    def __init__(
        self, backend: Backend, engine_cfg: EngineConfig, gen_cfg: GenerationConfig, *, reuse_cache: bool = True
    ):
        """`reuse_cache=False` makes every response prefill its whole prompt (the benchmark's baseline)."""
        self.backend = backend
        self.cfg = engine_cfg
        self.gen_cfg = gen_cfg
        self._worker = Worker(backend, engine_cfg, gen_cfg, reuse_cache)
        self._lock = threading.Lock()  # guards the admission counters and session/response maps below
        self._sessions: dict[str, Conversation] = {}
        self._responses: dict[str, ResponseStream] = {}  # response id -> stream, until its ResponseDone
        self._by_session: dict[str, str] = {}  # session id -> its outstanding response id
        self._started = False

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._started:
            self._worker.thread.start()
            self._started = True

    async def stop(self) -> None:
        """Cancel everything outstanding (each stream still gets its ResponseDone) and join the worker."""
        if not self._started or not self._worker.thread.is_alive():
            return
        self._worker.commands.put(StopCmd())
        await asyncio.to_thread(self._worker.thread.join)

    @property
    def ready(self) -> bool:
        return self._started and self._worker.thread.is_alive()

    # ---- sessions -----------------------------------------------------------------------------------------------
    def open_session(self, session_id: str, instructions: str | None = None) -> None:
        cache = self.backend.lm.new_cache()
        cache.release()  # storage grows on the first prefill; an idle session costs nothing
        system = instructions or self.backend.default_system_prompt
        conv = Conversation(session_id=session_id, system=system, cache=cache)
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open; close it first or use another id")
            self._sessions[session_id] = conv
        self._worker.commands.put(SessionCmd(conv, "open"))

    def close_session(self, session_id: str) -> None:
        """Forget the session; its outstanding response ends with ResponseDone(cancelled, "session_closed")."""
        with self._lock:
            conv = self._sessions.pop(session_id, None)
        if conv is not None:
            self._worker.commands.put(SessionCmd(conv, "close"))

    def reset_session(self, session_id: str) -> None:
        """`conversation.reset`: history, pending turns and cache are dropped; the outstanding response is cancelled."""
        self._worker.commands.put(SessionCmd(self._conv(session_id), "reset"))

    def set_instructions(self, session_id: str, instructions: str | None) -> None:
        """Replace the system text (None or "" = the backend default); applies from the next response."""
        self._worker.commands.put(SessionCmd(self._conv(session_id), "instructions", instructions))

    def _conv(self, session_id: str) -> Conversation:
        with self._lock:
            conv = self._sessions.get(session_id)
        if conv is None:
            raise UnknownSession(session_id)
        return conv

    @property
    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    # ---- turns and responses ------------------------------------------------------------------------------------
    async def add_user_turn(self, session_id: str, utterance: Utterance) -> TurnInfo:
        """Run the backend's audio work for this turn on the worker (batched with turns arriving meanwhile); the turn
        is then pending and is answered by the next `respond`. Raises what the backend raised for a bad utterance."""
        return await self._submit_turn(session_id, utterance, confirm=False)

    async def confirm_user_turn(self, session_id: str, utterance: Utterance) -> TurnInfo:
        """`add_user_turn`, reusing the audio work of `speculate_user_turn` for the same key when `utterance` is
        identical to the speculated one and its "Audio k" number is unchanged (then `TurnInfo.speculative`)."""
        return await self._submit_turn(session_id, utterance, confirm=True)

    def speculate_user_turn(self, session_id: str, utterance: Utterance) -> None:
        """Start this turn's audio work now, before it is committed; returns at once. Nothing enters the
        conversation until `confirm_user_turn`; `discard_user_turn` (or a reset/close) forgets it."""
        conv = self._conv(session_id)
        self._require_started()
        self._worker.commands.put(SpeculateCmd(conv, utterance, time.monotonic()))

    def discard_user_turn(self, session_id: str, key: str) -> None:
        """Forget the speculation of `key` (not yet run: it never runs). Unknown sessions and keys are ignored."""
        with self._lock:
            conv = self._sessions.get(session_id)
        if conv is not None and self.ready:
            self._worker.commands.put(DiscardCmd(conv, key))

    async def _submit_turn(self, session_id: str, utterance: Utterance, confirm: bool) -> TurnInfo:
        conv = self._conv(session_id)
        self._require_started()
        reply: concurrent.futures.Future[TurnInfo] = concurrent.futures.Future()
        self._worker.commands.put(PrepareCmd(conv, utterance, time.monotonic(), reply, confirm))
        try:
            return await asyncio.wrap_future(reply)
        except asyncio.CancelledError:
            reply.cancel()  # the worker skips it if it has not started yet
            raise

    def respond(self, session_id: str, options: ResponseOptions | None = None) -> ResponseStream:
        """Start answering the session's pending turns. Raises `ServerBusy` over the admission limits and
        `ConversationBusy` while this session already has a response outstanding."""
        conv = self._conv(session_id)
        self._require_started()
        loop = asyncio.get_running_loop()
        with self._lock:
            if session_id in self._by_session:
                raise ConversationBusy(
                    f"session {session_id!r} already has response {self._by_session[session_id]} in progress; "
                    "wait for its response.done or cancel it first"
                )
            limit = self.cfg.max_active + self.cfg.max_queued
            if len(self._responses) >= limit:
                metrics.ADMISSION_REJECTED.inc()
                raise ServerBusy(
                    f"engine at capacity: {len(self._responses)} responses outstanding (max_active "
                    f"{self.cfg.max_active} + max_queued {self.cfg.max_queued}); retry shortly"
                )
            response_id = f"resp_{next(_ids):06d}"
            stream = ResponseStream(response_id, session_id, loop, self.cfg.delta_queue_size, self.cancel)
            self._responses[response_id] = stream
            self._by_session[session_id] = response_id
            conv.busy = True
        job = Job(response_id, conv, options or ResponseOptions(), stream, time.monotonic(), self._release)
        self._worker.commands.put(RespondCmd(job))
        return stream

    def _release(self, job: Job) -> None:
        """Worker side, just before the ResponseDone is delivered: the slot is free for new requests."""
        with self._lock:
            self._responses.pop(job.response_id, None)
            if self._by_session.get(job.conv.session_id) == job.response_id:
                del self._by_session[job.conv.session_id]

    def cancel(self, response_id: str, reason: str = "client_cancelled") -> bool:
        """Stop a response within one decode step; False if it is unknown or already finished."""
        with self._lock:
            known = response_id in self._responses
        if known:
            self._worker.commands.put(CancelCmd(response_id, reason))
        return known

    def active_response(self, session_id: str) -> str | None:
        """The id of the session's queued or running response, if any."""
        with self._lock:
            return self._by_session.get(session_id)

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._responses)

    def _require_started(self) -> None:
        if not self.ready:
            raise RuntimeError("engine is not running: await engine.start() first (or it was stopped)")
