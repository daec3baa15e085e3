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
Which keys exist (OpenAI's GA and beta, ours), the `unknown_parameter` / `unsupported_parameter` refusals and the
settings kept as given (transcription model, noise reduction, tracing, ...) are `session_keys.py`'s.

Spoken answers: `SessionSettings.output_audio` is the output modality (GA `output_modalities: ["audio"]`, beta
`modalities: ["audio", "text"]`); `AudioOutput` is how answers are spoken (voice, speed, format, rate) and which
voices the server has (none: audio requests get a warning and answers stay text).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from assistant.audio.g711 import RATE_HZ as G711_RATE_HZ
from assistant.audio.resample import MAX_RATE_HZ, MIN_RATE_HZ
from assistant.audio.speech_text import MAX_FIRST_CLAUSE_CHARS, MAX_SPEED, MIN_SPEED, OPENAI_VOICES
from assistant.audio.vad import TurnDetection
from assistant.audio.wake_word import WakeWordSettings, installed_wake_words
from assistant.backends.tools import ToolChoice, ToolSpec
from assistant.realtime import session_keys as K
from assistant.realtime.protocol import OPENAI_RATE_HZ, ProtocolError, max_tokens, output_modality
from assistant.realtime.session_keys import AsGiven, NoiseReduction, Transcription
from assistant.realtime.tools import tool_settings
from assistant.schema import SettingError, bounds, check_fields, coerce, shown

OutputFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]  # beta names; GA `audio/pcm`, `audio/pcmu`, `audio/pcma`
GA_OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}


@dataclass(frozen=True)
class AudioOutput:
    """How a session's answers are spoken, and with what the server can speak (`voices`; empty = text only)."""

    voices: tuple[str, ...] = ()  # the server's loaded voices; the first is the default
    voice: str = ""  # the voice that speaks (one of `voices`)
    voice_label: str = ""  # the name the client chose, echoed back (an OpenAI voice name is an alias of `voice`)
    speed: float = field(default=1.0, metadata=bounds(MIN_SPEED, MAX_SPEED))
    format: OutputFormat = "pcm16"
    pcm_rate_hz: int = field(default=OPENAI_RATE_HZ, metadata=bounds(MIN_RATE_HZ, MAX_RATE_HZ))  # for pcm16
    first_clause_chars: int = field(default=0, metadata=bounds(0, MAX_FIRST_CLAUSE_CHARS))  # `[voice]` policy

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def of_server(cls, voices: tuple[str, ...], **kw: Any) -> AudioOutput:
        name = voices[0] if voices else ""
        return cls(voices=voices, voice=name, voice_label=name, **kw)

    @property
    def rate_hz(self) -> int:
        return self.pcm_rate_hz if self.format == "pcm16" else G711_RATE_HZ


