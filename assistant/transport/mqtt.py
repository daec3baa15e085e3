"""The MQTT transport: smart-speaker devices talk to the assistant through a broker, one session per device id.

`serve()` runs `run_mqtt_bridge(cfg, hub, stop_event)` when `mqtt.url` is set. Topics (prefix
`mqtt.topic_prefix`, default `assistant`), the same JSON events as the WebSocket (DESIGN.md):

    <prefix>/<device_id>/audio     device -> bridge   raw PCM16 LE mono, 16 kHz unless the device's session.update
                                                      says otherwise
    <prefix>/<device_id>/control   device -> bridge   JSON client events (session.update, commit, response.create...)
    <prefix>/<device_id>/events    bridge -> device   JSON server events, QoS 1
    <prefix>/<device_id>/speech    bridge -> device   spoken answers: raw audio in the session's output format (PCM16
                                                      mono at its output rate unless the device asked otherwise),
                                                      QoS 1; each answer announced on events by
                                                      `response.output_audio.started {format, sample_rate}`, ended by
                                                      `response.output_audio.done`; never base64 on events
    <prefix>/bridge/status         bridge             "online" / "offline", retained; "offline" is also the last will

The bookkeeping without a broker (topics, outbox, refusals, a device's turn state) is in `mqtt_devices.py`.
The protocol work is done by the session core through `assistant.transport.connection` (the same as for the
WebSocket); the hub owns the device sessions (capacity, idle timeout, shutdown). This module owns only the transport:
the broker connection (username/password/TLS from `cfg.mqtt`), reconnecting with exponential backoff, keeping
device sessions alive across broker outages (conversations resume) and saying in the log what an outage lost, and
the outgoing event queue. A device's session is a realtime session at the model's rate (`MODEL_RATE_HZ`).

Failure behaviour (nothing a device or the broker does takes the bridge down or loses a turn silently):
- Each device message is handled on its own: a malformed control message gets that device an `error` event and
  nothing else; a message over `server.max_message_bytes` (audio or control) is dropped with `message_too_large`.
  An unexpected exception while handling one message is logged and answered with `invalid_event`; other devices
  never notice.
- A refused device id (over `mqtt.max_devices`) gets one `server_busy` per `BUSY_REPLY_INTERVAL_S`; the log has one
  warning per interval counting the refused ids and messages.
- Broker connection lost, or the bridge itself restarting: device sessions are kept and their events queued. A device
  that was in the middle of a turn (server VAD heard speech start, or push-to-talk audio not yet committed) has that
  turn DROPPED, not committed: its session gets `input_audio_buffer.clear` (-> `input_audio_buffer.cleared`) followed
  by an `error` with code `turn_interrupted`, both delivered once the bridge is connected again. The device speaks
  again; a fragment is never answered as if it were the question.
- Any unexpected exception in the bridge's loops: `run_mqtt_bridge` (the supervisor) logs it with the traceback,
  publishes `offline` (retained) while it is down, reports it through the `mqtt` health check (`/healthz` 503), and
  restarts the bridge with exponential backoff (up to `mqtt.reconnect_max_s`); device sessions survive the restart.
  The health check also fails while the broker is unreachable.
- Everything published is strict JSON (`allow_nan=False`; a non-finite number would be sent as null and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
from prometheus_client import Counter, Gauge

from assistant.audio import MODEL_RATE_HZ
from assistant.config import Config, parse_mqtt_url
from assistant.realtime.events import encode_event
from assistant.realtime.protocol import ProtocolError
from assistant.transport.hub import SessionHub, SessionLimitReached
from assistant.transport.mqtt_devices import OUT_QOS, Device, Outbox, Refusals, Topics

log = logging.getLogger("assistant.mqtt")

MQTT_OP_TIMEOUT_S = 10.0  # one subscribe/publish round trip to the broker
BUSY_REPLY_INTERVAL_S = 5.0  # a refused device gets one server_busy error per interval, not one per audio chunk
REFUSAL_LOG_INTERVAL_S = 60.0  # refused device ids: one summary warning per interval
# Device messages waiting for the receive loop (~3 min of one device's 20 ms audio chunks). When full, aiomqtt
# discards the NEWEST message and logs "Message queue is full" under assistant.mqtt.client.
MAX_QUEUED_INCOMING = 10000

CONNECTED = Gauge("assistant_mqtt_connected", "1 while the MQTT bridge is connected to its broker")
RECONNECTS = Counter("assistant_mqtt_reconnects_total", "Broker connections lost and re-established")
RESTARTS = Counter("assistant_mqtt_restarts_total", "Bridge restarts after an unexpected error in its loops")
INTERRUPTED_TURNS = Counter(
    "assistant_mqtt_interrupted_turns_total", "Device turns dropped because the broker connection was lost mid-turn"
)


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
        self.refusals = Refusals(BUSY_REPLY_INTERVAL_S, REFUSAL_LOG_INTERVAL_S)
        self._ever_connected = False
        self._lost_at_s: float | None = None  # when the broker connection went away
        self._snapshot: dict[str, tuple[bool, int]] = {}  # device -> (mid_turn, active_responses) at that moment
        self._down: tuple[str, float] | None = ("not connected to the broker yet", time.monotonic())

    # ---- health ----------------------------------------------------------------------------------------------
    def health(self) -> str | None:
        """None while connected and serving; else what is wrong (the `mqtt` check of /healthz)."""
        if self._down is None:
            return None
        what, since_s = self._down
        return f"MQTT bridge down for {time.monotonic() - since_s:.0f} s: {what}"

    def _set_down(self, what: str) -> None:
        since_s = self._down[1] if self._down is not None else time.monotonic()
        self._down = (what, since_s)

    # ---- supervisor ------------------------------------------------------------------------------------------
    async def supervise(self) -> None:
        """Run the bridge until `stop_event`; an unexpected error restarts it (logged, exponential backoff)."""
        max_s = self.cfg.mqtt.reconnect_max_s
        delay_s = initial_s = min(0.5, max_s)
        try:
            while True:
                started_s = time.monotonic()
                try:
                    await self.run()
                    return
                except Exception as e:
                    RESTARTS.inc()
                    if time.monotonic() - started_s > max_s:  # it ran fine for a while: a fresh backoff
                        delay_s = initial_s
                    self._set_down(f"restarting after an unexpected error: {e!r}")
                    log.exception("MQTT bridge crashed (%r); restarting it in %.1f s", e, delay_s)
                if await self._stopped_within(delay_s):
                    return
                delay_s = min(max_s, delay_s * 2)
        finally:
            CONNECTED.set(0)
            self._set_down("stopped")
            await self._close_all()

    async def _stopped_within(self, delay_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=delay_s)
        return self.stop_event.is_set()

    # ---- connection loop -------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect with backoff until `stop_event`. Any error other than the broker's propagates
        (to `supervise`) after 'offline' is published and open turns are dropped, as for a lost connection."""
        max_s = self.cfg.mqtt.reconnect_max_s
        delay_s = initial_s = min(0.5, max_s)
        while not self.stop_event.is_set():
            try:
                async with self._client() as client:
                    try:
                        await self._on_connected(client)
                        delay_s = initial_s
                        await self._serve(client)
                    except aiomqtt.MqttError:
                        raise
                    except Exception as e:
                        CONNECTED.set(0)
                        self._on_lost(e, crashed=True)
                        with contextlib.suppress(aiomqtt.MqttError):
                            await client.publish(self.topics.status, b"offline", qos=1, retain=True)
                        raise
                    await client.publish(self.topics.status, b"offline", qos=1, retain=True)
                    log.info("MQTT bridge stopped; published 'offline' on %s", self.topics.status)
                    return
            except aiomqtt.MqttError as e:
                CONNECTED.set(0)
                self._on_lost(e)
            log.info("reconnecting to the MQTT broker in %.1f s", delay_s)
            if await self._stopped_within(delay_s):
                return
            delay_s = min(max_s, delay_s * 2)

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
        self._down = None
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
            "MQTT bridge back after %.1f s (connected to %s); resuming %d device session(s) %s; %d queued event(s) to "
            "deliver",
            outage_s,
            where,
            len(self.devices),
            sorted(self.devices) or "",
            len(self.outbox),
        )
        self._report_losses(outage_s)
        self._lost_at_s = None

    def _on_lost(self, error: Exception, crashed: bool = False) -> None:
        where = f"{self.broker.host}:{self.broker.port}"
        if not crashed:
            self._set_down(f"cannot reach the MQTT broker {where}: {error}")
        if not self._ever_connected and not crashed:
            log.warning("cannot reach the MQTT broker %s (%s)", where, error)
            return
        if self._lost_at_s is None:
            self._lost_at_s = time.monotonic()
            self._snapshot = {d.device_id: (d.mid_turn, d.active_responses) for d in self.devices.values()}
            self._drop_open_turns()
            if not crashed:
                log.warning(
                    "MQTT broker %s unavailable (%s); device sessions are kept and events queued meanwhile",
                    where,
                    error,
                )
        elif not crashed:
            log.info("MQTT broker still unavailable: %s", error)

    def _drop_open_turns(self) -> None:
        """Devices cut off mid-turn: drop the turn (never answer a fragment) and queue `turn_interrupted` for them."""
        for device in list(self.devices.values()):
            if device.mid_turn and not device.conn.closed:
                INTERRUPTED_TURNS.inc()
                try:
                    self.outbox.put(device.device_id, encode_event(device.drop_open_turn()).encode())
                except Exception:  # one device's session must not stop the others' (nor 'offline' after a crash)
                    log.exception("device %s: could not drop its interrupted turn", device.device_id)

    def _report_losses(self, outage_s: float) -> None:
        """Say what the outage cost: audio never received, cut utterances, events dropped from the outbox."""
        if self.devices:
            log.warning(
                "lost: any audio and control events devices published during the %.1f s outage (the bridge was "
                "not connected to the broker; devices must send them again)",
                outage_s,
            )
        for device_id, (mid_turn, _) in sorted(self._snapshot.items()):
            if mid_turn:
                log.warning(
                    "lost: device %s was speaking when the connection went away; that turn was dropped "
                    "(input_audio_buffer.cleared + error turn_interrupted sent)",
                    device_id,
                )
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
            t.result()  # MqttError -> reconnect; anything else -> the supervisor restarts the bridge
        if tasks[2] not in done:
            raise aiomqtt.MqttError("the broker connection ended")

    # ---- device -> bridge ------------------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        max_bytes = self.cfg.server.max_message_bytes
        async for message in client.messages:
            route = self.topics.parse(message.topic.value)
            if route is None:
                continue
            device_id, kind = route
            payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            device = await self._device(device_id)
            if device is None:
                continue
            try:
                device.receive(kind, payload, max_bytes)
            except Exception:  # a bug hit by one message: that device hears about it, the others never notice
                log.exception("device %s: a %s message of %d bytes could not be handled", device_id, kind, len(payload))
                err = ProtocolError("invalid_event", "this message could not be handled and was dropped")
                self.outbox.put(device_id, encode_event(device.conn.session.events.error(err)).encode())

    async def _device(self, device_id: str) -> Device | None:
        device = self.devices.get(device_id)
        if device is not None and not device.conn.closed:
            return device
        outbox = self.outbox

        def send(event: dict[str, Any]) -> None:  # called by the session on the event loop; must not block
            d = self.devices.get(device_id)
            if d is None:
                outbox.put(device_id, encode_event(event).encode())
                return
            d.observe(event)
            for kind, payload in d.outgoing(event):
                outbox.put(device_id, payload, kind)

        async def close(code: int, reason: str) -> None:  # the hub ends the device's session (idle, shutdown)
            self.devices.pop(device_id, None)
            log.info("device %s: session closed (%s)", device_id, reason)

        try:
            conn = self.hub.open("mqtt", send, close, dialect="ga", input_rate_hz=MODEL_RATE_HZ)
        except SessionLimitReached as e:
            if self.refusals.refuse(device_id, str(e), time.monotonic()):
                outbox.put(device_id, encode_event(self.hub.busy_error("ga", str(e))).encode())
            return None
        self.refusals.admitted(device_id)
        device = Device(device_id, conn)
        self.devices[device_id] = device
        await conn.start()
        log.info("device %s: session %s opened", device_id, conn.id)
        return device

    # ---- bridge -> device ------------------------------------------------------------------------------------
    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            item = await self.outbox.get()
            device_id, kind, payload = item
            try:
                await client.publish(self.topics.out(device_id, kind), payload, qos=OUT_QOS[kind])
            except (aiomqtt.MqttError, asyncio.CancelledError):  # lost or stopped mid-publish: deliver it later
                self.outbox.requeue_front(item)  # (anything else is not requeued: it would crash the restart again)
                raise

    # ---- housekeeping ----------------------------------------------------------------------------------------
    async def _close_all(self) -> None:
        devices, self.devices = list(self.devices.values()), {}
        await asyncio.gather(*(d.conn.close() for d in devices), return_exceptions=True)


async def run_mqtt_bridge(
    cfg: Config,
    hub: SessionHub,
    stop_event: asyncio.Event,
    health_checks: dict[str, Callable[[], str | None]] | None = None,
) -> None:
    """Run (and supervise) the bridge until `stop_event` is set, then publish 'offline' and close the device sessions.

    `health_checks` (the server's `/healthz` table) gets an `mqtt` entry: a problem while the bridge is not serving
    (broker unreachable, restarting after an error, not started)."""
    bridge = MqttBridge(cfg, hub, stop_event)  # mqtt.url was checked when the config was loaded
    if health_checks is not None:
        health_checks["mqtt"] = bridge.health
    await bridge.supervise()
