"""The MQTT transport's bookkeeping, without a broker: topic routing (`Topics`), the outgoing message queue
(`Outbox`), rate-limited refusals of device ids over capacity (`Refusals`), and one device's view of its session
(`Device`: which turn it is in, for outage handling, and where each server event goes: spoken answers leave the
JSON stream as raw PCM on the device's speech topic, announced by `response.output_audio.started`). `mqtt.py` is the
bridge that runs them against the broker.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections import Counter as CountBy
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from assistant.realtime.events import encode_event
from assistant.realtime.protocol import ProtocolError
from assistant.transport.connection import Connection

log = logging.getLogger("assistant.mqtt")

AUDIO_QOS = 0  # live audio: a chunk redelivered late is worth nothing
CONTROL_QOS = 1  # client events must arrive
# Where a message for a device goes: `<prefix>/<device>/<kind>`, and its QoS. Speech is QoS 1 like the events: an
# answer must arrive whole, and in order with the events that announce and end it (one publisher, one QoS).
OUT_QOS = {"events": 1, "speech": 1}
SPEECH_STARTED = "response.output_audio.started"  # extension event: the answer's raw audio follows on speech
AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
DROPPED_EVENTS = Counter("assistant_mqtt_dropped_events_total", "Server events dropped because the outbox was full")


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def status(self) -> str:
        return f"{self.prefix}/bridge/status"

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f"{self.prefix}/+/audio", AUDIO_QOS), (f"{self.prefix}/+/control", CONTROL_QOS)]

    def events(self, device_id: str) -> str:
        return self.out(device_id, "events")

    def out(self, device_id: str, kind: str) -> str:
        """Bridge -> device topics: `events` (JSON server events) and `speech` (raw answer audio)."""
        return f"{self.prefix}/{device_id}/{kind}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """`<prefix>/<device>/<audio|control>` -> (device, kind); None for anything else (e.g. our own status)."""
        head, sep, rest = topic.partition(self.prefix + "/")
        if head or not sep:
            return None
        device_id, _, kind = rest.partition("/")
        if not device_id or device_id == "bridge" or kind not in ("audio", "control"):
            return None
        return device_id, kind


class Outbox:
    """Messages waiting to be published, oldest first, across all devices: (device id, kind, payload), kind being
    the device topic (`events` or `speech`).

    Bounded: when full the OLDEST message is dropped (a device that is far behind loses old text or audio, not the
    newest) and the drop is counted per device for the log. Filled by session callbacks (never blocks), drained by
    the publisher only while connected, so messages produced during a broker outage wait here and are delivered
    after reconnecting."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[str, str, bytes]] = deque()
        self._ready = asyncio.Event()
        self.dropped: CountBy[str] = CountBy()

    def put(self, device_id: str, payload: bytes, kind: str = "events") -> None:
        if len(self._items) >= self.capacity:
            lost_device, _, _ = self._items.popleft()
            self.dropped[lost_device] += 1
            DROPPED_EVENTS.inc()
        self._items.append((device_id, kind, payload))
        self._ready.set()

    def requeue_front(self, item: tuple[str, str, bytes]) -> None:
        """A message whose publish did not complete goes back first (QoS 1 is at-least-once anyway)."""
        self._items.appendleft(item)
        self._ready.set()

    async def get(self) -> tuple[str, str, bytes]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class Refusals:
    """Device ids refused for capacity: whom to send `server_busy` now, and the rate-limited log.

    A refused device gets one `server_busy` per `reply_interval_s` (not one per audio chunk). The log gets one
    warning per `log_interval_s` counting the ids and messages refused since the previous warning (the first refusal
    is logged at once). Memory is bounded by the ids seen within one interval."""

    def __init__(self, reply_interval_s: float, log_interval_s: float) -> None:
        self.reply_interval_s = reply_interval_s
        self.log_interval_s = log_interval_s
        self._replied_at_s: dict[str, float] = {}
        self._logged_at_s = -math.inf
        self._since_s: float | None = None  # the first refusal not yet logged
        self._ids: set[str] = set()
        self._messages = 0

    def refuse(self, device_id: str, reason: str, now_s: float) -> bool:
        """Count one refused message; True when this device should get a `server_busy` reply now."""
        self._ids.add(device_id)
        self._messages += 1
        if self._since_s is None:
            self._since_s = now_s
        if now_s - self._logged_at_s >= self.log_interval_s:
            self._log(reason, now_s)
        reply = now_s - self._replied_at_s.get(device_id, -math.inf) >= self.reply_interval_s
        if reply:
            self._replied_at_s[device_id] = now_s
        return reply

    def admitted(self, device_id: str) -> None:
        self._replied_at_s.pop(device_id, None)

    def _log(self, reason: str, now_s: float) -> None:
        ids = sorted(self._ids)
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        window_s = now_s - (self._since_s if self._since_s is not None else now_s)
        log.warning(
            "refused %d device id(s) (%s), %d message(s) in %.0f s: %s; next summary in %.0f s at the earliest",
            len(ids),
            shown,
            self._messages,
            window_s,
            reason,
            self.log_interval_s,
        )
        self._logged_at_s = now_s
        self._since_s = None
        self._ids.clear()
        self._messages = 0
        stale = [d for d, t in self._replied_at_s.items() if now_s - t >= self.reply_interval_s]
        for d in stale:
            del self._replied_at_s[d]


