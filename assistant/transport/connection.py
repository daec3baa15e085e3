"""`Connection`: the asyncio driver of one sans-I/O `Session` for any transport. This is the transport interface.

A transport (WebSocket, MQTT, Wyoming) turns its bytes into calls on a `Connection` and gets server events back
through its `send` callback; it never sees the engine or the protocol's state:

    conn = hub.open("websocket", send=queue_event, close=close_socket, dialect="ga", input_rate_hz=None)
    await conn.start()                      # session.created is sent; raises SessionLimitReached (then: error+close)
    conn.receive_text(frame)                # one JSON client event (str/bytes); or conn.receive_event(dict)
    conn.receive_audio(pcm)                 # PCM16 LE mono at the session's input rate
    conn.reject_oversized(n_bytes)          # the transport dropped a message over server.max_message_bytes
    await conn.close()                      # the answer in flight is cancelled (its response.done is sent first)

`send(event: dict) -> None` must never block: the transport owns a bounded queue and its overflow policy.
`close(code: int, reason: str) -> Awaitable` is how the hub ends the connection (idle timeout, shutdown).
The receive calls are synchronous and return at once: every engine command the core returns is carried out here
(turns and responses as tasks owned by this connection; their results are fed back into the core), so a client's
next event (barge-in, response.cancel) is handled while the model works.

Spoken answers: each `Speak` goes to the hub's shared voice pool (`hub.speech`, bounded, off the event loop); its
result comes back into the core (`ClauseSpoken` / `SpeechFailed`), which puts clauses in order and sends the audio
as `response.output_audio.delta` events through the same `send` (a transport that wants raw audio, e.g. an MQTT
speech topic, decodes those). `CancelSpeech` cancels the clauses not synthesised yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Histogram

from assistant.engine.api import ConversationBusy, ServerBusy, TextDelta, ToolCallStarted, TurnInfo
from assistant.realtime import commands as C
from assistant.realtime.protocol import ERROR_CODES
from assistant.realtime.session import Output, Session

log = logging.getLogger("assistant.session")

FIRST_AUDIO_SECONDS = Histogram(
    "assistant_server_commit_to_first_audio_seconds",
    "Latency heard by the client: end of speech detected (server VAD) or response.create -> first answer audio sent",
    buckets=(0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
SYNTHESIS_SECONDS = Histogram(
    "assistant_voice_clause_seconds",
    "Time one clause of a spoken answer spent in the voice pool (waiting and synthesising)",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
)
FIRST_TEXT_SECONDS = Histogram(
    "assistant_server_commit_to_first_text_seconds",
    "Latency seen by the client: end of speech detected (server VAD) or response.create -> first answer text sent",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
CLIENT_ERRORS = Counter("assistant_server_client_errors_total", "Error events sent to clients, by code", ["code"])

SendFn = Callable[[dict[str, Any]], None]
CloseFn = Callable[[int, str], Awaitable[None]]


class Connection:
    """One session of one transport: the core plus the tasks that carry out its engine commands."""

    def __init__(self, hub: Any, transport: str, session: Session, send: SendFn, close: CloseFn) -> None:
        self.hub = hub
        self.engine = hub.engine
        self.transport = transport
        self.session = session
        self.id = session.id
        self._send = send
        self._close_transport = close
        self._tasks: set[asyncio.Task[None]] = set()  # turn preparations and response relays in flight
        self._relays: dict[str, asyncio.Task[None]] = {}  # response id -> relay task
        self._speaking: dict[str, set[concurrent.futures.Future[Any]]] = {}  # response id -> clauses in the pool
        self.closed = False
        self._idle = asyncio.Event()  # set whenever the core has nothing queued or in flight

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._run(self.session.start(time.monotonic()))
        log.info("session %s opened (%s, %s dialect)", self.id, self.transport, self.session.events.dialect)

    async def close(self, grace_s: float | None = None) -> None:
        """Cancel the answer in flight, wait (up to `grace_s`) for its response.done, end the engine conversation."""
        if self.closed:
            return
        self.closed = True
        self._run(self.session.close())
        relays = list(self._relays.values())
        if relays:
            wait_s = self.hub.cfg.server.shutdown_grace_s + 1 if grace_s is None else grace_s
            await asyncio.wait(relays, timeout=wait_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.hub.release(self)
        log.info("session %s closed", self.id)

    async def end(self, code: int, reason: str) -> None:
        """The hub ends this connection (idle, shutdown): the transport closes, then the session."""
        with contextlib.suppress(Exception):
            await self._close_transport(code, reason)
        await self.close()

    @property
    def idle(self) -> bool:
        return self.session.idle

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def last_input_s(self) -> float:
        return self.session.last_input_s or 0.0

    # ---- client input (synchronous: never waits for the model) ------------------------------------------------
    def receive_text(self, data: str | bytes) -> None:
        self._run(self.session.receive_text(data, time.monotonic()))

    def receive_event(self, obj: dict[str, Any]) -> None:
        self._run(self.session.receive_event(obj, time.monotonic()))

    def receive_audio(self, pcm: bytes) -> None:
        self._run(self.session.receive_audio(pcm, time.monotonic()))

    def reject_oversized(self, n_bytes: int) -> None:
        self._run(self.session.reject_oversized(n_bytes))

    # ---- outputs of the core -------------------------------------------------------------------------------------
    def _run(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, dict):
                self._emit(out)
            elif isinstance(out, C.FirstText):
                FIRST_TEXT_SECONDS.observe(out.latency_s)
            elif isinstance(out, C.FirstAudio):
                FIRST_AUDIO_SECONDS.observe(out.latency_s)
            else:
                self._command(out)
        if self.session.idle:
            self._idle.set()
        else:
            self._idle.clear()

    def _emit(self, event: dict[str, Any]) -> None:
        if event.get("type") == "error":
            CLIENT_ERRORS.labels(code=event["error"]["code"]).inc()
        try:
            self._send(event)
        except Exception:  # the transport is gone; its own loop notices and closes the connection
            log.debug("session %s: send failed for %s", self.id, event.get("type"), exc_info=True)

    def _feed(self, out: C.EngineOutput) -> None:
        self._run(self.session.engine_output(out, time.monotonic()))

    def _command(self, cmd: C.EngineCommand) -> None:
        e, sid = self.engine, self.id
        if isinstance(cmd, C.OpenConversation):
            e.open_session(sid, cmd.instructions)
        elif isinstance(cmd, C.CloseConversation):
            e.close_session(sid)
        elif isinstance(cmd, C.ResetConversation):
            e.reset_session(sid)
        elif isinstance(cmd, C.SetInstructions):
            e.set_instructions(sid, cmd.instructions)
        elif isinstance(cmd, C.Speculate):
            try:
                heard = e.speculate_user_turn(sid, cmd.utterance, heard=cmd.heard)
            except Exception as err:  # only a head start: the commit does the work anyway
                log.debug("session %s: speculation not started: %s", sid, err)
                heard = None
                if cmd.heard:  # semantic VAD still hears that there are no words (and waits the unclear time)
                    asyncio.get_running_loop().call_soon(self._feed, C.TurnHeard(cmd.utterance.key, None))
            if heard is not None:
                self._spawn(self._turn_heard(cmd.utterance.key, heard))
        elif isinstance(cmd, C.Discard):
            e.discard_user_turn(sid, cmd.key)
        elif isinstance(cmd, C.AddTurn):
            self._spawn(self._add_turn(cmd))
        elif isinstance(cmd, C.StartResponse):
            self._start_response(cmd)
        elif isinstance(cmd, C.CancelResponse):
            e.cancel(cmd.response_id, cmd.reason)
        elif isinstance(cmd, C.TruncateReply):
            e.truncate_reply(sid, cmd.response_id, cmd.text)
        elif isinstance(cmd, C.DeleteItem):
            e.delete_item(sid, cmd.key, cmd.response_id)
        elif isinstance(cmd, C.Speak):
            self._speak(cmd)
        elif isinstance(cmd, C.CancelSpeech):
            for fut in self._speaking.pop(cmd.response_id, ()):
                fut.cancel()  # not started yet: never runs; the one running finishes and the core ignores it

    def _spawn(self, coro: Any, response_id: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"session-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if response_id is not None:
            self._relays[response_id] = task
            task.add_done_callback(lambda _t: self._relays.pop(response_id, None))

    async def _turn_heard(self, key: str, heard: concurrent.futures.Future[TurnInfo | None]) -> None:
        info = await asyncio.wrap_future(heard)
        self._feed(C.TurnHeard(key, info.transcript if info is not None else None))

    async def _add_turn(self, cmd: C.AddTurn) -> None:
        utt = cmd.utterance
        try:
            if cmd.confirm:
                info = await self.engine.confirm_user_turn(self.id, utt)
            else:
                info = await self.engine.add_user_turn(self.id, utt)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the backend refused the turn (too short, too long, ...): the session goes on
            code = getattr(err, "code", None)
            self._feed(C.TurnFailed(utt.key, str(err), code if code in ERROR_CODES else "turn_failed"))
            return
        self._feed(C.TurnPrepared(utt.key, info))

    def _start_response(self, cmd: C.StartResponse) -> None:
        try:
            stream = self.engine.respond(self.id, cmd.options, response_id=cmd.response_id)
        except (ServerBusy, ConversationBusy) as err:
            self._feed(C.ResponseRefused(cmd.response_id, err.code, str(err)))
            return
        self._spawn(self._relay(stream), cmd.response_id)

    def _speak(self, cmd: C.Speak) -> None:
        pool = self.hub.speech
        if pool is None:  # the core asks only when the session has a voice; keep the answer going regardless
            self._feed(C.SpeechFailed(cmd.response_id, cmd.index, "this server has no voice"))
            return
        fut = pool.submit(cmd.text, cmd.speed, cmd.rate_hz)
        self._speaking.setdefault(cmd.response_id, set()).add(fut)
        self._spawn(self._deliver_speech(cmd, fut, time.monotonic()))

    async def _deliver_speech(self, cmd: C.Speak, fut: concurrent.futures.Future[Any], submitted_s: float) -> None:
        try:
            speech = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if fut.cancelled():  # CancelSpeech: the core no longer wants it
                return
            raise
        except Exception as err:  # the voice failed on this text: the core sends its text and says why
            log.warning("session %s: synthesis of clause %d failed: %s", self.id, cmd.index, err)
            self._feed(C.SpeechFailed(cmd.response_id, cmd.index, f"{type(err).__name__}: {err}"))
            return
        finally:
            pending = self._speaking.get(cmd.response_id)
            if pending is not None:
                pending.discard(fut)
                if not pending:
                    del self._speaking[cmd.response_id]
        SYNTHESIS_SECONDS.observe(time.monotonic() - submitted_s)
        self._feed(C.ClauseSpoken(cmd.response_id, cmd.index, speech.pcm.tobytes(), speech.synth_s * 1000.0))

    async def _relay(self, stream: Any) -> None:
        rid = stream.response_id
        async for out in stream:
            if isinstance(out, TextDelta):
                self._feed(C.ResponseDelta(rid, out.text))
            elif isinstance(out, ToolCallStarted):
                self._feed(out)
            else:
                self._feed(C.ResponseFinished(out))
