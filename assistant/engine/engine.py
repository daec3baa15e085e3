"""`Engine`: the asyncio-facing shell of the inference engine (public surface documented in `api.py`).

Every method here runs on the event loop and only sends typed commands (`commands.py`) to the worker thread
(`worker.py`), which owns the backend, the model, every `Conversation` and every KV cache; the event loop never runs
model code and never touches model state. Results come back through concurrent futures (user turns, `call`) and
bounded `ResponseStream`s (responses).

    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)   # weights load on the worker
    await engine.start()                                   # raises what the load raised

Admission control is decided here, synchronously, from the loop's own bookkeeping (open session ids, outstanding
response ids): at most `max_active` responses decode together and at most `max_queued` more wait for a slot;
`respond` beyond that raises `ServerBusy` at once (never an unbounded wait). One response at a time per session: a
second `respond` while one is outstanding raises `ConversationBusy`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from assistant.backends.base import Backend, Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine import metrics
from assistant.engine.api import ConversationBusy, ResponseOptions, ServerBusy, TurnInfo, UnknownSession, new_id
from assistant.engine.commands import (
    CallCmd,
    CancelCmd,
    CloseSessionCmd,
    DeleteItemCmd,
    DiscardCmd,
    InstructionsCmd,
    OpenSessionCmd,
    PrepareCmd,
    ResetSessionCmd,
    RespondCmd,
    SpeculateCmd,
    StopCmd,
    TruncateReplyCmd,
)
from assistant.engine.stream import ResponseStream
from assistant.engine.worker import Worker

T = TypeVar("T")


class Engine:
    def __init__(
        self,
        backend: Backend | None,
        engine_cfg: EngineConfig,
        gen_cfg: GenerationConfig,
        *,
        reuse_cache: bool = True,
        load: Callable[[], Backend] | None = None,
    ):
        """An already loaded `backend`, or `load` to build it on the worker thread at `start`.
        `reuse_cache=False` makes every response prefill its whole prompt (the benchmark's baseline)."""
        self.cfg = engine_cfg
        self.gen_cfg = gen_cfg
        self._worker = Worker(engine_cfg, gen_cfg, reuse_cache, backend=backend, load=load)
        self._lock = threading.Lock()  # the worker's on_finish also reads/writes the maps below
        self._sessions: set[str] = set()
        self._responses: dict[str, ResponseStream] = {}  # response id -> stream, until its ResponseDone
        self._by_session: dict[str, str] = {}  # session id -> its outstanding response id
        self._started = False

    @classmethod
    def loading(cls, load: Callable[[], Backend], engine_cfg: EngineConfig, gen_cfg: GenerationConfig) -> Engine:
        return cls(None, engine_cfg, gen_cfg, load=load)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker; returns once the backend is loaded (raises the load's error)."""
        if not self._started:
            self._worker.thread.start()
            self._started = True
        # shielded: a caller that gives up waiting (a signal during the load) must not cancel the worker's future
        await asyncio.shield(asyncio.wrap_future(self._worker.loaded))

    async def stop(self) -> None:
        """Cancel everything outstanding (each stream still gets its ResponseDone) and join the worker."""
        if not self._started or not self._worker.thread.is_alive():
            return
        self._worker.commands.put(StopCmd())
        await asyncio.to_thread(self._worker.thread.join)

    @property
    def ready(self) -> bool:
        loaded = self._worker.loaded
        done_ok = loaded.done() and not loaded.cancelled() and loaded.exception() is None
        return self._started and done_ok and self._worker.thread.is_alive()

    @property
    def backend(self) -> Backend:
        """The loaded backend (read-only use on the loop: its name, tokenizer facts)."""
        return self._worker.loaded.result(timeout=0)

    def decode_totals(self) -> tuple[int, float]:
        """(rows decoded, seconds in decode steps) since start, prefills excluded: the difference of two readings
        gives the batch's decode speed (benchmarks; /metrics has the same as counters)."""
        return self._worker.decoded_rows, self._worker.decode_s

    async def call(self, fn: Callable[[Backend], T]) -> T:
        """Run `fn(backend)` on the worker between two decode steps, after every user turn queued before it
        (benchmarks' baselines, tests)."""
        self._require_started()
        reply: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._worker.commands.put(CallCmd(fn, reply))
        return await asyncio.wrap_future(reply)

    # ---- sessions -----------------------------------------------------------------------------------------------
    def open_session(self, session_id: str, instructions: str | None = None) -> None:
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open; close it first or use another id")
            self._sessions.add(session_id)
        self._worker.commands.put(OpenSessionCmd(session_id, instructions))

    def close_session(self, session_id: str) -> None:
        """Forget the session; its outstanding response ends with ResponseDone(cancelled, "session_closed")."""
        with self._lock:
            known = session_id in self._sessions
            self._sessions.discard(session_id)
        if known:
            self._worker.commands.put(CloseSessionCmd(session_id))

    def reset_session(self, session_id: str) -> None:
        """`conversation.reset`: history, pending turns and cache are dropped; the outstanding response is cancelled."""
        self._worker.commands.put(ResetSessionCmd(self._open(session_id)))

    def set_instructions(self, session_id: str, instructions: str | None) -> None:
        """Replace the system text (None or "" = the backend default); applies from the next response."""
        self._worker.commands.put(InstructionsCmd(self._open(session_id), instructions))

    def truncate_reply(self, session_id: str, response_id: str, text: str) -> None:
        """The listener heard only `text` of that response's reply: the history keeps just that (an empty text puts
        its turn back to pending when it is the newest exchange). Sessions already closed are ignored."""
        with self._lock:
            known = session_id in self._sessions
        if known:
            self._worker.commands.put(TruncateReplyCmd(session_id, response_id, text))

    def delete_item(self, session_id: str, key: str | None = None, response_id: str | None = None) -> None:
        """`conversation.item.delete`: the user turn `key` or the reply of `response_id` leaves later prompts (after
        the session's turns queued before it). Sessions already closed are ignored."""
        with self._lock:
            known = session_id in self._sessions
        if known:
            self._worker.commands.put(DeleteItemCmd(session_id, key, response_id))

    def _open(self, session_id: str) -> str:
        with self._lock:
            if session_id not in self._sessions:
                raise UnknownSession(session_id)
        return session_id

    @property
    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    # ---- turns and responses ------------------------------------------------------------------------------------
    async def add_user_turn(self, session_id: str, utterance: Utterance) -> TurnInfo:
        """Run the backend's audio work for this turn on the worker (in bounded chunks with other queued turns); the
        turn is then pending and is answered by the next `respond`. Raises what the backend raised for a bad
        utterance, and `TurnTooLong` (nothing enters the conversation) when its text or transcript is over
        `engine.max_turn_tokens`."""
        return await self._submit_turn(session_id, utterance, confirm=False)

    async def confirm_user_turn(self, session_id: str, utterance: Utterance) -> TurnInfo:
        """`add_user_turn`, reusing the audio work of `speculate_user_turn` for the same key when `utterance` is
        identical to the speculated one and its "Audio k" number is unchanged (then `TurnInfo.speculative`)."""
        return await self._submit_turn(session_id, utterance, confirm=True)

    def speculate_user_turn(
        self, session_id: str, utterance: Utterance, heard: bool = False
    ) -> concurrent.futures.Future[TurnInfo | None] | None:
        """Start this turn's audio work now, before it is committed; returns at once. Nothing enters the
        conversation until `confirm_user_turn`; `discard_user_turn` (or a reset/close) forgets it. With `heard`, a
        future of its `TurnInfo` (the transcript so far, for semantic turn detection), None if it did not run."""
        self._require_started()
        fut: concurrent.futures.Future[TurnInfo | None] | None = concurrent.futures.Future() if heard else None
        self._worker.commands.put(SpeculateCmd(self._open(session_id), utterance, time.monotonic(), fut))
        return fut

    def discard_user_turn(self, session_id: str, key: str) -> None:
        """Forget the speculation of `key` (not yet run: it never runs). Unknown sessions and keys are ignored."""
        if self.ready:
            self._worker.commands.put(DiscardCmd(session_id, key))

    async def _submit_turn(self, session_id: str, utterance: Utterance, confirm: bool) -> TurnInfo:
        self._open(session_id)
        self._require_started()
        reply: concurrent.futures.Future[TurnInfo] = concurrent.futures.Future()
        self._worker.commands.put(PrepareCmd(session_id, utterance, time.monotonic(), reply, confirm))
        try:
            return await asyncio.wrap_future(reply)
        except asyncio.CancelledError:
            reply.cancel()  # the worker skips it if it has not started yet
            raise

    def respond(
        self, session_id: str, options: ResponseOptions | None = None, response_id: str | None = None
    ) -> ResponseStream:
        """Start answering the session's pending turns under `response_id` (the caller's, e.g. the protocol's; a new
        one when None). Raises `ServerBusy` over the admission limits and `ConversationBusy` while this session
        already has a response outstanding."""
        self._open(session_id)
        self._require_started()
        loop = asyncio.get_running_loop()
        response_id = response_id or new_id("resp")
        with self._lock:
            if session_id in self._by_session:
                raise ConversationBusy(
                    f"session {session_id!r} already has response {self._by_session[session_id]} in progress; "
                    "wait for its response.done or cancel it first"
                )
            if response_id in self._responses:
                raise ValueError(f"response id {response_id!r} is already in use; pass a new one")
            limit = self.cfg.max_active + self.cfg.max_queued
            if len(self._responses) >= limit:
                metrics.ADMISSION_REJECTED.inc()
                raise ServerBusy(
                    f"engine at capacity: {len(self._responses)} responses outstanding (max_active "
                    f"{self.cfg.max_active} + max_queued {self.cfg.max_queued}); retry shortly"
                )
            stream = ResponseStream(response_id, session_id, loop, self.cfg.delta_queue_size, self.cancel)
            self._responses[response_id] = stream
            self._by_session[session_id] = response_id
        cmd = RespondCmd(response_id, session_id, options or ResponseOptions(), stream, time.monotonic(), self._release)
        self._worker.commands.put(cmd)
        return stream

    def _release(self, session_id: str, response_id: str) -> None:
        """Worker side, just before the ResponseDone is delivered: the slot is free for new requests."""
        with self._lock:
            self._responses.pop(response_id, None)
            if self._by_session.get(session_id) == response_id:
                del self._by_session[session_id]

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
