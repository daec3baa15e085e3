"""Transport-agnostic realtime session core: client events and PCM in, server events (dicts) out.

Owner: engineer D. Used by the WebSocket server (`app.py`) and the MQTT bridge; neither knows the protocol details.

    hub = SessionHub(cfg, engine)                       # one per process; enforces cfg.server.max_sessions
    session = hub.create_session(send, dialect="ga", input_rate_hz=16000)   # raises SessionLimitReached
    await session.start()                               # opens the engine conversation, sends session.created
    await session.handle_text(frame)                    # one JSON client event (str/bytes)
    await session.handle_event({"type": ...})           # ... or an already-parsed dict
    await session.handle_audio(pcm_bytes)               # binary PCM16 LE mono at the session's input rate
    session.reject_oversized(n_bytes)                   # the transport dropped a too-large message
    await session.close()                               # cancels work, closes the engine conversation, frees the slot

`send(event: dict) -> None` is the transport's callback. It must never block: the transport owns a bounded queue and
its overflow policy (the WebSocket server closes a client that falls `server.send_queue_events` behind). Events are
emitted in protocol order; `session.created` is always first. `input_rate_hz=None` means the OpenAI default 24 kHz.

Inside, each session has one worker task (the owner of all model-facing work) fed by a bounded job queue: a
committed turn is prepared (`engine.add_user_turn`), its transcript reported, then answered if the turn detection
says so; `response.create` queues an answer. Handlers never await model work, so the receive loop stays responsive
(barge-in and `response.cancel` act at once). Every response that starts ends in exactly one `response.done`.

Speculation (server VAD, `vad.early_prepare_ms` > 0): when the segmenter reports a tentative end (the open turn's
trailing silence is long enough that its audio is final unless speech resumes), the turn's audio work starts at once
(`engine.speculate_user_turn`), during the rest of the end-of-turn silence. At the commit, if the committed samples
equal the speculated ones, the turn is confirmed (`engine.confirm_user_turn`, which reuses that work); otherwise
(speech resumed, forced or manual commit, clear, reset, new turn detection, close) the speculation is discarded and
the turn takes the normal path. Either way the turn and its answer are the same; only the wait differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from assistant.audio.resample import StreamResampler
from assistant.audio.vad import (
    MODEL_RATE_HZ,
    Committed,
    SpeechStarted,
    SpeechStopped,
    TentativeEnd,
    TentativeVoid,
    VadEvent,
    VadSegmenter,
)
from assistant.backends.base import Utterance
from assistant.config import Config
from assistant.engine.api import ConversationBusy, ResponseDone, ResponseOptions, ServerBusy, TextDelta
from assistant.server import protocol as P
from assistant.server import settings as S

log = logging.getLogger("assistant.server")

SESSIONS = Gauge("assistant_server_sessions", "Open realtime sessions (WebSocket and MQTT)")
FIRST_TEXT_SECONDS = Histogram(
    "assistant_server_commit_to_first_text_seconds",
    "Latency seen by the client: end of speech detected (server VAD) or response.create -> first answer text sent",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
CLIENT_ERRORS = Counter("assistant_server_client_errors_total", "Error events sent to clients, by code", ["code"])

JOB_QUEUE_SIZE = 16  # committed turns + response requests waiting per session; overflow -> error server_busy
MAX_BUFFER_MS = 30000  # push-to-talk buffer keeps the newest 30 s: one model audio window

SendFn = Callable[[dict[str, Any]], None]


class SessionLimitReached(Exception):
    """`max_sessions` sessions are open; the transport sends `error` code `server_busy` and closes."""

    code = "server_busy"


class SessionHub:
    """Registry of open sessions: admission (`max_sessions`), ids, and graceful shutdown of them all."""

    def __init__(self, cfg: Config, engine: Any, model_name: str = "local") -> None:
        self.cfg = cfg
        self.engine = engine
        self.model_name = model_name
        self.sessions: dict[str, RealtimeSession] = {}
        self.closing = False

    def create_session(
        self, send: SendFn, dialect: P.Dialect = "ga", input_rate_hz: int | None = None
    ) -> RealtimeSession:
        if self.closing:
            raise SessionLimitReached("the server is shutting down; reconnect later")
        if len(self.sessions) >= self.cfg.server.max_sessions:
            raise SessionLimitReached(
                f"{len(self.sessions)} sessions open, the limit is server.max_sessions={self.cfg.server.max_sessions};"
                " retry later"
            )
        session = RealtimeSession(self, send, dialect, input_rate_hz)
        self.sessions[session.id] = session
        SESSIONS.set(len(self.sessions))
        return session

    def busy_error(self, dialect: P.Dialect, message: str) -> dict[str, Any]:
        """The `error` event a transport sends before closing a connection refused by `create_session`."""
        return P.EventFactory(dialect).error(P.ProtocolError("server_busy", message))

    def _release(self, session: RealtimeSession) -> None:
        self.sessions.pop(session.id, None)
        SESSIONS.set(len(self.sessions))

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new sessions, let in-flight responses finish for up to `grace_s`, then cancel and close all."""
        self.closing = True
        sessions = list(self.sessions.values())
        for s in sessions:
            s.accepting = False
        if sessions and grace_s > 0:
            await asyncio.wait([asyncio.create_task(s.wait_idle()) for s in sessions], timeout=grace_s)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


