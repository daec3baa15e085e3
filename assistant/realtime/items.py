"""The conversation items of one session that a client may still ask about (`conversation.item.retrieve`) or cut to
what was heard (`conversation.item.truncate`). Pure bookkeeping, no I/O.

The store is bounded (`limit` newest items; older ones are forgotten, as the model's history window forgets old
turns anyway) and cleared by `conversation.reset`. User items keep the content part they were announced with (the
transcript filled in once known); assistant items keep their text or, for spoken answers, the transcript and the
audio length of each clause, so `audio_end_ms` maps to the words heard (`speech_text.heard_text`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from assistant.audio.speech_text import heard_text
from assistant.realtime.protocol import ItemTruncate, ProtocolError
from assistant.schema import shown

if TYPE_CHECKING:
    from assistant.engine.api import ResponseDone
    from assistant.realtime.events import EventFactory
    from assistant.realtime.speech_out import SpeechOut


@dataclass
class Item:
    id: str
    role: str  # "user" | "assistant"
    status: str  # "in_progress" | "completed" | "incomplete"
    part: dict[str, Any] | None = None  # user: the content part
    text: str = ""  # assistant: the answer text, or the transcript of what was spoken
    audio: bool = False  # assistant: a spoken answer
    response_id: str | None = None
    pieces: list[tuple[str, int]] = field(default_factory=list)  # spoken: (clause text as streamed, audio ms)
    audio_ms: int = 0  # spoken: audio length (after any truncation)
    shape: dict[str, Any] | None = None  # a function_call / function_call_output item: shown as it is

    def truncate(self, audio_end_ms: int) -> bool:
        """Keep what `audio_end_ms` of the audio said; True when the text changed. Past the end: nothing is cut."""
        end_ms = min(audio_end_ms, self.audio_ms)
        text = heard_text(self.pieces, end_ms) if end_ms < self.audio_ms else self.text
        changed = text != self.text
        self.text, self.audio_ms = text, end_ms
        return changed


class Items:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Item] = OrderedDict()

    def add(self, item: Item) -> None:
        self._items[item.id] = item
        self._items.move_to_end(item.id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def newest(self) -> str | None:
        return next(reversed(self._items), None)

    def remove(self, item_id: str) -> None:
        self._items.pop(item_id, None)

    def clear(self) -> None:
        self._items.clear()

    def finish(self, item_id: str, done: ResponseDone, speech: SpeechOut | None) -> None:
        """An answer ended: its item holds the text, or what was spoken and each clause's audio length."""
        item = self._items.get(item_id)
        if item is None:
            return
        item.status = "completed" if done.status == "completed" else "incomplete"
        if speech is None:
            item.text = done.text
        else:
            heard_ms = speech.audio_ms if speech.heard_ms is None else min(speech.heard_ms, speech.audio_ms)
            item.text, item.pieces, item.audio_ms = speech.transcript(), speech.pieces(), heard_ms

    def known(self, item_id: str, event_id: str | None) -> Item:
        item = self._items.get(item_id)
        if item is None:
            msg = (
                f"no item {shown(item_id)} in this session (it keeps its newest {self.limit} items; conversation.reset "
                "forgets all)"
            )
            raise ProtocolError("item_not_found", msg, "item_id", event_id)
        return item

    def truncatable(self, ev: ItemTruncate) -> Item:
        """The spoken answer `conversation.item.truncate` names, or the ProtocolError saying why it cannot be cut."""
        item = self.known(ev.item_id, ev.event_id)
        if item.role != "assistant" or not item.audio:
            what = "a user item" if item.role == "user" else "a text answer"
            msg = f"item {item.id} is {what}: only spoken answers (audio) can be truncated"
            raise ProtocolError("item_not_truncatable", msg, "item_id", ev.event_id)
        if ev.content_index != 0:
            msg = f"content_index must be 0 (a spoken answer has one audio part), got {ev.content_index}"
            raise ProtocolError("invalid_event", msg, "content_index", ev.event_id)
        return item

    def render(self, item_id: str, event_id: str | None, events: EventFactory) -> dict[str, Any]:
        """The item as `conversation.item.retrieved` shows it (spoken answers: the transcript, not the audio)."""
        item = self.known(item_id, event_id)
        if item.shape is not None:
            return dict(item.shape)
        if item.role == "user":
            content = [dict(item.part or {})]
        elif item.status == "in_progress":
            content = []
        else:
            content = [events.part(item.text, item.audio, in_item=True)]
        return events.message_item(item.id, item.role, item.status, content)
