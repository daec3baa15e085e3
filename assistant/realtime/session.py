"""The sans-I/O realtime session: client events, audio, engine outputs and the time in; server events and engine
commands out. No asyncio, no sockets, no clock, no torch: every transport (WebSocket, MQTT, Wyoming) drives the same
core through `assistant.transport.connection`, and tests drive it directly. (About 480 lines on purpose: it is one
state machine whose invariants, one response.done per response and no committed turn lost, span turns, the job
queue and responses together; the audio pipeline, parsing, events and settings are modules of their own.)

    s = Session("sess_1", SessionSettings(input_rate_hz=16000), "ga", default_td=cfg.vad, limits=SessionLimits())
    out = s.start(now_s)                    # [session.created event, OpenConversation]
    out = s.receive_text(frame, now_s)      # one JSON client event (str/bytes); or receive_event(dict, now_s)
    out = s.receive_audio(pcm, now_s)       # PCM16 LE mono at the session's input rate
    out = s.engine_output(TurnPrepared(...) | ResponseDelta(...) | ResponseFinished(...) | ..., now_s)
    out = s.close()                         # [CancelResponse?, CloseConversation]

Each call returns a list of outputs in order: a `dict` is a server event for the client, an `EngineCommand`
(`commands.py`) is work for the engine whose results must come back through `engine_output`, and `FirstText` is
a latency fact for the metrics.

What the core owns:
- Turn segmentation: server VAD (`VadSegmenter`, stream time in ms of 16 kHz audio, so results do not depend on how
  fast audio arrives) or push-to-talk (`turn_detection: null`: `commit` ends the turn, `response.create` answers;
  the buffer keeps the newest `max_buffer_ms`). With a wake word (`wake.py`), server VAD only hears audio from the
  wake word on, or within `follow_up_ms` after an answer; the wake word barges in like speech does.
- Semantic VAD (`turn_detection.type: "semantic_vad"`): the turn's speculation asks for its words (`Speculate(heard)`)
  and the engine's `TurnHeard` sets the silence that ends the turn (`assistant.audio.semantic_vad`).
- Model-facing work runs one job at a time, in order, from a bounded queue (`max_jobs`; overflow -> `server_busy`):
  a committed turn is prepared (`AddTurn`), its transcript reported, then answered if turn detection says so; a
  `response.create` queues an answer. Handlers never wait, so barge-in and `response.cancel` act at once.
- The response life cycle: the core makes the response id, sends `response.created` when it asks the engine to
  start (`StartResponse`) and exactly one `response.done` when the engine's `ResponseFinished` or `ResponseRefused`
  for that id comes back. A turn whose audio work failed still gets `response.created` + `response.done(failed)`.
- Barge-in: speech over an answer (with `interrupt_response`) cancels it (`turn_detected`); speech before the
  requested answer started makes it start cancelled, so the turn still ends in one `response.done`.
- Speculation (`early_prepare_ms` > 0): when the VAD reports a tentative end, the turn's audio work starts at once
  (`Speculate`); at the commit, identical samples confirm it (`AddTurn(confirm=True)`), anything else discards it.
- Item ids, error codes (`protocol.ERROR_CODES`) and limits (`SessionLimits`).
- Spoken answers: an audio response gets a `SpeechOut` (`speech_out.py`: clauses, `Speak` commands, transcript and
  audio deltas in order) and ends only once its audio is sent; a cancel stops its audio at once. What the listener
  heard (the spoken transcript, cut by `conversation.item.truncate`) goes back to the engine's history
  (`TruncateReply`). `items.py` keeps the items a client may retrieve or truncate.
- Conversation items: `conversation.item.create` (validated by `conversation.py`) queues a turn like a commit;
  `conversation.item.delete` takes an item out of the store and the engine's history (`DeleteItem`).
- Tools (`tools.py`): with `session.tools` an answer's message item opens with its first text, because the engine
  may say (`ToolCallStarted`) that the answer is a function call; its item, argument deltas and end replace it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.semantic_vad import end_silence_ms
from assistant.audio.vad import SpeechStarted, SpeechStopped, TentativeEnd, TentativeVoid
from assistant.audio.wake_word import WakeWordSettings
from assistant.backends.base import Utterance
from assistant.backends.tools import ToolCall
from assistant.engine.api import ResponseDone, ResponseOptions, ToolCallStarted, new_id
from assistant.realtime import commands as C
from assistant.realtime import conversation as conv
from assistant.realtime import protocol as P
from assistant.realtime import tools as T
from assistant.realtime.audio_in import AudioIn, committed_ms
from assistant.realtime.events import EventFactory
from assistant.realtime.items import Item, Items
from assistant.realtime.settings import SessionSettings, TurnDetection, apply_session_update
from assistant.realtime.speech_out import SpeechOut
from assistant.realtime.wake import GateEvent, WakeWordDetected

log = logging.getLogger("assistant.session")

Output = dict[str, Any] | C.EngineCommand | C.FirstText | C.FirstAudio


@dataclass(frozen=True)
class SessionLimits:
    max_message_bytes: int = 16 * 1024 * 1024  # larger client messages are refused (`message_too_large`)
    max_jobs: int = 16  # committed turns + response requests waiting per session; overflow -> `server_busy`
    max_buffer_ms: int = 30000  # push-to-talk keeps the newest 30 s: one model audio window
    max_items: int = 64  # conversation items kept for retrieve/truncate (older ones: `item_not_found`)


@dataclass
class _Job:
    """Model-facing work of the session, run one at a time in order."""

    utterance: Utterance | None  # a user turn to prepare (None: only answer)
    respond: bool  # answer after the turn (or: this job is only an answer)
    speculated: bool = False  # the turn's audio work was started during the silence
    max_output_tokens: int | None = None
    event_id: str | None = None
    output_audio: bool | None = None  # response.create's modality (None: the session's)


@dataclass
class _Response:
    response_id: str
    item_id: str
    cancelling: bool = False
    cancel_reason: str | None = None
    speech: SpeechOut | None = None  # a spoken answer
    engine_done: ResponseDone | None = None  # the engine finished; a spoken answer may still be sending audio
    unopened: list[dict[str, Any]] | None = None  # with tools: the message item's opening, sent with its first text
    call: ToolCall | None = None  # the answer is this function call (arguments streamed so far)


class Session:
    def __init__(
        self,
        session_id: str,
        settings: SessionSettings,
        dialect: P.Dialect = "ga",
        *,
        default_td: TurnDetection | None = None,
        default_wake: WakeWordSettings | None = None,
        limits: SessionLimits | None = None,
    ) -> None:
        self.id = session_id
        self.events = EventFactory(dialect)
        self.settings = settings
        self.default_td = default_td or TurnDetection()
        self.default_wake = default_wake or WakeWordSettings()
        self.limits = limits or SessionLimits()
        self.started = False
        self.closed = False
        self.accepting = True  # False during shutdown: new input is ignored
        self.last_input_s: float | None = None
        self._now_s = 0.0  # the time passed with the input being handled
        self._out: list[Output] = []
        self._jobs: deque[_Job] = deque()
        self._current: _Job | None = None  # the job waiting for the engine
        self._response: _Response | None = None  # announced (response.created), not yet done
        self._response_requested = False  # an answer is queued or running
        self._cancel_on_start = False  # barge-in arrived before the requested answer started
        self._committed_at_s: float | None = None  # when the turn now being answered ended (latency)
        td = settings.turn_detection
        self._audio = AudioIn(
            settings.input_rate_hz, td, self.limits.max_buffer_ms, settings.wake_word, not settings.hears_trimmed
        )
        self._audio.set_noise_reduction(settings.noise_reduction)
        self._spec: tuple[str, np.ndarray] | None = None  # (item id, int16 audio) handed to Speculate
        self._item_id = new_id("item")  # the user item the audio being received will become
        self._last_item_id: str | None = None
        self._items = Items(self.limits.max_items)
        self._calls = conv.Calls(self.limits.max_items)

    # ---- queries (for the driver and the hub) ------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing queued, waiting for the engine or being answered."""
        return not self._jobs and self._current is None and self._response is None

    @property
    def response_id(self) -> str | None:
        return self._response.response_id if self._response else None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, now_s: float) -> list[Output]:
        self.started = True
        self.last_input_s = now_s
        self._out.append(C.OpenConversation(self.settings.instructions or None))
        self._emit("session.created", session=self.events.session(self.settings, self.id))
        if self.events.dialect == "beta":
            self._out.append(self.events.conversation_created(new_id("conv")))
        return self._take()

    def stop_accepting(self) -> None:
        """Graceful shutdown: ignore new input, let the work in flight finish."""
        self.accepting = False

    def close(self) -> list[Output]:
        """Cancel the answer in flight (its response.done still comes through `engine_output`) and end the
        engine conversation. Later client input is ignored."""
        if self.closed:
            return []
        self.closed = True
        self.accepting = False
        self._jobs.clear()
        if self._current is not None and self._current.utterance is not None:
            self._current = None  # a turn being prepared: nothing to answer any more
        self._cancel_response("client_cancelled")
        self._spec = None  # closing the engine conversation forgets its speculations
        if self.started:
            self._out.append(C.CloseConversation())
        return self._take()

    # ---- client input ------------------------------------------------------------------------------------------
    def receive_text(self, data: str | bytes, now_s: float) -> list[Output]:
        return self.receive_event(data, now_s)

    def receive_event(self, raw: str | bytes | dict[str, Any], now_s: float) -> list[Output]:
        try:
            event = P.parse_client_event(raw)
        except P.ProtocolError as e:
            self._error(e)
            return self._take()
        if self._ready(event.event_id, now_s):
            self._dispatch(event)
        return self._take()

    def receive_audio(self, pcm: bytes, now_s: float, event_id: str | None = None) -> list[Output]:
        """Raw PCM16 LE mono at the session's input rate (binary frame or decoded `input_audio_buffer.append`)."""
        if self._ready(event_id, now_s):
            self._receive_pcm(pcm, event_id)
        return self._take()

    def reject_oversized(self, n_bytes: int) -> list[Output]:
        limit = self.limits.max_message_bytes
        msg = f"message of {n_bytes} bytes exceeds server.max_message_bytes={limit}; send smaller chunks"
        self._error(P.ProtocolError("message_too_large", msg))
        return self._take()

    def _ready(self, event_id: str | None, now_s: float) -> bool:
        if self.closed or not self.accepting:
            return False
        if not self.started:
            msg = "the session is not set up yet: wait for session.created before sending events"
            self._error(P.ProtocolError("session_not_ready", msg, None, event_id))
            return False
        self.last_input_s = now_s
        self._now_s = now_s
        return True

    def _dispatch(self, ev: P.ClientEvent) -> None:
        if isinstance(ev, P.AudioAppend):
            self._receive_pcm(ev.pcm, ev.event_id)
        elif isinstance(ev, P.SessionUpdate):
            self._session_update(ev)
        elif isinstance(ev, P.AudioCommit):
            self._commit(ev.event_id)
        elif isinstance(ev, P.AudioClear):
            self._clear()
            self._emit("input_audio_buffer.cleared")
        elif isinstance(ev, P.ResponseCreate):
            self._request_response(ev)
        elif isinstance(ev, P.ResponseCancel):
            self._cancel(ev)
        elif isinstance(ev, P.ConversationReset):
            self._reset_conversation()
        elif isinstance(ev, P.ItemCreate):
            self._create_item(ev)
        elif isinstance(ev, P.ItemDelete):
            self._delete_item(ev)
        elif isinstance(ev, P.ItemTruncate):
            self._truncate(ev)
        elif isinstance(ev, P.ItemRetrieve):
            self._retrieve(ev)

    def _receive_pcm(self, pcm: bytes, event_id: str | None) -> None:
        if len(pcm) % 2:
            msg = f"PCM16 audio needs an even number of bytes, got {len(pcm)}; the chunk was dropped"
            self._error(P.ProtocolError("invalid_audio", msg, "audio", event_id))
            return
        self._on_vad_events(self._audio.feed(pcm))

    def _session_update(self, ev: P.SessionUpdate) -> None:
        old = self.settings
        try:
            new, warnings = apply_session_update(old, ev.session, ev.event_id, self.default_td, self.default_wake)
        except P.ProtocolError as e:
            self._error(e)
            return
        for w in warnings:
            self._error(w)
        if new.input_rate_hz != old.input_rate_hz:
            self._on_vad_events(self._audio.set_rate(new.input_rate_hz))
        self.settings = new
        if new.turn_detection != old.turn_detection or new.wake_word != old.wake_word:
            self._discard_speculation()  # an open turn under the old settings is dropped
            self._audio.reconfigure(new.turn_detection, new.wake_word)
        self._audio.set_noise_reduction(new.noise_reduction)
        if new.instructions != old.instructions:
            self._out.append(C.SetInstructions(new.instructions or None))
        self._emit("session.updated", session=self.events.session(new, self.id))

    # ---- turns -------------------------------------------------------------------------------------------------
    def _on_vad_events(self, events: list[GateEvent]) -> None:
        for vev in events:
            self._on_vad_event(vev)

    def _on_vad_event(self, vev: GateEvent) -> None:
        td = self.settings.turn_detection
        if isinstance(vev, WakeWordDetected):
            item_id = self._item_id if td is not None else None  # push-to-talk: a detection opens no turn
            self._out.append(self.events.wake_word_detected(vev.name, vev.audio_start_ms, item_id))
            if td is not None and td.interrupt_response:
                self._barge_in()
        elif isinstance(vev, TentativeEnd):
            self._speculate(vev.audio)
        elif isinstance(vev, TentativeVoid):
            self._discard_speculation()  # speech resumed: that audio will not be the turn
        elif isinstance(vev, SpeechStarted):
            self._emit("input_audio_buffer.speech_started", audio_start_ms=vev.audio_start_ms, item_id=self._item_id)
            if td is not None and td.interrupt_response:
                self._barge_in()
        elif isinstance(vev, SpeechStopped):
            self._emit("input_audio_buffer.speech_stopped", audio_end_ms=vev.audio_end_ms, item_id=self._item_id)
        else:
            self._commit_audio(vev.audio, respond=td is not None and td.create_response)

    def _barge_in(self) -> None:
        if self._response is not None:
            self._cancel_response("turn_detected")  # a spoken answer stops sending audio at once
        elif self._response_requested:
            # The answer still waits for its turn's audio work: it starts cancelled, so the committed turn still
            # ends in exactly one response.done.
            self._cancel_on_start = True

    def _commit(self, event_id: str | None) -> None:
        if self._audio.push_to_talk:
            audio, dropped_ms = self._audio.take_buffer()
            audio_ms = len(audio) * 1000 // MODEL_RATE_HZ
            if audio_ms >= P.MIN_COMMIT_MS:
                if dropped_ms:
                    msg = (
                        f"the turn was {audio_ms + dropped_ms} ms long; kept its newest {audio_ms} ms and dropped the "
                        f"first {dropped_ms} ms (server.max_turn_audio_ms={self.limits.max_buffer_ms}); commit sooner"
                    )
                    self._error(P.ProtocolError("input_audio_buffer_truncated", msg, None, event_id))
                self._commit_audio(audio, respond=False)
                return
            self._audio.restore_buffer(audio, dropped_ms)
        else:
            events = self._audio.commit_vad()
            audio_ms = committed_ms(events)
            if audio_ms >= P.MIN_COMMIT_MS:
                self._on_vad_events(events)
                return
        msg = f"buffer too small: expected at least {P.MIN_COMMIT_MS} ms of audio, have {audio_ms} ms"
        self._error(P.ProtocolError("input_audio_buffer_commit_empty", msg, None, event_id))

    def _new_user_item(self, part: dict[str, Any]) -> str:
        item_id, self._item_id = self._item_id, new_id("item")
        prev, self._last_item_id = self._last_item_id, item_id
        if part["type"] == "input_audio":
            self._emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=prev)
        self._out.extend(self.events.user_item(item_id, prev, part))
        self._items.add(Item(item_id, "user", "completed", part=dict(part)))
        return item_id

    def _commit_audio(self, audio: np.ndarray, respond: bool) -> None:
        item_id = self._new_user_item({"type": "input_audio", "transcript": None})
        spec, self._spec = self._spec, None
        # The speculation may lack the end of the trailing padding (`hears_trimmed`): the engine reuses its work only
        # when the backend hears both clips alike, else redoes it; with whole padding they must be the same.
        speculated = spec is not None and spec[0] == item_id
        if speculated and not self.settings.hears_trimmed:
            speculated = np.array_equal(spec[1], audio)
        if spec is not None and not speculated:
            self._out.append(C.Discard(spec[0]))
        utt = conv.spoken(item_id, audio.astype(np.float32) / 32768.0, None, self.settings.transcription)
        audio_ms = len(audio) * 1000 // MODEL_RATE_HZ
        extra = ", prepared during the silence" if speculated else ""
        log.info("session %s: utterance %s committed (%d ms of audio%s)", self.id, item_id, audio_ms, extra)
        self._enqueue(_Job(utt, respond, speculated))

    def _speculate(self, audio: np.ndarray) -> None:
        """Start the open turn's audio work now (the silence may still be broken by speech)."""
        self._discard_speculation()
        td = self.settings.turn_detection
        semantic = td is not None and td.type == "semantic_vad"  # its words decide when the turn ends: `_heard`
        utt = conv.spoken(self._item_id, audio.astype(np.float32) / 32768.0, None, self.settings.transcription)
        self._out.append(C.Speculate(utt, heard=semantic))
        self._spec = (self._item_id, audio.copy())

    def _discard_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            self._out.append(C.Discard(spec[0]))

    def _clear(self) -> None:
        self._discard_speculation()
        self._audio.clear()

    def _reset_conversation(self) -> None:
        for job in self._jobs:
            if job.speculated and job.utterance is not None:
                self._out.append(C.Discard(job.utterance.key))
        self._jobs.clear()
        if self._current is not None and self._current.utterance is not None:
            self._current.respond = False  # its turn is forgotten by the reset: nothing left to answer
        if self._response is None:
            self._response_requested = False
        self._cancel_on_start = False
        self._clear()
        self._last_item_id = None
        self._items.clear()
        self._calls.clear()
        if self._response is not None and self._response.speech is not None:
            self._cancel_response("conversation_reset")  # its audio stops now, not when the reset reaches the engine
        self._out.append(C.ResetConversation())  # also cancels the answer in flight (it still gets response.done)

    # ---- responses ---------------------------------------------------------------------------------------------
    def _request_response(self, ev: P.ResponseCreate) -> None:
        if self._response_requested or self._response is not None:
            msg = "a response is already in progress: wait for its response.done or send response.cancel"
            self._error(P.ProtocolError("conversation_already_has_active_response", msg, None, ev.event_id))
            return
        audio = ev.output_audio
        if audio and not self.settings.audio_out.voices:
            msg = "response.output_modalities asks for audio; this server has no voice installed, the answer is text"
            self._error(P.ProtocolError("audio_output_unsupported", msg, "response.output_modalities", ev.event_id))
            audio = False
        job = _Job(None, respond=True, max_output_tokens=ev.max_output_tokens, event_id=ev.event_id)
        job.output_audio = audio
        self._enqueue(job)

    def _cancel(self, ev: P.ResponseCancel) -> None:
        r = self._response
        if r is None or (ev.response_id is not None and ev.response_id != r.response_id):
            msg = "no response in progress to cancel" if r is None else f"response {ev.response_id} is not active"
            self._error(P.ProtocolError("response_cancel_not_active", msg, "response_id", ev.event_id))
            return
        self._cancel_response("client_cancelled")

    def _enqueue(self, job: _Job) -> None:
        if len(self._jobs) >= self.limits.max_jobs:
            if job.speculated and job.utterance is not None:  # its speculation must not linger
                self._out.append(C.Discard(job.utterance.key))
            n = self.limits.max_jobs
            msg = f"{n} turns/responses already queued for this session; wait for them to finish"
            self._error(P.ProtocolError("server_busy", msg, None, job.event_id))
            return
        if job.respond:
            self._response_requested = True
            self._committed_at_s = self._now_s
        self._jobs.append(job)
        self._pump()

    def _pump(self) -> None:
        """Start the next job when none is waiting for the engine."""
        while self._current is None and self._jobs and not self.closed:
            job = self._jobs.popleft()
            self._current = job
            if job.utterance is not None:
                self._out.append(C.AddTurn(job.utterance, confirm=job.speculated))
            else:
                self._start_response(job)

    def _start_response(self, job: _Job) -> None:
        st, limit = self.settings, job.max_output_tokens or self.settings.max_output_tokens
        tools = st.tools if st.tool_choice.mode != "none" else ()
        opts = ResponseOptions(
            max_new_tokens=limit, temperature=st.temperature, tools=tools, tool_choice=st.tool_choice
        )
        r = self._response = _Response(new_id("resp"), new_id("item"))
        audio = self.settings.output_audio if job.output_audio is None else job.output_audio
        if audio:
            ao = self.settings.audio_out
            r.speech = SpeechOut(self.events, r.response_id, r.item_id, ao, self._now_s, self._committed_at_s)
        start = self.events.response_start(r.response_id, r.item_id, r.speech.out if r.speech else None)
        if tools:  # the answer may be a function call: its item is opened once the engine says which
            start, r.unopened = start[:1], start[1:]
        self._out.extend(start)
        self._items.add(Item(r.item_id, "assistant", "in_progress", audio=audio, response_id=r.response_id))
        self._out.append(C.StartResponse(r.response_id, opts))
        if self._cancel_on_start:
            self._cancel_on_start = False
            self._cancel_response("turn_detected")

    def _cancel_response(self, reason: str) -> None:
        """Stop the answer in flight: the engine's decoding (unless it already finished) and its audio. A spoken
        answer whose text was complete ends here and now; otherwise the engine's ResponseFinished ends it."""
        r = self._response
        if r is None or r.cancelling:
            return
        r.cancelling, r.cancel_reason = True, reason
        if r.engine_done is None:
            self._out.append(C.CancelResponse(r.response_id, reason))
        if r.speech is not None:
            self._out.extend(r.speech.cancel())
            if r.engine_done is not None:
                self._response_done()

    def _failed_response(self, code: str, message: str) -> None:
        """An answer that could not start still gets response.created + response.done(failed)."""
        rid = new_id("resp")
        details = {"type": "failed", "error": {"type": P.ERROR_CODES[code][0], "code": code, "message": message}}
        self._emit("response.created", response=self.events.response(rid, "in_progress", []))
        self._emit("response.done", response=self.events.response(rid, "failed", [], details))
        self._out.append(self.events.rate_limits(self.limits.max_jobs, len(self._jobs)))

    # ---- engine output -----------------------------------------------------------------------------------------
    def engine_output(self, out: C.EngineOutput, now_s: float) -> list[Output]:
        self._now_s = now_s
        if isinstance(out, C.TurnPrepared | C.TurnFailed):
            self._turn_done(out)
        elif isinstance(out, C.TurnHeard):
            self._heard(out)
        elif isinstance(out, ToolCallStarted):
            self._call_started(out)
        elif isinstance(out, C.ResponseDelta):
            r = self._response
            if r is not None and out.response_id == r.response_id and out.text:
                self._open_message()
                if r.call is not None:
                    r.call = ToolCall(r.call.call_id, r.call.name, r.call.arguments + out.text)
                    self._out.append(T.call_delta(self.events, r.response_id, r.item_id, r.call.call_id, out.text))
                elif r.speech is not None:
                    self._out.extend(r.speech.on_text(out.text, now_s))
                else:
                    if self._committed_at_s is not None:
                        self._out.append(C.FirstText(max(0.0, now_s - self._committed_at_s)))
                        self._committed_at_s = None
                    self._out.append(self.events.text_delta(r.response_id, r.item_id, out.text))
        elif isinstance(out, C.ResponseRefused):
            self._error(P.ProtocolError(out.code, out.message))
            self._engine_finished(ResponseDone.refused(out.response_id, out.message, out.code))
        elif isinstance(out, C.ResponseFinished):
            done, r = out.done, self._response
            if done.status == "failed" and r is not None and done.response_id == r.response_id:
                # the client hears why, as for a failed turn (e.g. `upstream_unavailable`); the session goes on
                self._error(P.ProtocolError(done.error_code or "response_failed", done.error or "the model failed"))
            self._engine_finished(done)
        elif isinstance(out, C.ClauseSpoken | C.SpeechFailed):
            r = self._response
            if r is not None and r.speech is not None and out.response_id == r.response_id:
                self._out.extend(r.speech.on_result(out, now_s))
                if r.engine_done is not None and r.speech.complete:
                    self._response_done()
        return self._take()

    def _heard(self, out: C.TurnHeard) -> None:
        """Semantic VAD: the words of the open turn's tentative audio set how much silence ends it."""
        td = self.settings.turn_detection
        if td is None or td.type != "semantic_vad" or self._spec is None or self._spec[0] != out.key:
            return  # speech resumed (a new silence will be judged) or the settings changed meanwhile
        self._on_vad_events(self._audio.end_turn_after(end_silence_ms(out.transcript, td.eagerness)))

    def _turn_done(self, out: C.TurnPrepared | C.TurnFailed) -> None:
        job = self._current
        if job is None or job.utterance is None or job.utterance.key != out.key:
            return  # a turn the session let go of (close)
        if isinstance(out, C.TurnFailed):
            log.warning("session %s: turn %s failed: %s", self.id, out.key, out.message)
            self._error(P.ProtocolError(out.code, f"could not process the user turn {out.key}: {out.message}"))
            if job.respond:
                self._failed_response(out.code, out.message)
                self._response_requested = False
                self._cancel_on_start = False
                self._committed_at_s = None
            self._current = None
        else:
            info = out.info
            if info.transcript is not None and job.utterance.audio is not None:
                item = self._items.get(out.key)
                if item is not None and item.part is not None:
                    item.part["transcript"] = info.transcript
                usage = {"type": "duration", "seconds": round(info.audio_s, 3)}
                self._emit(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=out.key,
                    content_index=0,
                    transcript=info.transcript,
                    usage=usage,
                )
            if job.respond and not self.closed:
                job.utterance = None  # the same job goes on as the answer
                self._start_response(job)
                return
            if job.respond:
                self._response_requested = False
            self._current = None
        self._pump()

    def _engine_finished(self, done: ResponseDone) -> None:
        r = self._response
        if r is None or done.response_id != r.response_id:
            return
        r.engine_done = done
        if r.speech is not None and not r.cancelling and done.status != "failed":
            self._out.extend(r.speech.on_text_done(self._now_s))
            if not r.speech.complete:
                return  # the audio of the last clauses is still being made
        self._response_done()

    def _response_done(self) -> None:
        r = self._response
        assert r is not None and r.engine_done is not None
        done, after, speech = r.engine_done, [], r.speech
        if speech is not None:
            done, after = speech.finish(done, r.cancel_reason if r.cancelling else None)
        timings = " ".join(f"{k}={v:.0f}" for k, v in done.timings_ms.items())
        log.info(
            "session %s: response %s %s%s: %d input (%d cached) + %d output tokens; ms: %s",
            self.id,
            r.response_id,
            done.status,
            f" ({done.reason})" if done.reason else "",
            done.input_tokens,
            done.cached_tokens,
            done.output_tokens,
            timings,
        )
        self._open_message()
        if r.call is not None:
            self._out.extend(self._call_end(r, done))
        elif speech is None:
            self._out.extend(self.events.response_end(r.response_id, r.item_id, done))
        else:
            transcript, extra = speech.transcript(), speech.timings_ms()
            self._out.extend(self.events.response_end(r.response_id, r.item_id, done, speech.out, transcript, extra))
        self._out.extend(after)
        self._out.append(self.events.rate_limits(self.limits.max_jobs, len(self._jobs)))
        self._audio.answer_finished()  # behind a wake word: the follow-up window opens
        if r.call is None:
            self._items.finish(r.item_id, done, speech)
        self._response = None
        self._current = None
        self._response_requested = False
        self._committed_at_s = None
        self._pump()

    # ---- conversation items ----------------------------------------------------------------------------------------
    def _truncate(self, ev: P.ItemTruncate) -> None:
        """`conversation.item.truncate`: the listener heard `audio_end_ms` of a spoken answer; the item, its
        transcript and the engine's history keep only that. An answer still being spoken is stopped there."""
        try:
            item = self._items.truncatable(ev)
        except P.ProtocolError as e:
            self._error(e)
            return
        r = self._response
        if r is not None and r.item_id == item.id and r.speech is not None:
            r.speech.heard_ms = ev.audio_end_ms  # applied when it ends, which the cancel makes now or soon
            self._cancel_response("client_cancelled")
        elif item.truncate(ev.audio_end_ms) and item.response_id is not None:
            self._out.append(C.TruncateReply(item.response_id, item.text))
        self._emit("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=ev.audio_end_ms)

    def _create_item(self, ev: P.ItemCreate) -> None:
        """`conversation.item.create`: a user message or a function result enters the conversation as a turn (the
        engine prepares it in order with the others; `response.create` answers it)."""
        try:
            new = conv.created(ev, self._items, self._calls, self.settings.input_rate_hz, self.settings.transcription)
        except P.ProtocolError as e:
            self._error(e)
            return
        prev, self._last_item_id = self._items.newest(), new.item_id  # the item it follows, as placed
        self._out.extend(self.events.item_added(new.item, prev))
        shape = None if new.part is not None else new.item
        part = dict(new.part) if new.part is not None else None
        self._items.add(Item(new.item_id, "user", "completed", part=part, shape=shape))
        self._enqueue(_Job(new.utterance, respond=False, event_id=ev.event_id))

    def _delete_item(self, ev: P.ItemDelete) -> None:
        """`conversation.item.delete`: the item leaves the store and, through the engine, every later prompt."""
        try:
            item = self._items.known(ev.item_id, ev.event_id)
            if self._response is not None and self._response.item_id == item.id:
                msg = f"item {item.id} is the answer being generated: send response.cancel, then delete it"
                raise P.ProtocolError("item_in_progress", msg, "item_id", ev.event_id)
        except P.ProtocolError as e:
            self._error(e)
            return
        self._items.remove(item.id)
        if item.response_id is not None:
            self._out.append(C.DeleteItem(response_id=item.response_id))
        else:  # a turn not sent to the engine yet is simply dropped (an answer-bearing one still enters, then goes)
            self._jobs = deque(j for j in self._jobs if j.respond or j.utterance is None or j.utterance.key != item.id)
            self._out.append(C.DeleteItem(key=item.id))
        self._emit("conversation.item.deleted", item_id=item.id)

    def _open_message(self) -> None:
        r = self._response
        if r is not None and r.unopened:
            self._out.extend(r.unopened)
        if r is not None:
            r.unopened = None

    def _call_started(self, out: ToolCallStarted) -> None:
        """The answer is a function call: its item replaces the message (and any speech) the answer would have."""
        r = self._response
        if r is None or r.unopened is None:
            return
        r.unopened, r.speech, r.call = None, None, ToolCall(out.call_id, out.name, "")
        self._calls.add(out.call_id, out.name)
        item = self._items.get(r.item_id)
        if item is not None:
            item.audio = False
        self._out.append(T.call_start(self.events, r.response_id, r.item_id, r.call))

    def _call_end(self, r: _Response, done: ResponseDone) -> list[Output]:
        assert r.call is not None
        call = done.tool_calls[0] if done.tool_calls else r.call
        status = "completed" if done.tool_calls else "incomplete"
        body = self.events.response_end(r.response_id, r.item_id, done)[-1]["response"]
        ends = T.call_end(self.events, r.response_id, r.item_id, call, body, status)
        item = self._items.get(r.item_id)
        if item is not None:
            item.status, item.shape = status, T.call_item(r.item_id, call, status)
        return ends

    def _retrieve(self, ev: P.ItemRetrieve) -> None:
        try:
            self._emit("conversation.item.retrieved", item=self._items.render(ev.item_id, ev.event_id, self.events))
        except P.ProtocolError as e:
            self._error(e)

    # ---- output ------------------------------------------------------------------------------------------------
    def _emit(self, etype: str, **fields: Any) -> None:
        self._out.append(self.events.event(etype, **fields))

    def _error(self, err: P.ProtocolError) -> None:
        self._out.append(self.events.error(err))

    def _take(self) -> list[Output]:
        out, self._out = self._out, []
        return out