@dataclass(frozen=True)
class SessionSettings:
    model: str = "local"
    instructions: str = ""  # "" = the backend's default system prompt
    input_rate_hz: int = field(default=OPENAI_RATE_HZ, metadata=bounds(MIN_RATE_HZ, MAX_RATE_HZ))
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None = push-to-talk
    max_output_tokens: int | None = None  # None = "inf" (generation config)
    temperature: float | None = field(default=None, metadata=bounds(0.0, 2.0))
    transcription: Transcription | None = None  # asked-for input transcription (sent whenever the backend has one)
    languages: tuple[str, ...] = ()  # the codes the server's recogniser can be told (`Transcription.language`)
    # The server's recogniser hears a turn's speech trimmed to a margin (Whisper): its work may start during the
    # end-of-turn silence before the trailing padding is complete (`VadSegmenter.whole_padding` off).
    hears_trimmed: bool = False
    noise_reduction: NoiseReduction | None = None  # WebRTC noise suppression before the VAD (`audio.denoise`)
    as_given: AsGiven = field(default_factory=AsGiven)  # parallel_tool_calls, tracing, truncation: echoed as sent
    wake_word: WakeWordSettings | None = None  # None = every turn is heard; else only after the wake word
    output_audio: bool = False  # answers are spoken (audio + transcript) instead of text
    audio_out: AudioOutput = field(default_factory=AudioOutput)
    tools: tuple[ToolSpec, ...] = ()  # functions the model may call (`tools.py`)
    tool_choice: ToolChoice = ToolChoice()

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
    kind = td.get("type", (current or default).type)
    own = K.SEMANTIC_VAD_KEYS if kind == "semantic_vad" else K.SERVER_VAD_KEYS
    K.check_keys(td, own | K.OUR_TURN_DETECTION_KEYS, param, eid)
    if td.get("idle_timeout_ms") is not None:
        why = "it never answers by itself after a silence; send response.create"
        raise K.unsupported(f"{param}.idle_timeout_ms", td["idle_timeout_ms"], why, eid)
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
    K.check_keys(value, K.WAKE_WORD_KEYS, param, eid)
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
    K.check_keys(s, K.SESSION_KEYS, "session", eid)
    K.refuse_unless_off(s, eid)
    if s.get("type", "realtime") != "realtime":
        why = "it serves realtime sessions only (connect a transcription client as a realtime one)"
        raise K.unsupported("session.type", s["type"], why, eid)
    ch: dict[str, Any] = {}
    as_given = K.parse_as_given(s, eid)
    if as_given:
        ch["as_given"] = dataclasses.replace(cur.as_given, **as_given)
    if isinstance(s.get("model"), str):
        ch["model"] = s["model"]
    if "instructions" in s:
        ch["instructions"] = _field(SessionSettings, "instructions", s["instructions"], "session.instructions", eid)
    for key in ("output_modalities", "modalities"):
        if s.get(key) is not None:
            audio = output_modality(s[key], f"session.{key}", eid)
            if audio and not cur.audio_out.voices:
                msg = f"session.{key} asks for audio; this server has no voice installed, answers are text"
                warnings.append(ProtocolError("audio_output_unsupported", msg, f"session.{key}", eid))
            else:
                ch["output_audio"] = audio
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in s:
            ch["max_output_tokens"] = max_tokens(s[key], f"session.{key}", eid)
    if s.get("temperature") is not None:
        ch["temperature"] = _field(SessionSettings, "temperature", s["temperature"], "session.temperature", eid)
    keys = ("voice", "speed", "output_audio_format", "output_sample_rate")
    beta_out = {k: s[k] for k in keys if s.get(k) is not None}
    ga_out = s["audio"].get("output") if isinstance(s.get("audio"), dict) else None
    if beta_out or ga_out:
        out = _parse_audio_output(cur.audio_out, beta_out, ga_out, eid, warnings)
        if out != cur.audio_out:
            ch["audio_out"] = out
    # beta (flat)
    fmt = s.get("input_audio_format")
    if fmt is not None and fmt != "pcm16":
        msg = f"session.input_audio_format must be 'pcm16', got {fmt!r}"
        raise ProtocolError("unsupported_audio_format", msg, "session.input_audio_format", eid)
    ch.update(_parse_input(s, "session", BETA_INPUT_KEYS, cur, default_td, default_wake, eid))
    # GA (nested)
    audio = s.get("audio")
    if audio is not None:
        ch.update(_parse_ga_audio(audio, cur, default_td, default_wake, eid, warnings))
    ch.update(tool_settings(s, cur.tools, cur.tool_choice, eid))
    if "input_sample_rate" in s:  # our extension, wins over the format's rate
        ch["input_rate_hz"] = _parse_rate(s["input_sample_rate"], "session.input_sample_rate", eid)
    return dataclasses.replace(cur, **ch), warnings


# The input settings and where each dialect keeps them (beta: flat on the session; GA: in session.audio.input).
BETA_INPUT_KEYS = {
    "turn_detection": "turn_detection",
    "transcription": "input_audio_transcription",
    "noise_reduction": "input_audio_noise_reduction",
    "wake_word": "wake_word",
}
GA_INPUT_KEYS = {name: name for name in BETA_INPUT_KEYS}


def _parse_input(
    src: dict[str, Any],
    prefix: str,
    keys: dict[str, str],
    cur: SessionSettings,
    default_td: TurnDetection,
    default_wake: WakeWordSettings,
    eid: str | None,
) -> dict[str, Any]:
    """The input settings present in `src` (`keys`: setting -> its key there; `prefix` names it in errors)."""
    ch: dict[str, Any] = {}
    parsers = {
        "turn_detection": lambda v, param: _parse_turn_detection(v, cur.turn_detection, default_td, param, eid),
        "transcription": lambda v, param: K.parse_transcription(v, param, eid, cur.languages),
        "noise_reduction": lambda v, param: K.parse_noise_reduction(v, param, eid),
        "wake_word": lambda v, param: _parse_wake_word(v, cur.wake_word, default_wake, param, eid),
    }
    for setting, key in keys.items():
        if key in src:
            ch[setting] = parsers[setting](src[key], f"{prefix}.{key}")
    return ch


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
    K.check_keys(audio, K.AUDIO_KEYS, "session.audio", eid)
    ch: dict[str, Any] = {}
    inp = audio.get("input")
    if inp is None:
        return ch
    if not isinstance(inp, dict):
        raise ProtocolError("invalid_event", "session.audio.input must be an object", "session.audio.input", eid)
    K.check_keys(inp, K.AUDIO_INPUT_KEYS, "session.audio.input", eid)
    fmt = inp.get("format")
    if fmt is not None:
        if isinstance(fmt, dict):
            K.check_keys(fmt, K.FORMAT_KEYS, "session.audio.input.format", eid)
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
            msg = f"session.audio.input.format must be {{'type': 'audio/pcm'}}, got {fmt!r}"
            raise ProtocolError("unsupported_audio_format", msg, "session.audio.input.format", eid)
        if fmt.get("rate") is not None:
            ch["input_rate_hz"] = _parse_rate(fmt["rate"], "session.audio.input.format.rate", eid)
    ch.update(_parse_input(inp, "session.audio.input", GA_INPUT_KEYS, cur, default_td, default_wake, eid))
    return ch


