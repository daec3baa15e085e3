"""Configuration: frozen dataclasses loaded from one TOML file.

`assistant/default.toml` (installed with the package; `config/default.toml` in the checkout points to it) documents
every key; a user file given with `--config` overlays it key by key. Loading is strict: an unknown key or a value of
the wrong type, outside its range or not finite fails at start, naming the key, what was expected and what came
(`assistant.schema` checks every field by its declaration). The `[vad]` section is the sessions' own
`TurnDetection` (the server-wide default of every session). Nothing here reads argv or the environment at import time.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from assistant.audio.vad import TurnDetection
from assistant.schema import SettingError, bounds, coerce_type

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default.toml"


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
    backend: Literal["embedded", "qwen-audio"] = "embedded"
    path: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    system_prompt: str = ""
    turn_instruction: str = "Answer the speaker's question briefly."


@dataclass(frozen=True)
class EmbeddedConfig:
    whisper: Literal["base", "tiny.en", "small"] = "base"
    cache_dir: str = ""
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short sentences, "
        "in the language the user speaks. Do not use lists or markdown."
    )


@dataclass(frozen=True)
class GenerationConfig:
    greedy: bool = False
    temperature: float = field(default=0.7, metadata=bounds(0.0, 10.0))
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


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    model: ModelConfig = ModelConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    generation: GenerationConfig = GenerationConfig()
    engine: EngineConfig = EngineConfig()
    vad: TurnDetection = TurnDetection()
    mqtt: MqttConfig = MqttConfig()
    logging: LoggingConfig = LoggingConfig()

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


def _check(cfg: Config) -> None:
    if cfg.model.backend == "qwen-audio" and not cfg.model.path:
        raise ConfigError("config key 'model.path': the qwen-audio backend needs a checkpoint directory, got ''")
    if cfg.mqtt.url:
        try:
            parse_mqtt_url(cfg.mqtt.url, cfg.mqtt.tls)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("config keys 'server.tls_cert' and 'server.tls_key' must be set together (or both empty)")
