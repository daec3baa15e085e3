"""The effective realtime session and `session.update` validation (GA nested and beta flat shapes, extensions).

Owner: engineer D. Pure code. `apply_session_update(settings, session)` validates a `session` payload (both shapes
accepted in both dialects, plus our extensions `input_sample_rate` and the extra `turn_detection` keys) and returns
the new frozen `SessionSettings` and non-fatal warnings (e.g. audio output requested: answers are text only). A
fatal problem raises `ProtocolError` and changes nothing. `EventFactory.session` renders the result per dialect.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from assistant.audio.resample import MAX_RATE_HZ, MIN_RATE_HZ
from assistant.audio.vad import MAX_UTTERANCE_LIMIT_MS, VadParams
from assistant.server.protocol import OPENAI_RATE_HZ, ProtocolError, max_tokens


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD settings (OpenAI keys + our extensions aggressiveness, min_speech_ms, max_utterance_ms, frame_ms)."""

    threshold: float = 0.5  # accepted and echoed; webrtcvad's knob is `aggressiveness`
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 600
    create_response: bool = True
    interrupt_response: bool = True
    aggressiveness: int = 2
    min_speech_ms: int = 250
    max_utterance_ms: int = 30000
    frame_ms: int = 30

    def vad_params(self) -> VadParams:
        return VadParams(
            aggressiveness=self.aggressiveness,
            frame_ms=self.frame_ms,
            prefix_padding_ms=self.prefix_padding_ms,
            silence_duration_ms=self.silence_duration_ms,
            min_speech_ms=self.min_speech_ms,
            max_utterance_ms=self.max_utterance_ms,
        )


# key -> (python type, low, high); bool keys use (bool, None, None)
_TD_KEYS: dict[str, tuple[type, float | None, float | None]] = {
    "threshold": (float, 0.0, 1.0),
    "prefix_padding_ms": (int, 0, 2000),
    "silence_duration_ms": (int, 100, 5000),
    "create_response": (bool, None, None),
    "interrupt_response": (bool, None, None),
    "aggressiveness": (int, 0, 3),
    "min_speech_ms": (int, 0, 5000),
    "max_utterance_ms": (int, 1000, MAX_UTTERANCE_LIMIT_MS),
    "frame_ms": (int, 10, 30),
}


@dataclass(frozen=True)
class SessionSettings:
    model: str = "local"
    instructions: str = ""  # "" = the backend's default system prompt
    input_rate_hz: int = OPENAI_RATE_HZ
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None = push-to-talk
    max_output_tokens: int | None = None  # None = "inf" (generation config)
    temperature: float | None = None
    transcription: bool = False  # the client asked for input transcription (we send it whenever one exists)


def _check_number(value: Any, tp: type, lo: float | None, hi: float | None, param: str, eid: str | None) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError("invalid_event", f"{param} must be true or false, got {value!r}", param, eid)
        return value
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and tp is int:
        ok = float(value).is_integer()
    if not ok:
        raise ProtocolError("invalid_event", f"{param} must be a {tp.__name__}, got {value!r}", param, eid)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError("invalid_event", f"{param} must be in [{lo}, {hi}], got {value!r}", param, eid)
    return tp(value)


def _parse_turn_detection(td: Any, current: TurnDetection | None, param: str, eid: str | None) -> TurnDetection | None:
    if td is None:
        return None
    if not isinstance(td, dict):
        raise ProtocolError("invalid_event", f"{param} must be an object or null, got {td!r}", param, eid)
    kind = td.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ProtocolError("invalid_event", f"{param}.type must be 'server_vad', got {kind!r}", f"{param}.type", eid)
    changes = {}
    for key, (tp, lo, hi) in _TD_KEYS.items():
        if td.get(key) is not None:
            changes[key] = _check_number(td[key], tp, lo, hi, f"{param}.{key}", eid)
    if "frame_ms" in changes and changes["frame_ms"] not in (10, 20, 30):
        raise ProtocolError("invalid_event", f"{param}.frame_ms must be 10, 20 or 30", f"{param}.frame_ms", eid)
    return dataclasses.replace(current or TurnDetection(), **changes)


def _parse_rate(value: Any, param: str, eid: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("invalid_event", f"{param} must be an integer in Hz, got {value!r}", param, eid)
    if not MIN_RATE_HZ <= value <= MAX_RATE_HZ:
        msg = f"{param} must be in [{MIN_RATE_HZ}, {MAX_RATE_HZ}] Hz, got {value}"
        raise ProtocolError("sample_rate_out_of_range", msg, param, eid)
    return value


def apply_session_update(
    cur: SessionSettings, s: dict[str, Any], eid: str | None = None
) -> tuple[SessionSettings, list[ProtocolError]]:
    """Validate a GA (nested) or beta (flat) `session` payload. Fatal problems raise ProtocolError and change
    nothing; requests we can only partly honour (audio output) come back as warnings and are otherwise applied."""
    warnings: list[ProtocolError] = []
    ch: dict[str, Any] = {}
    if isinstance(s.get("model"), str):
        ch["model"] = s["model"]
    if "instructions" in s:
        if not isinstance(s["instructions"], str):
            raise ProtocolError("invalid_event", "session.instructions must be a string", "session.instructions", eid)
        ch["instructions"] = s["instructions"]
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
        ch["temperature"] = _check_number(s["temperature"], float, 0.0, 2.0, "session.temperature", eid)
    if any(s.get(k) is not None for k in ("voice", "output_audio_format", "speed")):
        msg = "voice/output audio settings are ignored: this server answers in text only"
        warnings.append(ProtocolError("audio_output_unsupported", msg, "session.voice", eid))
    # beta (flat)
    fmt = s.get("input_audio_format")
    if fmt is not None and fmt != "pcm16":
        msg = f"session.input_audio_format must be 'pcm16', got {fmt!r}"
        raise ProtocolError("unsupported_audio_format", msg, "session.input_audio_format", eid)
    if "turn_detection" in s:
        ch["turn_detection"] = _parse_turn_detection(
            s["turn_detection"], cur.turn_detection, "session.turn_detection", eid
        )
    if s.get("input_audio_transcription") is not None:
        ch["transcription"] = True
    # GA (nested)
    audio = s.get("audio")
    if audio is not None:
        ch.update(_parse_ga_audio(audio, cur, eid, warnings))
    if "input_sample_rate" in s:  # our extension, wins over the format's rate
        ch["input_rate_hz"] = _parse_rate(s["input_sample_rate"], "session.input_sample_rate", eid)
    return dataclasses.replace(cur, **ch), warnings


def _parse_ga_audio(audio: Any, cur: SessionSettings, eid: str | None, warnings: list[ProtocolError]) -> dict[str, Any]:
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
        ch["turn_detection"] = _parse_turn_detection(inp["turn_detection"], cur.turn_detection, param, eid)
    if inp.get("transcription") is not None:
        ch["transcription"] = True
    return ch
