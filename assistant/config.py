"""Configuration: frozen dataclasses loaded from one TOML file.

`config/default.toml` documents every key; a user file given with `--config` overlays it key by key. Loading is
strict: an unknown key or a value of the wrong type or outside its allowed set fails at start, naming the key, what
was expected and what came. Nothing here reads argv or the environment at import time.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "default.toml"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata=_range(0, 65535))
    token: str = ""
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = field(default=32, metadata=_range(1, None))
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata=_range(1024, None))
    idle_timeout_s: float = field(default=600.0, metadata=_range(1, None))
    send_queue_events: int = field(default=1024, metadata=_range(16, None))
    tls_cert: str = ""
    tls_key: str = ""
    shutdown_grace_s: float = field(default=5.0, metadata=_range(0, None))


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
    whisper: Literal["base", "small"] = "base"
    cache_dir: str = ""
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short sentences, "
        "in the language the user speaks. Do not use lists or markdown."
    )


@dataclass(frozen=True)
class GenerationConfig:
    greedy: bool = False
    temperature: float = field(default=0.7, metadata=_range(0.0, 10.0))
    top_p: float = field(default=0.8, metadata=_range(0.0, 1.0))
    top_k: int = field(default=20, metadata=_range(0, None))
    repetition_penalty: float = field(default=1.05, metadata=_range(0.5, 5.0))
    max_new_tokens: int = field(default=256, metadata=_range(1, 32767))
    seed: int = -1


@dataclass(frozen=True)
class EngineConfig:
    max_active: int = field(default=8, metadata=_range(1, None))
    max_queued: int = field(default=32, metadata=_range(0, None))
    max_window_tokens: int = field(default=0, metadata=_range(0, None))
    cache_budget_tokens: int = field(default=65536, metadata=_range(0, None))
    delta_queue_size: int = field(default=256, metadata=_range(1, None))


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = field(default=2, metadata=_range(0, 3))
    frame_ms: Literal[10, 20, 30] = 30
    prefix_padding_ms: int = field(default=300, metadata=_range(0, 2000))
    silence_duration_ms: int = field(default=600, metadata=_range(100, 5000))
    min_speech_ms: int = field(default=250, metadata=_range(0, 5000))
    max_utterance_ms: int = field(default=30000, metadata=_range(1000, 30000))
    early_prepare_ms: int = field(default=200, metadata=_range(0, 5000))


@dataclass(frozen=True)
class MqttConfig:
    url: str = ""
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    topic_prefix: str = "assistant"
    client_id: str = ""
    reconnect_max_s: float = field(default=30.0, metadata=_range(0.1, None))


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
    vad: VadConfig = VadConfig()
    mqtt: MqttConfig = MqttConfig()
    logging: LoggingConfig = LoggingConfig()

    def replace(self, **overrides: Any) -> Config:
        """Dotted overrides, e.g. `cfg.replace(**{"server.port": 0})`; validated like file values."""
        return _merge(self, _unflatten(overrides), where="override")


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_describe_type(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != isinstance(typing.get_args(tp)[0], bool):
            raise bad
        return value
    if origin is tuple:
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple) or not all(isinstance(v, item_tp) for v in value):
            raise bad
        return tuple(value)
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unsupported config type for {key}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad
    lo, hi = meta.get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"config key '{key}': expected a value in [{lo_s}, {hi_s}], got {value!r}")
    return value


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
            changes[name] = _coerce(key, tp, value, dict(fields[name].metadata))
    return dataclasses.replace(base, **changes)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults from `config/default.toml`, then the user file `path`, then dotted `overrides` (CLI flags)."""
    cfg = Config()
    files = [DEFAULT_CONFIG_PATH] if DEFAULT_CONFIG_PATH.exists() else []
    if path is not None:
        files.append(Path(path))
    for f in files:
        try:
            data = tomllib.loads(Path(f).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {f} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {f} is not valid TOML: {e}") from None
        cfg = _merge(cfg, data, where=str(f))
    if overrides:
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.model.backend == "qwen-audio" and not cfg.model.path:
        raise ConfigError("config key 'model.path': the qwen-audio backend needs a checkpoint directory, got ''")
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("config keys 'server.tls_cert' and 'server.tls_key' must be set together (or both empty)")
