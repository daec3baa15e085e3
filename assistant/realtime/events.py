"""Server side of the wire protocol: every server event, built as a plain dict, in the connection's dialect.

Pure code, no I/O. `EventFactory(dialect)` gives each event a unique `event_id`; the shapes validate strictly
against the `openai` SDK's own pydantic models (tests/test_openai_sdk.py checks this). The session core decides
WHICH events to send; this module only knows what they look like.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from assistant.engine.api import new_id
from assistant.realtime.protocol import ERROR_CODES, OPENAI_RATE_HZ, Dialect, ProtocolError
from assistant.realtime.tools import echo_tools

if TYPE_CHECKING:
    from assistant.engine.api import ResponseDone
    from assistant.realtime.settings import AudioOutput, SessionSettings

_GA_FORMAT_TYPES = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def encode_event(event: dict[str, Any]) -> str:
    """A server event as strict JSON text: JSON has no NaN or Infinity, so a non-finite number (a bug: settings
    refuse them) is sent as null and logged, never as a bare `NaN` a client's parser would choke on."""
    try:
        return json.dumps(event, allow_nan=False, ensure_ascii=False)
    except ValueError:
        log.error("event %s carried a NaN or infinite number; sent as null", event.get("type"))
        return json.dumps(_finite(event), allow_nan=False, ensure_ascii=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


log = logging.getLogger("assistant.session")

_OPENAI_REASONS = {"turn_detected", "client_cancelled", "max_output_tokens", "content_filter"}


class EventFactory:
    """Builds server events (dicts) for one connection's dialect; every event gets a fresh unique `event_id`."""

    def __init__(self, dialect: Dialect = "ga") -> None:
        if dialect not in ("ga", "beta"):
            raise ValueError(f"dialect must be 'ga' or 'beta', got {dialect!r}")
        self.dialect = dialect

    def event(self, etype: str, **fields: Any) -> dict[str, Any]:
        return {"type": etype, "event_id": new_id("event"), **fields}

    def session(self, st: SessionSettings, session_id: str) -> dict[str, Any]:
        """The effective session in this dialect's shape (our extensions ride along as extra keys)."""
        td = None
        if st.turn_detection is not None:
            td = dataclasses.asdict(st.turn_detection)
            if td["type"] == "server_vad":
                del td["eagerness"]  # semantic_vad's knob
        tr = None
        if st.transcription is not None:
            tr = {"model": st.transcription.model}
            if st.transcription.language:
                tr["language"] = st.transcription.language
            if st.transcription.prompt:
                tr["prompt"] = st.transcription.prompt
        nr = None if st.noise_reduction is None else {"type": st.noise_reduction}
        given = st.as_given
        tracing = {} if given.tracing is None else {"tracing": given.tracing}
        max_tokens: int | str = "inf" if st.max_output_tokens is None else st.max_output_tokens
        wake = None if st.wake_word is None else dataclasses.asdict(st.wake_word)  # extension: null = off
        ao = st.audio_out
        if self.dialect == "beta":
            out: dict[str, Any] = {
                "id": session_id,
                "object": "realtime.session",
                "modalities": self.modalities(st.output_audio),
                "instructions": st.instructions,
                "input_audio_format": "pcm16",
                "turn_detection": td,
                "input_audio_transcription": tr,
                "input_audio_noise_reduction": nr,
                **tracing,
                "max_response_output_tokens": max_tokens,
                "input_sample_rate": st.input_rate_hz,
                "wake_word": wake,
            }
            if ao.voices:
                out.update(voice=ao.voice_label, output_audio_format=ao.format, speed=ao.speed)
                out["output_sample_rate"] = ao.rate_hz
            if st.temperature is not None:
                out["temperature"] = st.temperature
            return {**out, **echo_tools(st.tools, st.tool_choice)}
        # The SDK's GA format only admits rate 24000: other rates are stated by our `input_sample_rate` extension.
        fmt: dict[str, Any] = {"type": "audio/pcm"}
        if st.input_rate_hz == OPENAI_RATE_HZ:
            fmt["rate"] = OPENAI_RATE_HZ
        inp = {"format": fmt, "transcription": tr, "noise_reduction": nr, "turn_detection": td, "wake_word": wake}
        audio: dict[str, Any] = {"input": inp}
        session = {
            "type": "realtime",
            "id": session_id,
            "object": "realtime.session",
            "model": st.model,
            "output_modalities": self.modalities(st.output_audio),
            "instructions": st.instructions,
            "max_output_tokens": max_tokens,
            "audio": audio,
            "input_sample_rate": st.input_rate_hz,
            **tracing,
            "truncation": given.truncation,
            **echo_tools(st.tools, st.tool_choice),
        }
        if given.parallel_tool_calls is not None:
            session["parallel_tool_calls"] = given.parallel_tool_calls
        if ao.voices:
            audio["output"] = {"format": self.output_format(ao), "voice": ao.voice_label, "speed": ao.speed}
            session["output_sample_rate"] = ao.rate_hz
        return session

    def conversation_created(self, conversation_id: str) -> dict[str, Any]:
        """Beta only: the session's one conversation exists (OpenAI sends it right after `session.created`)."""
        return self.event(
            "conversation.created", conversation={"id": conversation_id, "object": "realtime.conversation"}
        )

    def rate_limits(self, max_jobs: int, queued_jobs: int) -> dict[str, Any]:
        """`rate_limits.updated` after each `response.done`, as OpenAI sends it. Our one limit is the session's job
        queue: `requests` = turns and responses that may still be queued before `server_busy` (no time window, so
        `reset_seconds` is 0: a slot frees as soon as its work ends). There is no token budget to report."""
        limit = {"name": "requests", "limit": max_jobs, "remaining": max(0, max_jobs - queued_jobs)}
        return self.event("rate_limits.updated", rate_limits=[{**limit, "reset_seconds": 0.0}])

    def modalities(self, audio: bool) -> list[str]:
        """GA: `["audio"]` or `["text"]` (audio carries its transcript); beta: `["audio", "text"]` or `["text"]`."""
        if not audio:
            return ["text"]
        return ["audio"] if self.dialect == "ga" else ["audio", "text"]

    @staticmethod
    def output_format(ao: AudioOutput) -> dict[str, Any]:
        """GA `audio.output.format`; the SDK's model admits only rate 24000, so other PCM rates are stated by the
        `output_sample_rate` extension."""
        fmt: dict[str, Any] = {"type": _GA_FORMAT_TYPES[ao.format]}
        if ao.format == "pcm16" and ao.rate_hz == OPENAI_RATE_HZ:
            fmt["rate"] = OPENAI_RATE_HZ
        return fmt

    def wake_word_detected(self, name: str, audio_start_ms: int, item_id: str | None) -> dict[str, Any]:
        """Extension: the wake word was heard; the turn's audio starts at `audio_start_ms` (stream time). `item_id`
        is the user item that turn will become (omitted in push-to-talk, where a detection opens no turn)."""
        fields: dict[str, Any] = {"name": name, "audio_start_ms": audio_start_ms}
        if item_id is not None:
            fields["item_id"] = item_id
        return self.event("input_audio_buffer.wake_word_detected", **fields)

    def error(self, err: ProtocolError) -> dict[str, Any]:
        body = {"type": err.type, "code": err.code, "message": err.message, "param": err.param}
        body["event_id"] = err.event_id
        return self.event("error", error=body)

    def text_event(self, suffix: str, **fields: Any) -> dict[str, Any]:
        """`response.output_text.<suffix>` (GA) or `response.text.<suffix>` (beta)."""
        prefix = "response.output_text." if self.dialect == "ga" else "response.text."
        return self.event(prefix + suffix, **fields)

    def audio_event(self, suffix: str, **fields: Any) -> dict[str, Any]:
        """`response.output_audio.<suffix>` (GA) or `response.audio.<suffix>` (beta)."""
        prefix = "response.output_audio." if self.dialect == "ga" else "response.audio."
        return self.event(prefix + suffix, **fields)

    def transcript_event(self, suffix: str, **fields: Any) -> dict[str, Any]:
        """`response.output_audio_transcript.<suffix>` (GA) or `response.audio_transcript.<suffix>` (beta)."""
        prefix = "response.output_audio_transcript." if self.dialect == "ga" else "response.audio_transcript."
        return self.event(prefix + suffix, **fields)

    def part(self, text: str, audio: bool, in_item: bool) -> dict[str, Any]:
        """An answer's content part: in `response.content_part.*` events `text` / `audio`; inside an item GA says
        `output_text` / `output_audio` (beta keeps `text` / `audio`). Audio parts carry the `transcript`."""
        kind = "audio" if audio else "text"
        if in_item and self.dialect == "ga":
            kind = "output_" + kind
        return {"type": kind, "transcript": text} if audio else {"type": kind, "text": text}

    def assistant_item(self, item_id: str, text: str | None, status: str, audio: bool = False) -> dict[str, Any]:
        content = [] if text is None else [self.part(text, audio, in_item=True)]
        return {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def response(
        self,
        response_id: str,
        status: str,
        output: list[dict[str, Any]],
        status_details: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        timings_ms: dict[str, float] | None = None,
        audio: AudioOutput | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"id": response_id, "object": "realtime.response", "status": status, "output": output}
        body["status_details"] = status_details
        if self.dialect == "ga":
            body["output_modalities"] = self.modalities(audio is not None)
            if audio is not None:
                body["audio"] = {"output": {"format": self.output_format(audio), "voice": audio.voice_label}}
        else:
            body["modalities"] = self.modalities(audio is not None)
            if audio is not None:
                body.update(voice=audio.voice_label, output_audio_format=audio.format)
        if usage is not None:
            body["usage"] = usage
        if timings_ms is not None:
            body["timings_ms"] = timings_ms
        return body

    def response_start(self, rid: str, item_id: str, audio: AudioOutput | None = None) -> list[dict[str, Any]]:
        """response.created, then the assistant item and its text (or audio) part being opened."""
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        item = self.assistant_item(item_id, None, "in_progress")
        return [
            self.event("response.created", response=self.response(rid, "in_progress", [], audio=audio)),
            self.event("response.output_item.added", response_id=rid, output_index=0, item=item),
            self.event("response.content_part.added", **where, part=self.part("", audio is not None, False)),
        ]

    def text_delta(self, rid: str, item_id: str, delta: str) -> dict[str, Any]:
        return self.text_event("delta", response_id=rid, item_id=item_id, output_index=0, content_index=0, delta=delta)

    def response_end(
        self,
        rid: str,
        item_id: str,
        done: ResponseDone,
        audio: AudioOutput | None = None,
        transcript: str = "",
        timings_ms: dict[str, float] | None = None,
    ) -> list[dict[str, Any]]:
        """Text (or audio and transcript) done, part done, item done, and the one response.done (status, details,
        output, usage, timings). An audio answer's item holds `transcript`: what was spoken."""
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        spoken = audio is not None
        text = transcript if spoken else done.text
        status = "completed" if done.status == "completed" else "incomplete"
        item = self.assistant_item(item_id, text, status, spoken)
        details: dict[str, Any] | None = None
        if done.status in ("cancelled", "incomplete"):
            # OpenAI's reasons only: others (session_closed, conversation_reset) leave `reason` empty
            details = {"type": done.status, "reason": done.reason if done.reason in _OPENAI_REASONS else None}
        elif done.status == "failed":
            code = done.error_code or "response_failed"
            error = {"type": ERROR_CODES[code][0], "code": code, "message": done.error or "model failure"}
            details = {"type": "failed", "error": error}
        usage = {
            "total_tokens": done.input_tokens + done.output_tokens,
            "input_tokens": done.input_tokens,
            "output_tokens": done.output_tokens,
        }
        timings = {**done.timings_ms, **(timings_ms or {})}
        body = self.response(rid, done.status, [item], details, usage, timings, audio)
        if spoken:
            ends = [self.audio_event("done", **where), self.transcript_event("done", **where, transcript=text)]
        else:
            ends = [self.text_event("done", **where, text=text)]
        return [
            *ends,
            self.event("response.content_part.done", **where, part=self.part(text, spoken, False)),
            self.event("response.output_item.done", response_id=rid, output_index=0, item=item),
            self.event("response.done", response=body),
        ]

    def user_item(self, item_id: str, previous_item_id: str | None, part: dict[str, Any]) -> list[dict[str, Any]]:
        """A user item entering the conversation: GA `conversation.item.added` + `.done`, beta `.created`."""
        return self.item_added(self.message_item(item_id, "user", "completed", [part]), previous_item_id)

    def item_added(self, item: dict[str, Any], previous_item_id: str | None) -> list[dict[str, Any]]:
        """An item entering the conversation: GA `conversation.item.added` + `.done`, beta `.created`."""
        if self.dialect == "beta":
            return [self.event("conversation.item.created", item=item, previous_item_id=previous_item_id)]
        return [
            self.event("conversation.item.added", item=item, previous_item_id=previous_item_id),
            self.event("conversation.item.done", item=item, previous_item_id=previous_item_id),
        ]

    @staticmethod
    def message_item(item_id: str, role: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": role,
            "status": status,
            "content": content,
        }
