"""Client side of the wire protocol (OpenAI Realtime): parsing and validating client events, and the error codes.

Pure code, no I/O. Two dialects, chosen per connection: `"ga"` (default; `response.output_text.*`, nested
`session.audio.input...`) and `"beta"` (`OpenAI-Beta: realtime=v1`; `response.text.*`, flat session).

- `parse_client_event(raw)` turns a JSON text (or a dict) into one typed client event, or raises `ProtocolError`
  carrying a stable `code` (table `ERROR_CODES`, documented in PROTOCOL.md) and the offending `event_id`.
- `settings.py` holds the effective session (`SessionSettings`) and validates `session.update` payloads;
  `events.py` builds the server events.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from assistant.schema import shown

Dialect = Literal["ga", "beta"]
OPENAI_RATE_HZ = 24000  # the OpenAI formats' PCM16 rate: the default input rate in both dialects
MIN_COMMIT_MS = 100  # OpenAI refuses commits holding less audio than this (input_audio_buffer_commit_empty)

# code -> (error type, when it is sent). PROTOCOL.md lists the same table; tests check every code is documented.
ERROR_CODES: dict[str, tuple[str, str]] = {
    "invalid_json": ("invalid_request_error", "a text frame is not a JSON object"),
    "invalid_event": ("invalid_request_error", "the event lacks `type` or a field has the wrong type or value"),
    "unknown_event": ("invalid_request_error", "the event `type` is not an event this server knows"),
    "unsupported_event": ("invalid_request_error", "a well-formed OpenAI event this server does not implement"),
    "audio_output_unsupported": (
        "invalid_request_error",
        "audio output asked of a server without a voice (answers stay text), or a WebRTC-only audio event",
    ),
    "unknown_parameter": ("invalid_request_error", "a `session` key OpenAI's schema and ours lack; nothing changed"),
    "unsupported_parameter": (
        "invalid_request_error",
        "a `session` setting of OpenAI's schema this server cannot honour (the message says why); nothing changed",
    ),
    "unknown_voice": ("invalid_request_error", "a voice that is not installed; the message lists the installed ones"),
    "unknown_language": (
        "invalid_request_error",
        "a transcription language the recogniser does not know; the message lists the codes it knows",
    ),
    "item_not_found": (
        "invalid_request_error",
        "conversation.item.truncate/retrieve/delete (or create's previous_item_id) names an item this session lacks",
    ),
    "item_in_progress": (
        "invalid_request_error",
        "conversation.item.delete of the item a response is still generating (send response.cancel first)",
    ),
    "unknown_call_id": (
        "invalid_request_error",
        "a function_call_output whose call_id names no function_call of this session",
    ),
    "item_not_truncatable": (
        "invalid_request_error",
        "conversation.item.truncate of an item without audio (a user item or a text answer)",
    ),
    "unsupported_audio_format": ("invalid_request_error", "input other than PCM16, output other than PCM16 or G.711"),
    "sample_rate_out_of_range": ("invalid_request_error", "input_sample_rate outside 8000..48000 Hz"),
    "invalid_audio": ("invalid_request_error", "audio bytes are not PCM16 (odd length or bad base64)"),
    "message_too_large": ("invalid_request_error", "a message exceeds server.max_message_bytes; it was dropped"),
    "session_not_ready": ("invalid_request_error", "an event arrived before the session was set up"),
    "input_audio_buffer_commit_empty": ("invalid_request_error", "commit with less than 100 ms of audio buffered"),
    "response_cancel_not_active": ("invalid_request_error", "response.cancel with no response in progress"),
    "conversation_already_has_active_response": ("invalid_request_error", "response.create while one is running"),
    "server_busy": ("server_error", "too many sessions or queued responses; retry later"),
    "response_failed": ("server_error", "the model failed while answering; the session goes on"),
    "turn_failed": ("server_error", "the model failed to process the user's audio; the session goes on"),
    "upstream_unavailable": ("server_error", "backend openai: no model server reachable, or it went away mid-answer"),
    "upstream_timeout": ("server_error", "backend openai: the model server was too slow (openai.*_timeout_s)"),
    "upstream_error": ("server_error", "backend openai: the model server answered with an error or nonsense"),
    "turn_too_long": ("invalid_request_error", "a user turn over `engine.max_turn_tokens`; it was not answered"),
    "turn_interrupted": ("server_error", "MQTT: the connection was lost mid-turn; that turn was dropped, speak again"),
    "input_audio_buffer_truncated": (
        "invalid_request_error",
        "a push-to-talk turn over `server.max_turn_audio_ms`: only its newest audio was kept",
    ),
}


class ProtocolError(Exception):
    """A client mistake with a stable `code`; becomes one `error` event and the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"undocumented error code {code!r}; add it to ERROR_CODES and PROTOCOL.md")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id

    @property
    def type(self) -> str:
        return ERROR_CODES[self.code][0]


