"""The MQTT transport: smart-speaker devices talk to the assistant through a broker, one session per device id.

`serve()` runs `run_mqtt_bridge(cfg, hub, stop_event)` when `mqtt.url` is set. Topics (prefix
`mqtt.topic_prefix`, default `assistant`), the same JSON events as the WebSocket (DESIGN.md):

    <prefix>/<device_id>/audio     device -> bridge   raw PCM16 LE mono, 16 kHz unless the device's session.update
                                                      says otherwise
    <prefix>/<device_id>/control   device -> bridge   JSON client events (session.update, commit, response.create...)
    <prefix>/<device_id>/events    bridge -> device   JSON server events, QoS 1
    <prefix>/bridge/status         bridge             "online" / "offline", retained; "offline" is also the last will

The protocol work is done by the session core through `assistant.transport.connection` (the same as for the
WebSocket); the hub owns the device sessions (capacity, idle timeout, shutdown). This module owns only the transport:
the broker connection (username/password/TLS from `cfg.mqtt`), reconnecting with exponential backoff, keeping
device sessions alive across broker outages (conversations resume) and saying in the log what an outage lost, and
the outgoing event queue. A device's session is a realtime session at the model's rate (`MODEL_RATE_HZ`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections import Counter as CountBy
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiomqtt
from prometheus_client import Counter, Gauge

from assistant.audio import MODEL_RATE_HZ
from assistant.config import Config, parse_mqtt_url
from assistant.transport.connection import Connection
from assistant.transport.hub import SessionHub, SessionLimitReached

log = logging.getLogger("assistant.mqtt")

AUDIO_QOS = 0  # live audio: a chunk redelivered late is worth nothing
CONTROL_QOS = 1  # client events must arrive
EVENTS_QOS = 1  # server events must arrive (at least once)
MQTT_OP_TIMEOUT_S = 10.0  # one subscribe/publish round trip to the broker
BUSY_REPLY_INTERVAL_S = 5.0  # a refused device gets one server_busy error per interval, not one per audio chunk
# Device messages waiting for the receive loop (~3 min of one device's 20 ms audio chunks). When full, aiomqtt
# discards the NEWEST message and logs "Message queue is full" under assistant.mqtt.client.
MAX_QUEUED_INCOMING = 10000

CONNECTED = Gauge("assistant_mqtt_connected", "1 while the MQTT bridge is connected to its broker")
RECONNECTS = Counter("assistant_mqtt_reconnects_total", "Broker connections lost and re-established")
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
        return f"{self.prefix}/{device_id}/events"

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
    """Server events waiting to be published, oldest first, across all devices.

    Bounded: when full the OLDEST event is dropped (a device that is far behind loses old text, not the newest) and
    the drop is counted per device for the log. Filled by session callbacks (never blocks), drained by the publisher
    only while connected, so events produced during a broker outage wait here and are delivered after reconnecting."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[str, bytes]] = deque()
        self._ready = asyncio.Event()
        self.dropped: CountBy[str] = CountBy()

    def put(self, device_id: str, payload: bytes) -> None:
        if len(self._items) >= self.capacity:
            lost_device, _ = self._items.popleft()
            self.dropped[lost_device] += 1
            DROPPED_EVENTS.inc()
        self._items.append((device_id, payload))
        self._ready.set()

    def requeue_front(self, item: tuple[str, bytes]) -> None:
        """An event whose publish did not complete goes back first (QoS 1 is at-least-once anyway)."""
        self._items.appendleft(item)
        self._ready.set()

    async def get(self) -> tuple[str, bytes]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


_TURN_ENDS = ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "input_audio_buffer.cleared")


@dataclass
class Device:
    """One device's session and what the bridge knows about its conversation (for outage reports)."""

    device_id: str
    conn: Connection
    in_speech: bool = False  # VAD heard speech start, the turn is not committed yet
    active_responses: int = 0
    messages_in: int = 0

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
        elif kind == "response.created":
            self.active_responses += 1
        elif kind == "response.done":
            self.active_responses = max(0, self.active_responses - 1)