TURN_INTERRUPTED = (
    "the connection to the assistant was lost while you were speaking (MQTT broker outage or bridge restart); "
    "that turn was dropped, not answered: say it again"
)


@dataclass
class Device:
    """One device's session and what the bridge knows about its conversation (for outage reports)."""

    device_id: str
    conn: Connection
    in_speech: bool = False  # VAD heard speech start, the turn is not committed yet
    ptt_audio: bool = False  # push-to-talk audio received since the last commit/clear
    active_responses: int = 0
    messages_in: int = 0
    # response id -> (format, rate) of its audio, taken from the session when the response starts (what its
    # SpeechOut was made with); item ids whose start was announced on the events topic
    _speech_formats: dict[str, tuple[str, int]] = field(default_factory=dict)
    _speech_started: set[str] = field(default_factory=set)

    @property
    def mid_turn(self) -> bool:
        """The device was in the middle of a turn: losing its audio now would cut the question."""
        return self.in_speech or self.ptt_audio

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.speech_started":
            self.in_speech = True
        elif kind in (
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "input_audio_buffer.cleared",
        ):
            self.in_speech = False
            if kind != "input_audio_buffer.speech_stopped":
                self.ptt_audio = False
        elif kind == "response.created":
            self.active_responses += 1
        elif kind == "response.done":
            self.active_responses = max(0, self.active_responses - 1)

    def outgoing(self, event: dict[str, Any]) -> list[tuple[str, bytes]]:
        """Where a server event goes, as (topic kind, payload): JSON on `events`, except a spoken answer's audio,
        which goes as raw bytes on `speech` (base64 JSON would cost a third more, on every chunk), its first chunk
        announced on `events` by `response.output_audio.started {format, sample_rate}`."""
        kind = event.get("type")
        if kind == "response.created":
            response = event.get("response") or {}
            if "audio" in response.get("output_modalities", ()):
                ao = self.conn.session.settings.audio_out
                self._speech_formats[response.get("id", "")] = (ao.format, ao.rate_hz)
        elif kind in AUDIO_DELTAS:
            out: list[tuple[str, bytes]] = []
            item_id = event.get("item_id", "")
            if item_id not in self._speech_started:
                self._speech_started.add(item_id)
                out.append(("events", encode_event(self._speech_started_event(event)).encode()))
            return [*out, ("speech", base64.b64decode(event.get("delta", "")))]
        elif kind == "response.done":
            response = event.get("response") or {}
            self._speech_formats.pop(response.get("id", ""), None)
            for item in response.get("output") or ():
                self._speech_started.discard(item.get("id", ""))
        return [("events", encode_event(event).encode())]

    def _speech_started_event(self, delta: dict[str, Any]) -> dict[str, Any]:
        ao = self.conn.session.settings.audio_out
        fmt, rate_hz = self._speech_formats.get(delta.get("response_id", ""), (ao.format, ao.rate_hz))
        where = {k: delta.get(k) for k in ("response_id", "item_id", "output_index", "content_index")}
        return self.conn.session.events.event(SPEECH_STARTED, **where, format=fmt, sample_rate=rate_hz)

    def receive(self, kind: str, payload: bytes, max_bytes: int) -> None:
        """One MQTT message of this device into its session."""
        self.messages_in += 1
        if len(payload) > max_bytes:
            self.conn.reject_oversized(len(payload))
        elif kind == "audio":
            self.conn.receive_audio(payload)
            if self.conn.session.settings.turn_detection is None and payload:
                self.ptt_audio = True
        else:
            self.conn.receive_text(payload)

    def drop_open_turn(self) -> dict[str, Any]:
        """`input_audio_buffer.clear` through the core; returns the `turn_interrupted` error event to send."""
        self.conn.receive_event({"type": "input_audio_buffer.clear"})
        self.in_speech = self.ptt_audio = False
        return self.conn.session.events.error(ProtocolError("turn_interrupted", TURN_INTERRUPTED))