# ---- client events ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    session: dict[str, Any]


@dataclass(frozen=True)
class AudioAppend:
    event_id: str | None
    pcm: bytes  # PCM16 LE mono at the session's input rate, even length


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    instructions: str | None = None  # replaces the session's for this response only: not supported, see session
    max_output_tokens: int | None = None
    output_audio: bool | None = None  # this response's modality (None: the session's)


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None


@dataclass(frozen=True)
class ConversationReset:
    event_id: str | None


@dataclass(frozen=True)
class ItemCreate:
    """`conversation.item.create`: a user message (typed text and/or audio, a turn) or a `function_call_output`
    (the client's result of a tool call, `call_id` + `output`)."""

    event_id: str | None
    item_id: str | None  # the client's id for the new item (None: the server makes one)
    previous_item_id: str | None  # None: append at the end; else the item it goes after
    text: str | None = None  # user message: its input_text parts joined by newlines
    pcm: bytes | None = None  # user message: its input_audio, PCM16 LE mono at the session's input rate
    call_id: str | None = None  # function_call_output
    output: str | None = None  # function_call_output

    @property
    def is_output(self) -> bool:
        return self.call_id is not None


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemTruncate:
    """`conversation.item.truncate`: the listener heard only `audio_end_ms` of the assistant item's audio."""

    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


ClientEvent = (
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ResponseCreate
    | ResponseCancel
    | ConversationReset
    | ItemCreate
    | ItemDelete
    | ItemTruncate
    | ItemRetrieve
)

# Well-formed OpenAI client events we do not implement: the WebRTC-only audio one gets the clearer code.
_AUDIO_OUTPUT_EVENTS = {"output_audio_buffer.clear"}
_UNSUPPORTED_EVENTS = {
    "transcription_session.update",
    "session.close",
}


def _event_id(obj: dict[str, Any]) -> str | None:
    eid = obj.get("event_id")
    return eid if isinstance(eid, str) else None


def max_tokens(value: Any, param: str, eid: str | None) -> int | None:
    if value is None or value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32767:
        raise ProtocolError("invalid_event", f"{param} must be an integer 1..32767 or 'inf', got {value!r}", param, eid)
    return value


def output_modality(mods: Any, param: str, eid: str | None) -> bool:
    """An `output_modalities` / `modalities` list -> True for audio (which always carries its transcript)."""
    if not isinstance(mods, list) or not mods or not all(m in ("text", "audio") for m in mods):
        raise ProtocolError("invalid_event", f"{param} must list 'text' and/or 'audio', got {shown(mods)}", param, eid)
    return "audio" in mods


