"""The settings schema of a realtime session, and `session.update` validation (GA nested and beta flat shapes).

One schema: `TurnDetection` (in `assistant.audio.vad`: the VAD's own `VadParams` plus what to do at a turn's
edges; every field declares its type and range once, `assistant.schema`) is both a session's `turn_detection` and
the config file's `[vad]` section (the server-wide default every session starts from). `SessionSettings` is the
effective session; its fields carry their ranges the same way. So the TOML validation, the GA and beta
`session.update` parsing and the MQTT devices' sessions all check a value by the same declaration.
`WakeWordSettings` (`assistant.audio.wake_word`) is likewise both a session's `wake_word` (None = off; our extension:
GA `session.audio.input.wake_word`, beta `session.wake_word`) and the config's `[wake_word]` section.
`apply_session_update(settings, payload, default_td, default_wake)` returns the new frozen settings and non-fatal
warnings; a fatal problem raises `ProtocolError` and changes nothing. `events.EventFactory.session` renders it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from assistant.audio.resample import MAX_RATE_HZ, MIN_RATE_HZ
from assistant.audio.vad import TurnDetection
from assistant.audio.wake_word import WakeWordSettings, installed_wake_words
from assistant.realtime.protocol import OPENAI_RATE_HZ, ProtocolError, max_tokens
from assistant.schema import SettingError, bounds, check_fields, coerce


@dataclass(frozen=True)
class SessionSettings:
    model: str = "local"
    instructions: str = ""  # "" = the backend's default system prompt
    input_rate_hz: int = field(default=OPENAI_RATE_HZ, metadata=bounds(MIN_RATE_HZ, MAX_RATE_HZ))
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None = push-to-talk
    max_output_tokens: int | None = None  # None = "inf" (generation config)
    temperature: float | None = field(default=None, metadata=bounds(0.0, 2.0))
    transcription: bool = False  # the client asked for input transcription (we send it whenever one exists)
    wake_word: WakeWordSettings | None = None  # None = every turn is heard; else only after the wake word

    def __post_init__(self) -> None:
        check_fields(self)


def _field(cls: type, name: str, value: Any, param: str, eid: str | None) -> Any:
    """`value` checked as field `name` of `cls`; a mismatch is the client's `invalid_event` naming `param`."""
    try:
        return coerce(param, cls, name, value)
    except SettingError as e:
        raise ProtocolError("invalid_event", f"{param} must be {e.expected}, got {e.got}", param, eid) from None


_TD_KEYS = [f.name for f in dataclasses.fields(TurnDetection)]


def _parse_turn_detection(
    td: Any, current: TurnDetection | None, default: TurnDetection, param: str, eid: str | None
) -> TurnDetection | None:
    if td is None:
        return None
    if not isinstance(td, dict):
        raise ProtocolError("invalid_event", f"{param} must be an object or null, got {td!r}", param, eid)
    changes = {k: _field(TurnDetection, k, td[k], f"{param}.{k}", eid) for k in _TD_KEYS if td.get(k) is not None}
    return dataclasses.replace(current or default, **changes)


_WAKE_KEYS = [f.name for f in dataclasses.fields(WakeWordSettings)]


def _parse_wake_word(
    value: Any, current: WakeWordSettings | None, default: WakeWordSettings, param: str, eid: str | None
) -> WakeWordSettings | None:
    """`{"name": ..., "follow_up_ms": ...}` over the current (or the server's default) wake word; null or name ""
    turns it off. A name that is not installed is refused with the list of installed ones."""
    if value is None:
        return None
    if not isinstance(value, dict):
        msg = f"{param} must be an object {{name, follow_up_ms}} or null, got {value!r}"
        raise ProtocolError("invalid_event", msg, param, eid)
    base = current or default
    if value.get("name") is None and not base.name:
        names = ", ".join(installed_wake_words())
        msg = f"{param}.name is needed to turn the wake word on: one of {names} (null turns it off)"
        raise ProtocolError("invalid_event", msg, f"{param}.name", eid)
    changes = {
        k: _field(WakeWordSettings, k, value[k], f"{param}.{k}", eid) for k in _WAKE_KEYS if value.get(k) is not None
    }
    try:
        new = dataclasses.replace(base, **changes)
    except SettingError as e:  # the name check
        raise ProtocolError(
            "invalid_event", f"{param}.name must be {e.expected}, got {e.got}", f"{param}.name", eid
        ) from None
    return new if new.name else None


def _parse_rate(value: Any, param: str, eid: str | None) -> int:
    try:
        return coerce(param, SessionSettings, "input_rate_hz", value)
    except SettingError as e:
        msg = f"{param} must be {e.expected} Hz, got {e.got}"
        raise ProtocolError("sample_rate_out_of_range", msg, param, eid) from None


