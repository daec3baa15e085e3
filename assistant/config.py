"""Configuration: frozen dataclasses loaded from one TOML file.

`assistant/default.toml` (installed with the package; `config/default.toml` in the checkout points to it) documents
every key; a user file given with `--config` overlays it key by key. Loading is strict: an unknown key or a value of
the wrong type, outside its range or not finite fails at start, naming the key, what was expected and what came
(`assistant.schema` checks every field by its declaration). The `[vad]` section is the sessions' own
`TurnDetection` (the server-wide default of every session), the `[wake_word]` section the sessions' `WakeWordSettings`.
Nothing here reads argv or the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from assistant.audio.resample import MAX_RATE_HZ, MIN_RATE_HZ
from assistant.audio.speech_text import MAX_FIRST_CLAUSE_CHARS
from assistant.audio.vad import TurnDetection
from assistant.audio.voice import MAX_SPEED, MIN_SPEED, VOICE_PACKAGES, VoiceParams
from assistant.audio.wake_word import WakeWordSettings, check_wake_word_name
from assistant.schema import SettingError, bounds, coerce_type

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default.toml"
# the automatic thread budget sets the voice's threads aside only when the engine keeps this share of the cores
# (4 cores and more with one voice thread; see `Config.engine_threads`)
ENGINE_MIN_CORE_SHARE = 0.75


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata=bounds(0, 65535))
    token: str = ""
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = field(default=32, metadata=bounds(1, None))
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata=bounds(1024, None))
    idle_timeout_s: float = field(default=600.0, metadata=bounds(1, None))
    send_queue_events: int = field(default=1024, metadata=bounds(16, None))
    tls_cert: str = ""
    tls_key: str = ""
    shutdown_grace_s: float = field(default=5.0, metadata=bounds(0, None))
    metrics_public: bool = False
    max_turn_audio_ms: int = field(default=30000, metadata=bounds(1000, 30000))
    max_queued_turns: int = field(default=16, metadata=bounds(1, 1024))


@dataclass(frozen=True)
class ModelConfig:
    backend: Literal["embedded", "qwen-audio", "openai"] = "embedded"
    path: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    system_prompt: str = ""
    turn_instruction: str = "Answer the speaker's question briefly."


@dataclass(frozen=True)
class EmbeddedConfig:
    whisper: Literal["base", "tiny.en", "small"] = "base"
    quantization: Literal["auto", "none", "int8", "int4"] = "auto"
    cache_dir: str = ""
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short sentences, "
        "in the language the user speaks. Do not use lists or markdown."
    )
    history: Literal["exchanges", "questions"] = "exchanges"
    turn_instruction: str = ""
    language: str = ""  # the language every spoken turn is heard in ("en"); "" = Whisper detects it per turn
    whisper_english: Literal["", "tiny.en"] = "tiny.en"  # hears the turns told they are English ("" = `whisper`)
    whisper_beam_size: int = field(default=1, metadata=bounds(1, 16))  # 1 = greedy decoding, more = beam search
    whisper_previous_text: bool = False  # Whisper is told the user's earlier turns (its previous-text prompt)


@dataclass(frozen=True)
class OpenAIConfig:
    """Backend `openai`: an OpenAI-compatible chat server (vLLM) answers; see assistant/backends/openai_chat.py."""

    base_urls: tuple[str, ...] = ()
    model: str = ""
    api_key: str = ""
    audio_input: Literal["transcript", "audio"] = "transcript"
    connect_timeout_s: float = field(default=5.0, metadata=bounds(0.1, 600))
    read_timeout_s: float = field(default=60.0, metadata=bounds(0.1, 3600))
    response_timeout_s: float = field(default=300.0, metadata=bounds(1, 86400))
    health_interval_s: float = field(default=5.0, metadata=bounds(0.1, 3600))
    sampling_extensions: bool = True


@dataclass(frozen=True)
class GenerationConfig:
    greedy: bool = False
    # 0 = greedy: measured better for short spoken answers (issue 20, README "Answer quality"); a session's
    # `temperature` above 0 still samples, with top_p and top_k
    temperature: float = field(default=0.0, metadata=bounds(0.0, 10.0))
    top_p: float = field(default=0.8, metadata=bounds(0.0, 1.0))
    top_k: int = field(default=20, metadata=bounds(0, None))
    repetition_penalty: float = field(default=1.05, metadata=bounds(0.5, 5.0))
    max_new_tokens: int = field(default=256, metadata=bounds(1, 32767))
    seed: int = -1


@dataclass(frozen=True)
class EngineConfig:
    max_active: int = field(default=8, metadata=bounds(1, None))
    max_queued: int = field(default=32, metadata=bounds(0, None))
    max_window_tokens: int = field(default=0, metadata=bounds(0, None))
    cache_budget_tokens: int = field(default=65536, metadata=bounds(0, None))
    delta_queue_size: int = field(default=256, metadata=bounds(1, None))
    max_turn_tokens: int = field(default=1024, metadata=bounds(16, None))
    threads: int = field(default=0, metadata=bounds(0, 1024))  # 0 = automatic, see `Config.engine_threads`
    speculative_prefill: bool = True


@dataclass(frozen=True)
class MqttConfig:
    url: str = ""
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    topic_prefix: str = "assistant"
    client_id: str = ""
    reconnect_max_s: float = field(default=30.0, metadata=bounds(0.1, None))
    max_devices: int = field(default=32, metadata=bounds(1, None))
    device_idle_timeout_s: float = field(default=600.0, metadata=bounds(1, None))
    wake_word: str = ""  # the device sessions' wake word ("" = off); follow_up_ms from [wake_word]


@dataclass(frozen=True)
class WyomingConfig:
    uri: str = ""
    max_connections: int = field(default=16, metadata=bounds(1, None))
    idle_timeout_s: float = field(default=60.0, metadata=bounds(1, None))
    max_conversations: int = field(default=64, metadata=bounds(1, None))
    conversation_idle_s: float = field(default=300.0, metadata=bounds(1, None))


@dataclass(frozen=True)
class VoiceConfig:
    name: str = "joe"
    speed: float = field(default=1.0, metadata=bounds(MIN_SPEED, MAX_SPEED))
    output_rate_hz: int = field(default=24000, metadata=bounds(MIN_RATE_HZ, MAX_RATE_HZ))
    threads: int = field(default=1, metadata=bounds(1, 64))
    max_concurrent: int = field(default=1, metadata=bounds(1, 64))
    first_clause_chars: int = field(default=0, metadata=bounds(0, MAX_FIRST_CLAUSE_CHARS))
    seed: int = field(default=-1, metadata=bounds(-1, 2**31 - 1))

    def params(self) -> VoiceParams:
        return VoiceParams(name=self.name, threads=self.threads, max_concurrent=self.max_concurrent, seed=self.seed)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    model: ModelConfig = ModelConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    openai: OpenAIConfig = OpenAIConfig()
    generation: GenerationConfig = GenerationConfig()
    engine: EngineConfig = EngineConfig()
    vad: TurnDetection = TurnDetection()
    wake_word: WakeWordSettings = WakeWordSettings()
    mqtt: MqttConfig = MqttConfig()
    wyoming: WyomingConfig = WyomingConfig()
    voice: VoiceConfig = VoiceConfig()
    logging: LoggingConfig = LoggingConfig()

    def engine_threads(self, speaking: bool) -> int:
        """The engine's torch threads: `[engine] threads`, else every core, less the voice's onnxruntime threads when
        answers are spoken and that still leaves the engine `ENGINE_MIN_CORE_SHARE` of the cores.

        The voice synthesises in bursts (a clause in a fraction of its speaking time) while the engine works through
        every turn (the recogniser's 30 s window, prefill, decode). On a quiet 2-core machine the engine on both
        cores beside the voice's thread gave the first answer audio 0.76x as late as on one core (p50, one session;
        0.60x with four at once; bench/results/voice_latency-20261203-quiet-threads.json): a core set aside for
        the voice idles most of the time. On a machine whose cores other work keeps busy, a torch thread team larger
        than the free cores stalls at every step (voice_latency-20261203-budget-four.json): set `[engine] threads`."""
        if self.engine.threads:
            return self.engine.threads
        cores = os.cpu_count() or 1
        rest = cores - (self.voice.threads if speaking else 0)
        return rest if rest >= ENGINE_MIN_CORE_SHARE * cores else cores

    def replace(self, **overrides: Any) -> Config:
        """Dotted overrides, e.g. `cfg.replace(**{"server.port": 0})`; validated like file values, and the result
        passes the same checks across keys as a loaded file (so no `Config` with a bad `mqtt.url` ever exists)."""
        cfg = _merge(self, _unflatten(overrides), where="override")
        _check(cfg)
        return cfg


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _merge(base: Any, overlay: dict[str, Any], where: str, prefix: str = "") -> Any:
    if not isinstance(overlay, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a table, got {overlay!r}")
    hints = typing.get_type_hints(type(base))
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for name, value in overlay.items():
        key = prefix + name
        if name not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown config key '{key}'; allowed keys here: {allowed}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            changes[name] = _merge(getattr(base, name), value, where, key + ".")
        else:
            try:
                changes[name] = coerce_type(key, tp, value, dict(fields[name].metadata))
            except SettingError as e:
                raise ConfigError(f"config key {e}") from None
    try:
        return dataclasses.replace(base, **changes)
    except SettingError as e:  # a check across fields, in the section's __post_init__
        raise ConfigError(f"{where}: config key {e}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults from `config/default.toml`, then the user file `path`, then dotted `overrides` (CLI flags)."""
    cfg = Config()
    files = [DEFAULT_CONFIG_PATH]
    if path is not None:
        files.append(Path(path))
    for f in files:
        try:
            data = tomllib.loads(Path(f).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {f} does not exist; pass an existing TOML file to --config") from None
        except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer of thousands of digits
            raise ConfigError(f"config file {f} is not valid TOML: {e}") from None
        cfg = _merge(cfg, data, where=str(f))
    cfg = cfg.replace(**{k: v for k, v in (overrides or {}).items() if v is not None})  # also runs the checks
    return cfg


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_mqtt_url(url: str, cfg_tls: bool = False) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:1883]` or `mqtts://host[:8883]` (TLS also when `mqtt.tls` is true)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"config key 'mqtt.url': expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
    tls = parts.scheme == "mqtts" or cfg_tls
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_wyoming_uri(uri: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` (port 0 = any free port) -> (host, port)."""
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number or out of range, a malformed IPv6 address
        host = port = None
    if not uri.startswith("tcp://") or not host or port is None or parts.path not in ("", "/"):
        raise ValueError(f"config key 'wyoming.uri': expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:10700), got {uri!r}")
    return host, port


def _check(cfg: Config) -> None:
    if cfg.model.backend == "qwen-audio" and not cfg.model.path:
        raise ConfigError("config key 'model.path': the qwen-audio backend needs a checkpoint directory, got ''")
    if cfg.model.backend == "openai":
        _check_openai(cfg.openai)
    if cfg.mqtt.url:
        try:
            parse_mqtt_url(cfg.mqtt.url, cfg.mqtt.tls)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.wyoming.uri:
        try:
            parse_wyoming_uri(cfg.wyoming.uri)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.voice.name and cfg.voice.name not in VOICE_PACKAGES:
        raise ConfigError(
            f"config key 'voice.name': expected one of {sorted(VOICE_PACKAGES)} or \"\" (text only), "
            f"got {cfg.voice.name!r}"
        )
    try:
        check_wake_word_name("mqtt.wake_word", cfg.mqtt.wake_word, allow_off=True)
    except SettingError as e:
        raise ConfigError(f"config key {e}") from None
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("config keys 'server.tls_cert' and 'server.tls_key' must be set together (or both empty)")


def _check_openai(o: OpenAIConfig) -> None:
    if not o.base_urls or not o.model:
        raise ConfigError(
            "config keys 'openai.base_urls' and 'openai.model': the openai backend needs at least one server URL "
            f'(e.g. ["http://127.0.0.1:8000/v1"]) and the model name it serves, got {list(o.base_urls)} and {o.model!r}'
        )
    for url in o.base_urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                f"config key 'openai.base_urls': expected http(s)://HOST[:PORT][/PATH] (the API root, e.g. "
                f"http://127.0.0.1:8000/v1), got {url!r}"
            )
    if len(set(o.base_urls)) != len(o.base_urls):
        raise ConfigError(f"config key 'openai.base_urls': each server once, got {list(o.base_urls)}")
