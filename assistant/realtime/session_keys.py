"""Which `session.update` keys exist and what this server does with each: the unknown-key check, the refusals, and
the settings kept as the client gave them (transcription, noise reduction, parallel tool calls, tracing, truncation).
`tools` and `tool_choice` are the tool calling's (`assistant/realtime/tools.py`): only their keys are listed here.

OpenAI answers a key its schema lacks with `unknown_parameter` ("Unknown parameter: 'session.foo'.") and changes
nothing; so do we. The tables below are OpenAI's keys (the `openai` 3.57 SDK's GA `RealtimeSessionCreateRequest`
and beta `session_update_event.Session`, tests/test_session_keys.py checks them against it) plus our extensions.
Either dialect's keys are accepted on either connection. A key OpenAI has but we cannot honour with the value sent
(a stored `prompt`, `reasoning`, transcription `prompt`, ...) gets `unsupported_parameter` naming it and saying
why; null (or the value that means "off") is always accepted, since SDKs send their defaults.

`settings.apply_session_update` calls `check_keys` on every object of the payload before parsing any value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from assistant.audio.speech_text import language_code
from assistant.realtime.protocol import ProtocolError
from assistant.schema import shown

# ---- the key tables ------------------------------------------------------------------------------------------
GA_SESSION_KEYS = frozenset(
    {"type", "audio", "include", "instructions", "max_output_tokens", "model", "output_modalities"}
    | {"parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools", "tracing", "truncation"}
)
BETA_SESSION_KEYS = frozenset(
    {"client_secret", "input_audio_format", "input_audio_noise_reduction", "input_audio_transcription"}
    | {"instructions", "max_response_output_tokens", "modalities", "model", "output_audio_format", "speed"}
    | {"temperature", "tool_choice", "tools", "tracing", "turn_detection", "voice"}
)
OUR_SESSION_KEYS = frozenset({"input_sample_rate", "output_sample_rate", "wake_word", "temperature"})
SESSION_KEYS = GA_SESSION_KEYS | BETA_SESSION_KEYS | OUR_SESSION_KEYS

AUDIO_KEYS = frozenset({"input", "output"})
AUDIO_INPUT_KEYS = frozenset({"format", "noise_reduction", "transcription", "turn_detection"}) | {"wake_word"}
AUDIO_OUTPUT_KEYS = frozenset({"format", "speed", "voice"})
FORMAT_KEYS = frozenset({"type", "rate"})
TRANSCRIPTION_KEYS = frozenset({"model", "language", "languages", "prompt", "keywords", "delay"})
NOISE_REDUCTION_KEYS = frozenset({"type"})
SERVER_VAD_KEYS = frozenset(
    {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response", "interrupt_response"}
    | {"idle_timeout_ms"}
)
SEMANTIC_VAD_KEYS = frozenset({"type", "eagerness", "create_response", "interrupt_response"})
# Our segmenter's own knobs (`assistant.audio.vad.VadParams`), accepted with either type.
OUR_TURN_DETECTION_KEYS = frozenset(
    {"aggressiveness", "frame_ms", "min_speech_ms", "max_utterance_ms", "early_prepare_ms"}
)
WAKE_WORD_KEYS = frozenset({"name", "follow_up_ms"})


def check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str, eid: str | None) -> None:
    """OpenAI's `unknown_parameter` for the first key of `obj` not in `allowed` (sorted, so the answer is stable)."""
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        param = f"{where}.{unknown[0]}"
        msg = f"Unknown parameter: '{param}'. Known here: {', '.join(sorted(allowed))} (see PROTOCOL.md)."
        raise ProtocolError("unknown_parameter", msg, param, eid)


def unsupported(param: str, value: Any, why: str, eid: str | None) -> ProtocolError:
    msg = f"{param} = {shown(value)} is not supported by this server: {why}"
    return ProtocolError("unsupported_parameter", msg, param, eid)


def refuse_unless_off(s: dict[str, Any], eid: str | None) -> None:
    """Keys of OpenAI's schema we cannot honour: accepted only when off (null, empty, or their 'nothing' value)."""
    why = {
        "include": "it has no token log probabilities to include",
        "prompt": "it has no stored prompts; send the text as `instructions`",
        "reasoning": "its models do not reason in a separate channel",
        "client_secret": "it issues no ephemeral keys; authenticate with the server's token",
    }
    for key, reason in why.items():
        if s.get(key) not in (None, [], {}):
            raise unsupported(f"session.{key}", s[key], reason, eid)


# ---- settings kept as given ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transcription:
    """Input transcription: our recogniser transcribes whatever `model` names (it is echoed as sent); `language`
    (an ISO-639-1 code) is the language it hears every turn in instead of detecting it; `prompt`, text it is told
    comes before each turn (Whisper's previous-text prompt: names, spellings, the topic)."""

    model: str = "whisper-1"
    language: str | None = None
    prompt: str = ""


NoiseReduction = Literal["near_field", "far_field"]


