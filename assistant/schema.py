"""Typed settings fields: one way to declare a setting's type and range, and one checker for every source.

Owns the rules by which a raw value (from TOML, a client's `session.update`, an MQTT control message) becomes a
field of a frozen dataclass: the type from the annotation (`int`, `float`, `bool`, `str`, `Literal[...]`, tuples,
`X | None`), the range from the field's metadata (`field(default=..., metadata=bounds(lo, hi))`), and finite
numbers only (NaN and infinity are refused everywhere). `assistant.config` (the TOML file),
`assistant.realtime.settings` (`session.update`, both dialects) and `assistant.audio.vad.VadParams` all declare
their fields this way, so a setting's allowed values are written once, where the setting is defined.

    value = coerce("vad.frame_ms", VadParams, "frame_ms", 20)        # -> 20, or raises SettingError
    check_fields(params)                                               # every field of a built dataclass
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal


class SettingError(ValueError):
    """A value does not fit its field: `key` names the setting; the message says what was expected and what came."""

    def __init__(self, key: str, expected: str, got: str) -> None:
        super().__init__(f"'{key}': expected {expected}, got {got}")
        self.key, self.expected, self.got = key, expected, got


def bounds(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """Field metadata: the inclusive range of a number (None = open on that side)."""
    return {"range": (lo, hi)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(key: str, cls: type, name: str, value: Any) -> Any:
    """`value` as field `name` of dataclass `cls`; `key` is how the caller names the setting in its errors."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    return coerce_type(key, _hints(cls)[name], value, dict(f.metadata))


def shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def coerce_type(key: str, tp: Any, value: Any, meta: dict[str, Any] | None = None) -> Any:
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_type(key, inner[0], value, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise SettingError(key, f"a {tp.__name__}", shown(value))
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise SettingError(key, "one of " + ", ".join(map(repr, allowed)), shown(value))
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise SettingError(key, f"a list of {item_tp.__name__}", shown(value))
        return tuple(coerce_type(key, item_tp, v) for v in value)
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise SettingError(key, tp.__name__, shown(value))
        return value
    if tp in (int, float):
        return _number(key, tp, value, meta.get("range"))
    raise TypeError(f"{key}: settings of type {tp!r} are not supported by assistant.schema")


def _number(key: str, tp: type, value: Any, rng: tuple[float | None, float | None] | None) -> int | float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and tp is int and isinstance(value, float):
        # JSON clients may write 300.0 for 300; a fraction is refused, never rounded.
        ok = value.is_integer()
        value = int(value) if ok else value
    if not ok:
        raise SettingError(key, tp.__name__, shown(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(key, "a finite number", shown(value))
    lo, hi = rng or (None, None)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        where = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise SettingError(key, f"a value in {where}", shown(value))
    try:
        return tp(value)
    except OverflowError:  # an enormous integer for a float field without an upper bound
        raise SettingError(key, "a finite number", shown(value)) from None


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a built dataclass against its declaration (call it in `__post_init__`)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            coerce_type(prefix + f.name, tp, getattr(obj, f.name), dict(f.metadata))
