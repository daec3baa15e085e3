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

if TYPE_CHECKING:
    from assistant.engine.api import ResponseDone
    from assistant.realtime.settings import SessionSettings


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
        max_tokens: int | str = "inf" if st.max_output_tokens is None else st.max_output_tokens
        wake = None if st.wake_word is None else dataclasses.asdict(st.wake_word)  # extension: null = off
        if self.dialect == "beta":
            out: dict[str, Any] = {
                "id": session_id,
                "object": "realtime.session",
                "modalities": ["text"],
                "instructions": st.instructions,
                "input_audio_format": "pcm16",
                "turn_detection": td,
                "max_response_output_tokens": max_tokens,
                "input_sample_rate": st.input_rate_hz,
                "wake_word": wake,
            }
            if st.temperature is not None:
                out["temperature"] = st.temperature
            return out
        # The SDK's GA format only admits rate 24000: other rates are stated by our `input_sample_rate` extension.
        fmt: dict[str, Any] = {"type": "audio/pcm"}
        if st.input_rate_hz == OPENAI_RATE_HZ:
            fmt["rate"] = OPENAI_RATE_HZ
        return {
            "type": "realtime",
            "id": session_id,
            "object": "realtime.session",
            "model": st.model,
            "output_modalities": ["text"],
            "instructions": st.instructions,
            "max_output_tokens": max_tokens,
            "audio": {"input": {"format": fmt, "turn_detection": td, "wake_word": wake}},
            "input_sample_rate": st.input_rate_hz,
        }

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

    def assistant_item(self, item_id: str, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text" if self.dialect == "ga" else "text", "text": text}]
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
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"id": response_id, "object": "realtime.response", "status": status, "output": output}
        body["status_details"] = status_details
        if self.dialect == "ga":
            body["output_modalities"] = ["text"]
        else:
            body["modalities"] = ["text"]
        if usage is not None:
            body["usage"] = usage
        if timings_ms is not None:
            body["timings_ms"] = timings_ms
        return body

    def response_start(self, rid: str, item_id: str) -> list[dict[str, Any]]:
        """response.created, then the assistant item and its text part being opened."""
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        item = self.assistant_item(item_id, None, "in_progress")
        return [
            self.event("response.created", response=self.response(rid, "in_progress", [])),
            self.event("response.output_item.added", response_id=rid, output_index=0, item=item),
            self.event("response.content_part.added", **where, part={"type": "text", "text": ""}),
        ]

    def text_delta(self, rid: str, item_id: str, delta: str) -> dict[str, Any]:
        return self.text_event("delta", response_id=rid, item_id=item_id, output_index=0, content_index=0, delta=delta)

    def response_end(self, rid: str, item_id: str, done: ResponseDone) -> list[dict[str, Any]]:
        """Text done, part done, item done, and the one response.done (status, details, output, usage, timings)."""
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        text = done.text
        item = self.assistant_item(item_id, text, "completed" if done.status == "completed" else "incomplete")
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
        body = self.response(rid, done.status, [item], details, usage, dict(done.timings_ms))
        return [
            self.text_event("done", **where, text=text),
            self.event("response.content_part.done", **where, part={"type": "text", "text": text}),
            self.event("response.output_item.done", response_id=rid, output_index=0, item=item),
            self.event("response.done", response=body),
        ]

    def user_item(self, item_id: str, previous_item_id: str | None, part: dict[str, Any]) -> list[dict[str, Any]]:
        """A user item entering the conversation: GA `conversation.item.added` + `.done`, beta `.created`."""
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [part],
        }
        if self.dialect == "beta":
            return [self.event("conversation.item.created", item=item, previous_item_id=previous_item_id)]
        return [
            self.event("conversation.item.added", item=item, previous_item_id=previous_item_id),
            self.event("conversation.item.done", item=item, previous_item_id=previous_item_id),
        ]