class RealtimeSession:
    """One conversation: VAD/turn logic, the engine conversation, and the protocol state machine."""

    def __init__(self, hub: SessionHub, send: SendFn, dialect: P.Dialect, input_rate_hz: int | None) -> None:
        self.hub = hub
        self.engine = hub.engine
        self.id = P.new_id("sess")
        self.events = P.EventFactory(dialect)
        self._send_fn = send
        vad = hub.cfg.vad
        td = S.TurnDetection(
            prefix_padding_ms=vad.prefix_padding_ms,
            silence_duration_ms=vad.silence_duration_ms,
            aggressiveness=vad.aggressiveness,
            min_speech_ms=vad.min_speech_ms,
            max_utterance_ms=vad.max_utterance_ms,
            frame_ms=vad.frame_ms,
        )
        self.settings = S.SessionSettings(
            model=hub.model_name, input_rate_hz=input_rate_hz or P.OPENAI_RATE_HZ, turn_detection=td
        )
        self.started = False
        self.closed = False
        self.accepting = True  # False during shutdown: new input is ignored
        self._jobs: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(JOB_QUEUE_SIZE)
        self._worker: asyncio.Task[None] | None = None
        self._busy = False  # the worker is running a job
        self._stream: Any = None  # the engine ResponseStream being relayed
        self._response_requested = False  # a respond job is queued or running
        self._audio_ms = 0  # 16 kHz samples' worth of audio received, in ms: the stream clock
        self._audio_samples = 0
        self._resampler = StreamResampler(self.settings.input_rate_hz)
        self._ptt: list[np.ndarray] = []
        self._vad: VadSegmenter | None = None
        self._spec: tuple[str, np.ndarray] | None = None  # (item id, int16 audio) handed to speculate_user_turn
        self._reset_segmenter()
        self._item_id = P.new_id("item")  # the user item the audio being received will become
        self._last_item_id: str | None = None
        self._committed_at: float | None = None  # when the turn now being answered was committed (latency metric)
        self._cancel_on_start = False  # barge-in arrived before the requested response had started

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.engine.open_session(self.id, None)
        self._emit(self.events.event("session.created", session=self.events.session(self.settings, self.id)))
        self._worker = asyncio.create_task(self._run_jobs(), name=f"session-{self.id}")
        self.started = True
        log.info("session %s opened (%s dialect, %d open)", self.id, self.events.dialect, len(self.hub.sessions))

    async def wait_idle(self) -> None:
        """Return once no job is queued or running (used by graceful shutdown)."""
        while self._busy or not self._jobs.empty():
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        if self._stream is not None:
            # Let the relay emit the response.done of a cancelled answer before the worker goes away.
            self._stream.cancel("client_cancelled")
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self.wait_idle_stream(), timeout=self.hub.cfg.server.shutdown_grace_s + 1)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._spec = None  # closing the engine conversation forgets its speculations
        if self.started:
            self.engine.close_session(self.id)
            log.info("session %s closed", self.id)
        self.hub._release(self)

    async def wait_idle_stream(self) -> None:
        while self._stream is not None:
            await asyncio.sleep(0.02)

    # ---- input -----------------------------------------------------------------------------------------------
    async def handle_text(self, data: str | bytes) -> None:
        try:
            event = P.parse_client_event(data)
        except P.ProtocolError as e:
            self._error(e)
            return
        await self._dispatch(event)

    async def handle_event(self, obj: dict[str, Any]) -> None:
        try:
            event = P.parse_client_event(obj)
        except P.ProtocolError as e:
            self._error(e)
            return
        await self._dispatch(event)

    async def handle_audio(self, pcm: bytes, event_id: str | None = None) -> None:
        """Raw PCM16 LE mono at the session's input rate (binary frame or decoded `input_audio_buffer.append`)."""
        if not self._ready(event_id):
            return
        if len(pcm) % 2:
            msg = f"PCM16 audio needs an even number of bytes, got {len(pcm)}; the chunk was dropped"
            self._error(P.ProtocolError("invalid_audio", msg, "audio", event_id))
            return
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)
        self._feed_16k(self._resampler.process(samples))

    def reject_oversized(self, n_bytes: int) -> None:
        limit = self.hub.cfg.server.max_message_bytes
        msg = f"message of {n_bytes} bytes exceeds server.max_message_bytes={limit}; send smaller chunks"
        self._error(P.ProtocolError("message_too_large", msg))

    # ---- dispatch --------------------------------------------------------------------------------------------
    def _ready(self, event_id: str | None) -> bool:
        if self.closed or not self.accepting:
            return False
        if not self.started:
            msg = "the session is not set up yet: wait for session.created before sending events"
            self._error(P.ProtocolError("session_not_ready", msg, None, event_id))
            return False
        return True

    async def _dispatch(self, ev: P.ClientEvent) -> None:
        if not self._ready(ev.event_id):
            return
        if isinstance(ev, P.AudioAppend):
            await self.handle_audio(ev.pcm, ev.event_id)
        elif isinstance(ev, P.SessionUpdate):
            self._session_update(ev)
        elif isinstance(ev, P.AudioCommit):
            self._commit(ev.event_id)
        elif isinstance(ev, P.AudioClear):
            self._clear()
            self._emit(self.events.event("input_audio_buffer.cleared"))
        elif isinstance(ev, P.ResponseCreate):
            self._request_response(ev)
        elif isinstance(ev, P.ResponseCancel):
            self._cancel(ev)
        elif isinstance(ev, P.ConversationReset):
            self._reset_conversation()
        elif isinstance(ev, P.TextMessage):
            self._text_message(ev)

    def _session_update(self, ev: P.SessionUpdate) -> None:
        old = self.settings
        try:
            new, warnings = S.apply_session_update(old, ev.session, ev.event_id)
        except P.ProtocolError as e:
            self._error(e)
            return
        for w in warnings:
            self._error(w)
        if new.input_rate_hz != old.input_rate_hz:
            # Audio already received was at the old rate: finish it through the old filter first.
            self._feed_16k(self._resampler.flush())
            self._resampler = StreamResampler(new.input_rate_hz)
        self.settings = new
        if new.turn_detection != old.turn_detection:
            self._reset_segmenter()  # an open turn under the old settings is dropped
        if new.instructions != old.instructions:
            self.engine.set_instructions(self.id, new.instructions or None)
        self._emit(self.events.event("session.updated", session=self.events.session(new, self.id)))

    def _reset_segmenter(self) -> None:
        td = self.settings.turn_detection
        self._ptt = []
        self._discard_speculation()
        if td is None:
            self._vad = None
            return
        params = dataclasses.replace(td.vad_params(), early_prepare_ms=self.hub.cfg.vad.early_prepare_ms)
        self._vad = VadSegmenter(params, stream_offset_ms=self._audio_ms)

    def _feed_16k(self, pcm16k: np.ndarray) -> None:
        if len(pcm16k) == 0:
            return
        self._audio_samples += len(pcm16k)
        self._audio_ms = self._audio_samples * 1000 // MODEL_RATE_HZ
        if self._vad is None:
            self._ptt.append(pcm16k)
            self._trim_ptt()
            return
        for vev in self._vad.feed(pcm16k):
            self._on_vad_event(vev)

    def _trim_ptt(self) -> None:
        limit = MAX_BUFFER_MS * MODEL_RATE_HZ // 1000
        total = sum(len(c) for c in self._ptt)
        if total > limit:
            self._ptt = [np.concatenate(self._ptt)[total - limit :]]

    def _on_vad_event(self, vev: VadEvent) -> None:
        td = self.settings.turn_detection
        if isinstance(vev, TentativeEnd):
            self._speculate(vev.audio)
        elif isinstance(vev, TentativeVoid):
            self._discard_speculation()  # speech resumed: that audio will not be the turn
        elif isinstance(vev, SpeechStarted):
            self._emit(
                self.events.event(
                    "input_audio_buffer.speech_started", audio_start_ms=vev.audio_start_ms, item_id=self._item_id
                )
            )
            if td is not None and td.interrupt_response:
                if self._stream is not None:
                    self._stream.cancel("turn_detected")  # barge-in
                elif self._response_requested:
                    # The answer is still waiting for its turn's audio work: it starts cancelled, so the committed
                    # turn still ends in exactly one response.done.
                    self._cancel_on_start = True
        elif isinstance(vev, SpeechStopped):
            self._emit(
                self.events.event(
                    "input_audio_buffer.speech_stopped", audio_end_ms=vev.audio_end_ms, item_id=self._item_id
                )
            )
        else:
            self._commit_audio(vev.audio, respond=td is not None and td.create_response)

    def _commit(self, event_id: str | None) -> None:
        if self._vad is not None:
            events = self._vad.commit_now()
            committed = [e for e in events if isinstance(e, Committed)]
            if committed and len(committed[0].audio) * 1000 >= P.MIN_COMMIT_MS * MODEL_RATE_HZ:
                for vev in events:
                    self._on_vad_event(vev)
                return
            audio_ms = len(committed[0].audio) * 1000 // MODEL_RATE_HZ if committed else 0
        else:
            self._feed_16k(self._resampler.flush())
            audio = np.concatenate(self._ptt) if self._ptt else np.zeros(0, dtype=np.int16)
            audio_ms = len(audio) * 1000 // MODEL_RATE_HZ
            if audio_ms >= P.MIN_COMMIT_MS:
                self._ptt = []
                self._commit_audio(audio, respond=False)
                return
        msg = f"buffer too small: expected at least {P.MIN_COMMIT_MS} ms of audio, have {audio_ms} ms"
        self._error(P.ProtocolError("input_audio_buffer_commit_empty", msg, None, event_id))

    def _commit_audio(self, audio: np.ndarray, respond: bool) -> None:
        item_id, self._item_id = self._item_id, P.new_id("item")
        prev, self._last_item_id = self._last_item_id, item_id
        self._emit(self.events.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=prev))
        for event in self.events.user_item(item_id, prev, {"type": "input_audio", "transcript": None}):
            self._emit(event)
        spec, self._spec = self._spec, None
        speculated = spec is not None and spec[0] == item_id and np.array_equal(spec[1], audio)
        if spec is not None and not speculated:
            self.engine.discard_user_turn(self.id, spec[0])
        utt = Utterance(key=item_id, audio=audio.astype(np.float32) / 32768.0)
        log.info(
            "session %s: utterance %s committed (%d ms of audio%s)",
            self.id,
            item_id,
            len(audio) * 1000 // MODEL_RATE_HZ,
            ", prepared during the silence" if speculated else "",
        )
        if respond:
            self._response_requested = True
            self._committed_at = time.monotonic()
        self._enqueue(("turn", (utt, respond, speculated)), None)

    def _speculate(self, audio: np.ndarray) -> None:
        """Start the open turn's audio work now (the silence may still be broken by speech)."""
        self._discard_speculation()
        if self.closed:
            return
        utt = Utterance(key=self._item_id, audio=audio.astype(np.float32) / 32768.0)
        try:
            self.engine.speculate_user_turn(self.id, utt)
        except Exception as e:  # only a head start: the commit does the work anyway
            log.debug("session %s: speculation not started: %s", self.id, e)
            return
        self._spec = (self._item_id, audio.copy())

    def _discard_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            self.engine.discard_user_turn(self.id, spec[0])

    def _clear(self) -> None:
        self._discard_speculation()
        self._resampler.flush()
        if self._vad is not None:
            self._vad.reset()
        self._ptt = []

    def _text_message(self, ev: P.TextMessage) -> None:
        item_id = P.new_id("item")
        prev, self._last_item_id = self._last_item_id, item_id
        for event in self.events.user_item(item_id, prev, {"type": "input_text", "text": ev.text}):
            self._emit(event)
        self._enqueue(("turn", (Utterance(key=item_id, text=ev.text), False, False)), ev.event_id)

    def _request_response(self, ev: P.ResponseCreate) -> None:
        if self._response_requested or self._stream is not None:
            msg = "a response is already in progress: wait for its response.done or send response.cancel"
            self._error(P.ProtocolError("conversation_already_has_active_response", msg, None, ev.event_id))
            return
        self._response_requested = True
        self._committed_at = time.monotonic()
        self._enqueue(("respond", ev.max_output_tokens), ev.event_id)

    def _cancel(self, ev: P.ResponseCancel) -> None:
        stream = self._stream
        if stream is None or (ev.response_id is not None and ev.response_id != stream.response_id):
            msg = "no response in progress to cancel" if stream is None else f"response {ev.response_id} is not active"
            self._error(P.ProtocolError("response_cancel_not_active", msg, "response_id", ev.event_id))
            return
        stream.cancel("client_cancelled")

    def _reset_conversation(self) -> None:
        while not self._jobs.empty():
            self._jobs.get_nowait()
        self._response_requested = False
        self._cancel_on_start = False
        self._clear()
        self._last_item_id = None
        self.engine.reset_session(self.id)  # also cancels the outstanding response (it still gets response.done)

    def _enqueue(self, job: tuple[str, Any], event_id: str | None) -> None:
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            if job[0] == "respond" or job[1][1]:
                self._response_requested = False
            if job[0] == "turn" and job[1][2]:  # a dropped speculated turn: its speculation must not linger
                self.engine.discard_user_turn(self.id, job[1][0].key)
            msg = f"{JOB_QUEUE_SIZE} turns/responses already queued for this session; wait for them to finish"
            self._error(P.ProtocolError("server_busy", msg, None, event_id))

    # ---- the worker: model-facing work, one job at a time ----------------------------------------------------
    async def _run_jobs(self) -> None:
        while True:
            kind, arg = await self._jobs.get()
            self._busy = True
            try:
                if kind == "turn":
                    await self._do_turn(*arg)
                else:
                    await self._do_respond(arg)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not silence the session: report it and keep serving
                log.exception("session %s: job %s failed", self.id, kind)
                self._error(P.ProtocolError("response_failed", "internal error while handling the request"))
            finally:
                self._busy = False

    async def _do_turn(self, utt: Utterance, respond: bool, speculated: bool = False) -> None:
        try:
            if speculated:
                info = await self.engine.confirm_user_turn(self.id, utt)
            else:
                info = await self.engine.add_user_turn(self.id, utt)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("session %s: turn %s failed: %s", self.id, utt.key, e)
            self._error(P.ProtocolError("turn_failed", f"could not process the user turn {utt.key}: {e}"))
            if respond:
                self._failed_response("turn_failed", str(e))
            return
        if info.transcript is not None and utt.audio is not None:
            usage = {"type": "duration", "seconds": round(info.audio_s, 3)}
            self._emit(
                self.events.event(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=utt.key,
                    content_index=0,
                    transcript=info.transcript,
                    usage=usage,
                )
            )
        if respond:
            await self._do_respond(None)

    def _failed_response(self, code: str, message: str) -> None:
        """A response that could not start still gets response.created + response.done(failed)."""
        self._response_requested = False
        rid = P.new_id("resp")
        details = {"type": "failed", "error": {"type": P.ERROR_CODES[code][0], "code": code, "message": message}}
        self._emit(self.events.event("response.created", response=self.events.response(rid, "in_progress", [])))
        self._emit(self.events.event("response.done", response=self.events.response(rid, "failed", [], details)))

    async def _do_respond(self, max_output_tokens: int | None) -> None:
        limit = max_output_tokens or self.settings.max_output_tokens
        opts = ResponseOptions(max_new_tokens=limit, temperature=self.settings.temperature)
        try:
            stream = self.engine.respond(self.id, opts)
        except (ServerBusy, ConversationBusy) as e:
            self._error(P.ProtocolError(e.code, str(e)))
            if isinstance(e, ServerBusy):
                self._failed_response("server_busy", str(e))
            self._response_requested = False
            return
        self._stream = stream
        if self._cancel_on_start:
            self._cancel_on_start = False
            stream.cancel("turn_detected")
        try:
            await self._relay(stream)
        finally:
            self._stream = None
            self._response_requested = False
            self._committed_at = None

    async def _relay(self, stream: Any) -> None:
        ev, rid, item_id = self.events, stream.response_id, P.new_id("item")
        for event in ev.response_start(rid, item_id):
            self._emit(event)
        done: ResponseDone | None = None
        async for out in stream:
            if isinstance(out, TextDelta):
                if out.text:
                    if self._committed_at is not None:
                        FIRST_TEXT_SECONDS.observe(time.monotonic() - self._committed_at)
                        self._committed_at = None
                    self._emit(ev.text_delta(rid, item_id, out.text))
            else:
                done = out
        assert done is not None, "the engine ends every stream with a ResponseDone"
        timings = " ".join(f"{k}={v:.0f}" for k, v in done.timings_ms.items())
        log.info(
            "session %s: response %s %s%s: %d input (%d cached) + %d output tokens; ms: %s",
            self.id,
            rid,
            done.status,
            f" ({done.reason})" if done.reason else "",
            done.input_tokens,
            done.cached_tokens,
            done.output_tokens,
            timings,
        )
        for event in ev.response_end(rid, item_id, done):
            self._emit(event)

    # ---- output ----------------------------------------------------------------------------------------------
    def _error(self, err: P.ProtocolError) -> None:
        CLIENT_ERRORS.labels(code=err.code).inc()
        self._emit(self.events.error(err))

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self._send_fn(event)
        except Exception:  # the transport is gone; its own loop notices and closes the session
            log.debug("session %s: send failed for %s", self.id, event.get("type"), exc_info=True)