def apply_session_update(
    cur: SessionSettings,
    s: dict[str, Any],
    eid: str | None = None,
    default_td: TurnDetection | None = None,
    default_wake: WakeWordSettings | None = None,
) -> tuple[SessionSettings, list[ProtocolError]]:
    """Validate a GA (nested) or beta (flat) `session` payload. Fatal problems raise ProtocolError and change
    nothing; requests we can only partly honour (audio output) come back as warnings and are otherwise applied.
    `default_td` is what a session switching from push-to-talk back to server VAD starts from (the server's), and
    `default_wake` what a wake word turned on without `follow_up_ms` starts from (the server's `[wake_word]`)."""
    default_td = default_td or TurnDetection()
    default_wake = default_wake or WakeWordSettings()
    warnings: list[ProtocolError] = []
    ch: dict[str, Any] = {}
    if isinstance(s.get("model"), str):
        ch["model"] = s["model"]
    if "instructions" in s:
        ch["instructions"] = _field(SessionSettings, "instructions", s["instructions"], "session.instructions", eid)
    for key in ("output_modalities", "modalities"):
        mods = s.get(key)
        if mods is None:
            continue
        if not isinstance(mods, list) or not all(m in ("text", "audio") for m in mods):
            raise ProtocolError("invalid_event", f"session.{key} must list 'text'/'audio'", f"session.{key}", eid)
        if "audio" in mods:
            msg = f"session.{key} asks for audio; this server answers in text only (output is text)"
            warnings.append(ProtocolError("audio_output_unsupported", msg, f"session.{key}", eid))
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in s:
            ch["max_output_tokens"] = max_tokens(s[key], f"session.{key}", eid)
    if s.get("temperature") is not None:
        ch["temperature"] = _field(SessionSettings, "temperature", s["temperature"], "session.temperature", eid)
    if any(s.get(k) is not None for k in ("voice", "output_audio_format", "speed")):
        msg = "voice/output audio settings are ignored: this server answers in text only"
        warnings.append(ProtocolError("audio_output_unsupported", msg, "session.voice", eid))
    # beta (flat)
    fmt = s.get("input_audio_format")
    if fmt is not None and fmt != "pcm16":
        msg = f"session.input_audio_format must be 'pcm16', got {fmt!r}"
        raise ProtocolError("unsupported_audio_format", msg, "session.input_audio_format", eid)
    if "turn_detection" in s:
        param = "session.turn_detection"
        ch["turn_detection"] = _parse_turn_detection(s["turn_detection"], cur.turn_detection, default_td, param, eid)
    if s.get("input_audio_transcription") is not None:
        ch["transcription"] = True
    if "wake_word" in s:
        ch["wake_word"] = _parse_wake_word(s["wake_word"], cur.wake_word, default_wake, "session.wake_word", eid)
    # GA (nested)
    audio = s.get("audio")
    if audio is not None:
        ch.update(_parse_ga_audio(audio, cur, default_td, default_wake, eid, warnings))
    if "input_sample_rate" in s:  # our extension, wins over the format's rate
        ch["input_rate_hz"] = _parse_rate(s["input_sample_rate"], "session.input_sample_rate", eid)
    return dataclasses.replace(cur, **ch), warnings


def _parse_ga_audio(
    audio: Any,
    cur: SessionSettings,
    default_td: TurnDetection,
    default_wake: WakeWordSettings,
    eid: str | None,
    warnings: list[ProtocolError],
) -> dict[str, Any]:
    if not isinstance(audio, dict):
        raise ProtocolError("invalid_event", "session.audio must be an object", "session.audio", eid)
    ch: dict[str, Any] = {}
    if audio.get("output"):
        msg = "session.audio.output is ignored: this server answers in text only"
        warnings.append(ProtocolError("audio_output_unsupported", msg, "session.audio.output", eid))
    inp = audio.get("input")
    if inp is None:
        return ch
    if not isinstance(inp, dict):
        raise ProtocolError("invalid_event", "session.audio.input must be an object", "session.audio.input", eid)
    fmt = inp.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
            msg = f"session.audio.input.format must be {{'type': 'audio/pcm'}}, got {fmt!r}"
            raise ProtocolError("unsupported_audio_format", msg, "session.audio.input.format", eid)
        if fmt.get("rate") is not None:
            ch["input_rate_hz"] = _parse_rate(fmt["rate"], "session.audio.input.format.rate", eid)
    if "turn_detection" in inp:
        param = "session.audio.input.turn_detection"
        ch["turn_detection"] = _parse_turn_detection(inp["turn_detection"], cur.turn_detection, default_td, param, eid)
    if inp.get("transcription") is not None:
        ch["transcription"] = True
    if "wake_word" in inp:
        param = "session.audio.input.wake_word"
        ch["wake_word"] = _parse_wake_word(inp["wake_word"], cur.wake_word, default_wake, param, eid)
    return ch