def _int_field(obj: dict[str, Any], key: str, eid: str | None, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31:
        etype = obj.get("type")
        raise ProtocolError("invalid_event", f"{etype}: {key} must be an integer >= 0, got {shown(value)}", key, eid)
    return value


def _item_id(obj: dict[str, Any], eid: str | None) -> str:
    item_id = obj.get("item_id")
    if not isinstance(item_id, str):
        etype = obj.get("type")
        raise ProtocolError("invalid_event", f"{etype} needs a string item_id, got {shown(item_id)}", "item_id", eid)
    return item_id


def decode_audio_b64(value: Any, eid: str | None) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError("invalid_event", f"audio must be a base64 string, got {type(value).__name__}", "audio", eid)
    try:
        pcm = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        msg = "audio is not valid base64 (standard alphabet, padded)"
        raise ProtocolError("invalid_audio", msg, "audio", eid) from None
    return pcm


_EVENT_ID_TEXT = re.compile(r'"event_id"\s*:\s*"([^"\\]{1,128})"')


def _event_id_in_text(raw: str | bytes) -> str | None:
    """The `event_id` of a frame that is not valid JSON, when its start names one (so the error can name it)."""
    head = raw[:4096].decode("utf-8", "replace") if isinstance(raw, bytes) else raw[:4096]
    m = _EVENT_ID_TEXT.search(head)
    return m.group(1) if m else None


def parse_client_event(raw: str | bytes | dict[str, Any]) -> ClientEvent:
    """One client JSON event -> a typed event. Raises ProtocolError (stable code) for anything malformed."""
    if isinstance(raw, dict):
        obj = raw
    else:
        try:
            obj = json.loads(raw)
        # ValueError: an integer of thousands of digits; RecursionError: arrays nested thousands deep.
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            msg = f"expected a JSON object, could not parse it: {e}"
            raise ProtocolError("invalid_json", msg, None, _event_id_in_text(raw)) from None
        if not isinstance(obj, dict):
            raise ProtocolError("invalid_json", f"expected a JSON object, got a JSON {type(obj).__name__}")
    eid = _event_id(obj)
    etype = obj.get("type")
    if not isinstance(etype, str):
        raise ProtocolError("invalid_event", f"expected a string field 'type', got {etype!r}", "type", eid)
    if etype == "session.update":
        session = obj.get("session")
        if not isinstance(session, dict):
            raise ProtocolError("invalid_event", "session.update needs an object 'session'", "session", eid)
        return SessionUpdate(eid, session)
    if etype == "input_audio_buffer.append":
        pcm = decode_audio_b64(obj.get("audio"), eid)
        return AudioAppend(eid, pcm)
    if etype == "input_audio_buffer.commit":
        return AudioCommit(eid)
    if etype == "input_audio_buffer.clear":
        return AudioClear(eid)
    if etype == "response.create":
        return _parse_response_create(obj, eid)
    if etype == "response.cancel":
        rid = obj.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError("invalid_event", f"response_id must be a string, got {rid!r}", "response_id", eid)
        return ResponseCancel(eid, rid)
    if etype == "conversation.reset":
        return ConversationReset(eid)
    if etype == "conversation.item.create":
        return _parse_item_create(obj, eid)
    if etype == "conversation.item.truncate":
        audio_end_ms = _int_field(obj, "audio_end_ms", eid)
        return ItemTruncate(eid, _item_id(obj, eid), _int_field(obj, "content_index", eid, 0), audio_end_ms)
    if etype == "conversation.item.retrieve":
        return ItemRetrieve(eid, _item_id(obj, eid))
    if etype == "conversation.item.delete":
        return ItemDelete(eid, _item_id(obj, eid))
    if etype in _AUDIO_OUTPUT_EVENTS:
        msg = (
            f"{etype} exists only over WebRTC; over WebSocket answers come as text or audio deltas: stop playback "
            "on the client and send response.cancel and conversation.item.truncate"
        )
        raise ProtocolError("audio_output_unsupported", msg, "type", eid)
    if etype in _UNSUPPORTED_EVENTS:
        raise ProtocolError("unsupported_event", f"{etype} is not implemented by this server", "type", eid)
    raise ProtocolError("unknown_event", f"unknown event type {etype!r}; see PROTOCOL.md for the events", "type", eid)


def _parse_response_create(obj: dict[str, Any], eid: str | None) -> ResponseCreate:
    resp = obj.get("response") or {}
    if not isinstance(resp, dict):
        raise ProtocolError("invalid_event", "response must be an object", "response", eid)
    key = "output_modalities" if "output_modalities" in resp else "modalities"
    audio = None if resp.get(key) is None else output_modality(resp[key], f"response.{key}", eid)
    instr = resp.get("instructions")
    if instr is not None and not isinstance(instr, str):
        raise ProtocolError("invalid_event", "response.instructions must be a string", "response.instructions", eid)
    key = "max_output_tokens" if "max_output_tokens" in resp else "max_response_output_tokens"
    return ResponseCreate(eid, instr, max_tokens(resp.get(key), f"response.{key}", eid), audio)


ITEM_TYPES = ("message", "function_call_output")  # what a client may create (function_call items: the model's)
_ID_MAX_CHARS = 64  # OpenAI's limit for client-chosen item ids


def _optional_id(obj: dict[str, Any], key: str, param: str, eid: str | None) -> str | None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= _ID_MAX_CHARS):
        msg = f"{param} must be a string of 1..{_ID_MAX_CHARS} characters or absent, got {shown(value)}"
        raise ProtocolError("invalid_event", msg, param, eid)
    return value