class MqttBridge:
    def __init__(self, cfg: Config, hub: SessionHub, stop_event: asyncio.Event) -> None:
        self.cfg = cfg
        self.hub = hub
        self.stop_event = stop_event
        self.broker = parse_mqtt_url(cfg.mqtt.url, cfg.mqtt.tls)
        self.topics = Topics(cfg.mqtt.topic_prefix)
        # A configured client id gets a persistent broker session (the broker keeps our subscriptions and queues
        # QoS 1 control messages while we are away); a generated one is fresh per process, so a clean session.
        self.client_id = cfg.mqtt.client_id or f"assistant-bridge-{uuid.uuid4().hex[:8]}"
        self.persistent = bool(cfg.mqtt.client_id)
        self.devices: dict[str, Device] = {}
        self.outbox = Outbox(cfg.server.send_queue_events * cfg.mqtt.max_devices)
        self._refused_at_s: dict[str, float] = {}
        self._ever_connected = False
        self._lost_at_s: float | None = None  # when the broker connection went away
        self._snapshot: dict[str, tuple[bool, int]] = {}  # device -> (in_speech, active_responses) at that moment

    # ---- connection loop -------------------------------------------------------------------------------------
    async def run(self) -> None:
        max_s = self.cfg.mqtt.reconnect_max_s
        delay_s = initial_s = min(0.5, max_s)
        try:
            while not self.stop_event.is_set():
                try:
                    async with self._client() as client:
                        await self._on_connected(client)
                        delay_s = initial_s
                        await self._serve(client)
                        await client.publish(self.topics.status, b"offline", qos=1, retain=True)
                        log.info("MQTT bridge stopped; published 'offline' on %s", self.topics.status)
                        return
                except aiomqtt.MqttError as e:
                    CONNECTED.set(0)
                    self._on_lost(e)
                log.info("reconnecting to the MQTT broker in %.1f s", delay_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=delay_s)
                delay_s = min(max_s, delay_s * 2)
        finally:
            CONNECTED.set(0)
            await self._close_all()

    def _client(self) -> aiomqtt.Client:
        m = self.cfg.mqtt
        tls_context = None
        if self.broker.tls:
            tls_context = ssl.create_default_context(cafile=m.ca_file or None)
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=m.username or self.broker.username,
            password=m.password or self.broker.password,
            identifier=self.client_id,
            clean_session=not self.persistent,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            tls_context=tls_context,
            timeout=MQTT_OP_TIMEOUT_S,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
            logger=logging.getLogger("assistant.mqtt.client"),
        )

    async def _on_connected(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.subscriptions)
        await client.publish(self.topics.status, b"online", qos=1, retain=True)
        CONNECTED.set(1)
        where = f"{self.broker.host}:{self.broker.port}"
        self._ever_connected = True
        if self._lost_at_s is None:
            log.info(
                "MQTT bridge online at %s (client id %s, topics %s/+/...)", where, self.client_id, self.topics.prefix
            )
            return
        RECONNECTS.inc()
        outage_s = time.monotonic() - self._lost_at_s
        log.warning(
            "MQTT broker %s back after %.1f s; resuming %d device session(s) %s; %d queued event(s) to deliver",
            where,
            outage_s,
            len(self.devices),
            sorted(self.devices) or "",
            len(self.outbox),
        )
        self._report_losses(outage_s)
        self._lost_at_s = None

    def _on_lost(self, error: Exception) -> None:
        if not self._ever_connected:
            log.warning("cannot reach the MQTT broker %s:%d (%s)", self.broker.host, self.broker.port, error)
            return
        if self._lost_at_s is None:
            self._lost_at_s = time.monotonic()
            self._snapshot = {d.device_id: (d.in_speech, d.active_responses) for d in self.devices.values()}
            log.warning(
                "MQTT broker %s:%d unavailable (%s); device sessions are kept and events queued meanwhile",
                self.broker.host,
                self.broker.port,
                error,
            )
        else:
            log.info("MQTT broker still unavailable: %s", error)

    def _report_losses(self, outage_s: float) -> None:
        """Say what the outage cost: audio never received, cut utterances, events dropped from the outbox."""
        if self.devices:
            log.warning(
                "lost: any audio and control events devices published during the %.1f s outage (the broker was "
                "unreachable; devices must send them again)",
                outage_s,
            )
        for device_id, (in_speech, _) in sorted(self._snapshot.items()):
            if in_speech:
                log.warning("lost: device %s was speaking when the broker went away; that turn is cut", device_id)
        for device_id, n in sorted(self.outbox.dropped.items()):
            log.warning("lost: %d server event(s) for device %s (outbox full while disconnected)", n, device_id)
        self.outbox.dropped.clear()
        self._snapshot = {}

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Receive, publish and watch for stop together; the first to finish cancels the others."""
        tasks = [
            asyncio.create_task(self._receive(client), name="mqtt-receive"),
            asyncio.create_task(self._publish(client), name="mqtt-publish"),
            asyncio.create_task(self.stop_event.wait(), name="mqtt-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for t in done:
            t.result()  # MqttError -> reconnect
        if tasks[2] not in done:
            raise aiomqtt.MqttError("the broker connection ended")

    # ---- device -> bridge ------------------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            route = self.topics.parse(message.topic.value)
            if route is None:
                continue
            device_id, kind = route
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            device = await self._device(device_id)
            if device is None:
                continue
            device.messages_in += 1
            if kind == "audio":
                device.conn.receive_audio(bytes(payload))
            else:
                device.conn.receive_text(bytes(payload))

    async def _device(self, device_id: str) -> Device | None:
        device = self.devices.get(device_id)
        if device is not None and not device.conn.closed:
            return device
        outbox = self.outbox

        def send(event: dict[str, Any]) -> None:  # called by the session on the event loop; must not block
            d = self.devices.get(device_id)
            if d is not None:
                d.observe(event)
            outbox.put(device_id, json.dumps(event).encode())

        async def close(code: int, reason: str) -> None:  # the hub ends the device's session (idle, shutdown)
            self.devices.pop(device_id, None)
            log.info("device %s: session closed (%s)", device_id, reason)

        try:
            conn = self.hub.open("mqtt", send, close, dialect="ga", input_rate_hz=MODEL_RATE_HZ)
        except SessionLimitReached as e:
            now_s = time.monotonic()
            if now_s - self._refused_at_s.get(device_id, -BUSY_REPLY_INTERVAL_S) >= BUSY_REPLY_INTERVAL_S:
                self._refused_at_s[device_id] = now_s
                log.warning("device %s refused: %s", device_id, e)
                outbox.put(device_id, json.dumps(self.hub.busy_error("ga", str(e))).encode())
            return None
        self._refused_at_s.pop(device_id, None)
        device = Device(device_id, conn)
        self.devices[device_id] = device
        await conn.start()
        log.info("device %s: session %s opened", device_id, conn.id)
        return device

    # ---- bridge -> device ------------------------------------------------------------------------------------
    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            item = await self.outbox.get()
            device_id, payload = item
            try:
                await client.publish(self.topics.events(device_id), payload, qos=EVENTS_QOS)
            except BaseException:  # MqttError or cancellation mid-publish: deliver it after reconnecting
                self.outbox.requeue_front(item)
                raise

    # ---- housekeeping ----------------------------------------------------------------------------------------
    async def _close_all(self) -> None:
        devices, self.devices = list(self.devices.values()), {}
        await asyncio.gather(*(d.conn.close() for d in devices), return_exceptions=True)


async def run_mqtt_bridge(cfg: Config, hub: SessionHub, stop_event: asyncio.Event) -> None:
    """Run the bridge until `stop_event` is set (then publish 'offline' and close the device sessions)."""
    try:
        bridge = MqttBridge(cfg, hub, stop_event)
    except ValueError as e:  # a bad mqtt.url: the server keeps serving WebSocket clients, the log says why
        log.error("MQTT bridge not started: %s", e)
        return
    await bridge.run()
