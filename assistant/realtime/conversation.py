"""Items a client adds to the conversation (`conversation.item.create`): validated against the session's items and
calls, and turned into the turn the engine prepares and the item the events show. Pure code, no I/O.

What a client may create: a user message (`input_text` and/or `input_audio` parts: a typed or spoken turn, answered
on `response.create` like a committed turn) or a `function_call_output` answering a `function_call` this session's
model made (`call_id`; the engine shows the result to the model in the next answer's prompt).

Placement (`previous_item_id`, as OpenAI documents it): absent or null appends; an id must name an item of this
session (else `item_not_found`). The engine's history is a sequence of turns and answers, so only appending is
supported: an id other than the newest item's (or `root` in a conversation that has items) is refused, saying so.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from assistant.audio.resample import StreamResampler
from assistant.backends.base import Utterance
from assistant.backends.tools import ToolOutput
from assistant.engine.api import new_id
from assistant.realtime.items import Items
from assistant.realtime.protocol import ItemCreate, ProtocolError
from assistant.realtime.session_keys import Transcription


@dataclass
class Created:
    """A validated new item: the turn for the engine and how the item is shown."""

    item_id: str
    utterance: Utterance
    item: dict[str, Any]  # the item as conversation.item.added / .created show it
    part: dict[str, Any] | None  # a user message: the content part the item store keeps (transcript filled later)


class Calls:
    """The function calls of this session's answers, by `call_id` (the newest `limit`), so a client's output can be
    matched to the function it answers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: OrderedDict[str, str] = OrderedDict()

    def add(self, call_id: str, name: str) -> None:
        self._names[call_id] = name
        while len(self._names) > self.limit:
            self._names.popitem(last=False)

    def name(self, call_id: str, eid: str | None) -> str:
        if call_id not in self._names:
            known = ", ".join(self._names) or "none yet"
            msg = (
                f"item.call_id {call_id!r} names no function_call of this session (known: {known}); send the call_id "
                "of the function_call item the model made"
            )
            raise ProtocolError("unknown_call_id", msg, "item.call_id", eid)
        return self._names[call_id]

    def clear(self) -> None:
        self._names.clear()


def check_placement(ev: ItemCreate, items: Items) -> None:
    """A new id must be unused, and `previous_item_id` must be the newest item (see the module docstring)."""
    if ev.item_id is not None and items.get(ev.item_id) is not None:
        msg = f"item.id {ev.item_id!r} is already an item of this session: omit item.id or pick a new one"
        raise ProtocolError("invalid_event", msg, "item.id", ev.event_id)
    prev, newest = ev.previous_item_id, items.newest()
    if prev is None or prev == newest or (prev == "root" and newest is None):
        return
    if prev != "root":
        items.known(prev, ev.event_id)  # item_not_found for an id this session lacks
    msg = (
        f"previous_item_id {prev!r} is not the newest item ({newest!r}): this server appends items only; omit "
        "previous_item_id or pass the newest item's id"
    )
    raise ProtocolError("invalid_event", msg, "previous_item_id", ev.event_id)


def spoken(key: str, audio: np.ndarray | None, text: str | None, tr: Transcription | None) -> Utterance:
    """A user turn; its audio (if any) is heard as the session's transcription settings `tr` say (language,
    prompt)."""
    if audio is None or tr is None:
        return Utterance(key=key, audio=audio, text=text)
    return Utterance(key=key, audio=audio, text=text, language=tr.language, prompt=tr.prompt)


def created(ev: ItemCreate, items: Items, calls: Calls, input_rate_hz: int, tr: Transcription | None = None) -> Created:
    """Validate `ev` and build the turn and the item; ProtocolError (nothing added) otherwise. `tr`: the session's
    transcription settings, which its audio is heard with."""
    check_placement(ev, items)
    item_id = ev.item_id or new_id("item")
    if ev.call_id is not None:
        output = ToolOutput(ev.call_id, calls.name(ev.call_id, ev.event_id), ev.output or "")
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call_output",
            "status": "completed",
            "call_id": output.call_id,
            "output": output.output,
        }
        return Created(item_id, Utterance(key=item_id, output=output), item, None)
    parts: list[dict[str, Any]] = []
    audio = None
    if ev.pcm is not None:
        audio = _model_rate(ev.pcm, input_rate_hz)
        parts.append({"type": "input_audio", "transcript": None})
    if ev.text is not None:
        parts.append({"type": "input_text", "text": ev.text})
    item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed"}
    item["content"] = parts
    return Created(item_id, spoken(item_id, audio, ev.text, tr), item, parts[0])


def _model_rate(pcm: bytes, input_rate_hz: int) -> np.ndarray:
    """PCM16 at the session's input rate -> float32 at the models' 16 kHz (values on the int16 grid / 32768)."""
    resampler = StreamResampler(input_rate_hz)
    samples = np.frombuffer(pcm, dtype="<i2")
    out = np.concatenate([resampler.process(samples), resampler.flush()])
    return out.astype(np.float32) / 32768.0