def _parse_item_create(obj: dict[str, Any], eid: str | None) -> ItemCreate:
    item = obj.get("item")
    if not isinstance(item, dict):
        raise ProtocolError("invalid_event", "conversation.item.create needs an object 'item'", "item", eid)
    where = (_optional_id(item, "id", "item.id", eid), _optional_id(obj, "previous_item_id", "previous_item_id", eid))
    kind = item.get("type")
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not call_id:
            msg = f"a function_call_output item needs the string call_id of the function_call, got {shown(call_id)}"
            raise ProtocolError("invalid_event", msg, "item.call_id", eid)
        if not isinstance(output, str):
            msg = f"a function_call_output item needs its output as a string (e.g. JSON text), got {shown(output)}"
            raise ProtocolError("invalid_event", msg, "item.output", eid)
        return ItemCreate(eid, *where, call_id=call_id, output=output)
    if kind != "message":
        msg = f"item.type must be one of {', '.join(ITEM_TYPES)}, got {shown(kind)}"
        raise ProtocolError("invalid_event", msg, "item.type", eid)
    if item.get("role") != "user":
        msg = f"a message item a client creates must have role 'user', got {shown(item.get('role'))}"
        raise ProtocolError("unsupported_event", msg, "item.role", eid)
    content = item.get("content")
    if not isinstance(content, list) or not content:
        msg = f"item.content must be a non-empty list of content parts, got {shown(content)}"
        raise ProtocolError("invalid_event", msg, "item.content", eid)
    texts, pcm = [], b""
    for i, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype == "input_text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif ptype == "input_audio":
            chunk = decode_audio_b64(part.get("audio"), eid)
            if len(chunk) % 2:
                msg = f"item.content[{i}].audio must be PCM16 (an even number of bytes), got {len(chunk)} bytes"
                raise ProtocolError("invalid_audio", msg, f"item.content[{i}].audio", eid)
            pcm += chunk
        else:
            msg = (
                f"item.content[{i}] must be {{type: 'input_text', text: string}} or {{type: 'input_audio', audio: "
                f"base64 PCM16}}, got {shown(part)}"
            )
            raise ProtocolError("invalid_event", msg, f"item.content[{i}]", eid)
    text = "\n".join(texts) if texts else None
    if text is None and not pcm:
        msg = "item.content has only empty input_audio: send PCM16 audio (base64) or an input_text part"
        raise ProtocolError("invalid_audio", msg, "item.content", eid)
    return ItemCreate(eid, *where, text=text, pcm=pcm or None)