@dataclass(frozen=True)
class AsGiven:
    """Settings kept as the client sent them and echoed: `parallel_tool_calls` (for the tool calling), `tracing`
    (OpenAI's dashboard traces: nothing to trace to here, so it only echoes) and `truncation` (only "auto")."""

    parallel_tool_calls: bool | None = None
    tracing: str | dict[str, Any] | None = None
    truncation: str = "auto"


def parse_transcription(
    value: Any, param: str, eid: str | None, languages: tuple[str, ...] = ()
) -> Transcription | None:
    """`languages`: the codes the server's recogniser can be told (`Backend.languages`); empty: it takes none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(
            "invalid_event", f"{param} must be an object {{model}} or null, got {shown(value)}", param, eid
        )
    check_keys(value, TRANSCRIPTION_KEYS, param, eid)
    why = {
        "languages": "the recogniser is told one language (`language`) or detects it",
        "keywords": "the recogniser takes no keyword list",
        "delay": "the recogniser transcribes each turn once it is committed",
    }
    for key, reason in why.items():
        if value.get(key) not in (None, "", []):
            raise unsupported(f"{param}.{key}", value[key], reason, eid)
    model = value.get("model", "whisper-1")
    if not isinstance(model, str) or not model:
        raise ProtocolError("invalid_event", f"{param}.model must be a model name, got {shown(model)}", param, eid)
    language = parse_language(value.get("language"), f"{param}.language", eid, languages)
    return Transcription(model, language, parse_prompt(value.get("prompt"), f"{param}.prompt", eid, languages))


def parse_prompt(value: Any, param: str, eid: str | None, languages: tuple[str, ...]) -> str:
    """The recogniser's prompt: a string ("" or null for none); refused where the backend has no Whisper (it is
    the recogniser that can be told a language, `languages`, that takes a prompt)."""
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise ProtocolError("invalid_event", f"{param} must be a string, got {shown(value)}", param, eid)
    if not languages:
        raise unsupported(param, value, "this backend hears audio as is, with no recogniser to prompt", eid)
    return value


def parse_language(value: Any, param: str, eid: str | None, languages: tuple[str, ...]) -> str | None:
    """The ISO-639-1 code `value` names ("en"; "en-US" and "EN" read as "en"), or None for none / empty."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        msg = f"{param} must be an ISO-639-1 language code such as 'en', got {shown(value)}"
        raise ProtocolError("invalid_event", msg, param, eid)
    if not languages:
        raise unsupported(
            param, value, "its recogniser cannot be told the language (this backend hears audio as is)", eid
        )
    code = language_code(value)
    if code not in languages:
        shown_codes = ", ".join(languages[:20]) + (", ..." if len(languages) > 20 else "")
        msg = (
            f"{param}: the recogniser does not know the language {shown(value)}; expected an ISO-639-1 code it "
            f"knows ({shown_codes}), or null to detect the language"
        )
        raise ProtocolError("unknown_language", msg, param, eid)
    return code


def parse_noise_reduction(value: Any, param: str, eid: str | None) -> NoiseReduction | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        msg = f"{param} must be {{'type': 'near_field' | 'far_field'}} or null, got {shown(value)}"
        raise ProtocolError("invalid_event", msg, param, eid)
    check_keys(value, NOISE_REDUCTION_KEYS, param, eid)
    kind = value.get("type")
    if kind not in ("near_field", "far_field"):
        msg = f"{param}.type must be 'near_field' or 'far_field', got {shown(kind)}"
        raise ProtocolError("invalid_event", msg, f"{param}.type", eid)
    return kind  # type: ignore[no-any-return]


def parse_as_given(s: dict[str, Any], eid: str | None) -> dict[str, Any]:
    """Changes to `AsGiven` from a `session` payload (shape checks only)."""
    ch: dict[str, Any] = {}
    if "parallel_tool_calls" in s:
        value = s["parallel_tool_calls"]
        if value is not None and not isinstance(value, bool):
            msg = f"session.parallel_tool_calls must be a boolean, got {shown(value)}"
            raise ProtocolError("invalid_event", msg, "session.parallel_tool_calls", eid)
        ch["parallel_tool_calls"] = value
    if "tracing" in s:
        ch["tracing"] = _tracing(s["tracing"], eid)
    if s.get("truncation") is not None:
        value = s["truncation"]
        if value != "auto":
            why = "it drops the oldest turns itself when the context is full ('auto' is what it does)"
            raise unsupported("session.truncation", value, why, eid)
        ch["truncation"] = value
    return ch


def _tracing(value: Any, eid: str | None) -> str | dict[str, Any] | None:
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict):
        check_keys(value, frozenset({"workflow_name", "group_id", "metadata"}), "session.tracing", eid)
        return dict(value)
    msg = f"session.tracing must be 'auto', {{workflow_name, group_id, metadata}} or null, got {shown(value)}"
    raise ProtocolError("invalid_event", msg, "session.tracing", eid)