def _parse_audio_output(
    cur: AudioOutput, beta: dict[str, Any], ga: Any, eid: str | None, warnings: list[ProtocolError]
) -> AudioOutput:
    """Beta `voice` / `speed` / `output_audio_format`, GA `audio.output {format, voice, speed}`, and our
    `output_sample_rate` extension. Without a voice on the server they are ignored with one warning."""
    if isinstance(ga, dict):
        K.check_keys(ga, K.AUDIO_OUTPUT_KEYS, "session.audio.output", eid)
        if isinstance(ga.get("format"), dict):
            K.check_keys(ga["format"], K.FORMAT_KEYS, "session.audio.output.format", eid)
    if not cur.voices:
        where = "session.audio.output" if ga is not None else f"session.{next(iter(beta))}"
        msg = f"{where} is ignored: this server has no voice installed, answers are text"
        warnings.append(ProtocolError("audio_output_unsupported", msg, where, eid))
        return cur
    if ga is not None and not isinstance(ga, dict):
        raise ProtocolError("invalid_event", "session.audio.output must be an object", "session.audio.output", eid)
    ga = ga or {}
    ch: dict[str, Any] = {}
    for param, value in (("session.voice", beta.get("voice")), ("session.audio.output.voice", ga.get("voice"))):
        if value is not None:
            ch["voice"], ch["voice_label"] = _voice(cur, value, param, eid)
    for param, value in (("session.speed", beta.get("speed")), ("session.audio.output.speed", ga.get("speed"))):
        if value is not None:
            ch["speed"] = _field(AudioOutput, "speed", value, param, eid)
    fmt = beta.get("output_audio_format")
    if fmt is not None:
        if fmt not in ("pcm16", "g711_ulaw", "g711_alaw"):
            msg = f"session.output_audio_format must be 'pcm16', 'g711_ulaw' or 'g711_alaw', got {shown(fmt)}"
            raise ProtocolError("unsupported_audio_format", msg, "session.output_audio_format", eid)
        ch["format"] = fmt
    gfmt = ga.get("format")
    if gfmt is not None:
        param = "session.audio.output.format"
        kind = gfmt.get("type", "audio/pcm") if isinstance(gfmt, dict) else None
        if not isinstance(kind, str) or kind not in GA_OUTPUT_FORMATS:
            msg = f"{param} must be {{'type': 'audio/pcm' | 'audio/pcmu' | 'audio/pcma'}}, got {shown(gfmt)}"
            raise ProtocolError("unsupported_audio_format", msg, param, eid)
        ch["format"] = GA_OUTPUT_FORMATS[kind]
        if gfmt.get("rate") is not None and ch["format"] == "pcm16":
            ch["pcm_rate_hz"] = _parse_rate(gfmt["rate"], param + ".rate", eid)
    if beta.get("output_sample_rate") is not None:  # our extension, wins over the format's rate
        ch["pcm_rate_hz"] = _parse_rate(beta["output_sample_rate"], "session.output_sample_rate", eid)
    return dataclasses.replace(cur, **ch)


def _voice(cur: AudioOutput, value: Any, param: str, eid: str | None) -> tuple[str, str]:
    """(the voice that speaks, the name echoed): an installed voice, or an OpenAI voice name as an alias."""
    if isinstance(value, str) and value in cur.voices:
        return value, value
    if isinstance(value, str) and value in OPENAI_VOICES:
        return cur.voices[0], value
    msg = (
        f"{param}: voice {shown(value)} is not installed here; installed: {', '.join(cur.voices)} "
        f"(OpenAI's voice names {', '.join(sorted(OPENAI_VOICES))} are accepted and speak with {cur.voices[0]})"
    )
    raise ProtocolError("unknown_voice", msg, param, eid)
