"""Reading Wyoming events with bounds (the transport's input side; `wyoming.py` writes with the package's writer).

The `wyoming` package's reader ends the connection on a malformed header and reads any declared length into memory.
`read_event` instead raises `BadMessage` (a code of the error tables, and whether the connection can go on) for a
header that is not a JSON object, lengths that are not counts, or a message over the byte limit; a message declared
over `HARD_SIZE_FACTOR` x the limit is fatal (as WebSocket's 1009), smaller oversized ones are read past in pieces.
`field(event, name, type)` checks one field of an event's data (`WyomingError` `invalid_event` otherwise).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

from assistant.transport.websocket import HARD_SIZE_FACTOR
from assistant.transport.wyoming_services import WyomingError

DISCARD_CHUNK_BYTES = 1 << 16


class BadMessage(Exception):
    def __init__(self, code: str, text: str, fatal: bool = False) -> None:
        super().__init__(text)
        self.code, self.text, self.fatal = code, text, fatal


def _length(header: dict[str, Any], key: str) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadMessage("invalid_event", f"'{key}' must be a non-negative integer, got {value!r}", fatal=True)
    return value


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event (None at EOF), or BadMessage. `reader`'s limit must be `max_bytes` (the header line's bound)."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        line = e.partial
    except asyncio.LimitOverrunError:
        while True:  # drop the over-long header up to its newline
            try:
                await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as e:
                await reader.readexactly(e.consumed)
        raise BadMessage("message_too_large", f"header line over server.max_message_bytes={max_bytes}") from None
    try:
        header = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise BadMessage("invalid_json", f"expected a JSON header line, could not parse it: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadMessage("invalid_event", "expected a JSON object with a string 'type' as the header line")
    data_len, payload_len = _length(header, "data_length"), _length(header, "payload_length")
    size = len(line) + data_len + payload_len
    if size > max_bytes:
        fatal = size > max_bytes * HARD_SIZE_FACTOR
        left = 0 if fatal else data_len + payload_len
        while left:  # dropped piece by piece: never held whole
            left -= len(await reader.readexactly(min(left, DISCARD_CHUNK_BYTES)))
        msg = f"{header['type']} of {size} bytes exceeds server.max_message_bytes={max_bytes}; send smaller chunks"
        raise BadMessage("message_too_large", msg, fatal)
    data = header.get("data") or {}
    extra = await reader.readexactly(data_len) if data_len else b""
    payload = await reader.readexactly(payload_len) if payload_len else None
    if extra:
        try:
            more = json.loads(extra)
        except (ValueError, RecursionError) as e:
            raise BadMessage("invalid_json", f"{header['type']}: its data is not JSON: {e}") from None
        if not isinstance(more, dict) or not isinstance(data, dict):
            raise BadMessage("invalid_event", f"{header['type']}: 'data' must be a JSON object")
        data = {**data, **more}
    if not isinstance(data, dict):
        raise BadMessage("invalid_event", f"{header['type']}: 'data' must be a JSON object, got {data!r}")
    return Event(type=header["type"], data=data, payload=payload)


def field(ev: Event, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = ev.data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise WyomingError("invalid_event", f"{ev.type}: '{name}' must be a {want}, got {value!r}")
    return value
