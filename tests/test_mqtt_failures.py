"""Issue 13 for MQTT: nothing a device or the broker does takes the bridge down, locks others out or loses a turn
silently. Real Mosquitto, the real server core with the tiny random Qwen-Audio model (as tests/test_mqtt_bridge.py).

Covers: malformed control messages (each gets an `error`, other devices keep being served, the status stays true),
a crash in the bridge's loops (supervisor restart, 'offline' meanwhile, /healthz 503), device ids never taking
WebSocket slots, the device idle timeout, rate-limited refusal logs, `server.max_message_bytes` on MQTT, a broker
killed mid-utterance (the turn is dropped and the device told), and a hypothesis fuzz of random device traffic.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.transport import mqtt as bridge_module
from assistant.transport.connection import Connection
from assistant.transport.mqtt import MqttBridge
from assistant.transport.mqtt_devices import Refusals
from tests.conftest import CLIENT_TIMEOUT_S
from tests.server_util import chunks, silence, vowel
from tests.test_mqtt_bridge import PREFIX, Watcher, _answered, _cfg, bridge, restart_broker

HELLO = json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000}})


def typed_question(text: str = "What is the capital of France?") -> list[str]:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return [json.dumps({"type": "conversation.item.create", "item": item}), json.dumps({"type": "response.create"})]


async def publish(w: Watcher, device: str, kind: str, payload: str | bytes) -> None:
    await w.client.publish(f"{PREFIX}/{device}/{kind}", payload, qos=1)


async def ask_typed(w: Watcher, device: str) -> None:
    """A typed question; returns once its response.done is on the device's events topic."""
    n = w.types(device).count("response.done")
    for event in typed_question():
        await publish(w, device, "control", event)
    await w.wait_for(lambda: _answered(w.events[device], n + 1), f"an answer for {device}")


async def hello(w: Watcher, device: str) -> None:
    n = w.types(device).count("session.updated")
    await publish(w, device, "control", HELLO)
    await w.wait_for(lambda: w.types(device).count("session.updated") > n, f"{device}'s session")


def healthz(http_url: str) -> tuple[int, str]:
    host, port = http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def errors(w: Watcher, device: str) -> list[str]:
    return [e["error"]["code"] for e in w.events[device] if e["type"] == "error"]


def assert_responses_paired(w: Watcher, device: str, finished: bool = True) -> None:
    """Every response.created on the device's topic ends in exactly one response.done (all of them if `finished`)."""
    created = [e["response"]["id"] for e in w.events[device] if e["type"] == "response.created"]
    done = [e["response"]["id"] for e in w.events[device] if e["type"] == "response.done"]
    assert len(done) == len(set(done)), f"{device}: a response ended twice: {done}"
    assert set(done) <= set(created), f"{device}: response.done without response.created"
    if finished:
        assert sorted(done) == sorted(created), f"{device}: created {created}, done {done}"


def gate_reconnects(monkeypatch) -> tuple[list[Any], asyncio.Event]:
    """The bridge's second and later broker connections wait for the returned event before going online (subscribe,
    'online'); the list records every connection attempt that got that far."""
    on_connected = MqttBridge._on_connected
    connections: list[Any] = []
    gate = asyncio.Event()

    async def gated(self: MqttBridge, client: Any) -> None:
        connections.append(client)
        if len(connections) > 1:
            await gate.wait()
        await on_connected(self, client)

    monkeypatch.setattr(MqttBridge, "_on_connected", gated)
    return connections, gate


# ---- item 1: malformed messages, crashes ---------------------------------------------------------------------------
MALFORMED: list[tuple[str | bytes, str]] = [
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": 5}}),
     "invalid_event"),
    ("[" * 5000 + "]" * 5000, "invalid_json"),
    ("1" * 5000, "invalid_json"),
    (b'{"type": "response.create", "x": "\xff\xfe"}', "invalid_json"),
    (b"\xc3\x28", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ('"session.update"', "invalid_json"),
    ("null", "invalid_json"),
    (json.dumps({"type": 5}), "invalid_event"),
    (json.dumps({"type": "session.update", "session": []}), "invalid_event"),
    (json.dumps({"type": "response.create", "response": {"max_output_tokens": 1e400}}), "invalid_event"),
]  # fmt: skip


async def test_malformed_control_messages_get_errors_and_never_end_the_bridge(
    mosquitto, tiny_qwen_dir, server_tiny_backend, monkeypatch, caplog
) -> None:
    # A bug hit by one message (simulated: the session driver raises) is that device's error, not the bridge's end.
    receive_text = Connection.receive_text

    def buggy(self: Connection, data: str | bytes) -> None:
        if data == b"boom":
            raise RuntimeError("simulated bug")
        receive_text(self, data)

    monkeypatch.setattr(Connection, "receive_text", buggy)
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await hello(w, "good")
        await hello(w, "bad")
        for payload, _ in MALFORMED:
            await publish(w, "bad", "control", payload)
        await publish(w, "bad", "audio", b"\x01\x02\x03")  # odd length: not PCM16
        await publish(w, "bad", "control", b"boom")
        expected = [code for _, code in MALFORMED] + ["invalid_audio", "invalid_event"]
        await w.wait_for(lambda: len(errors(w, "bad")) >= len(expected), "an error for every malformed message")
        assert errors(w, "bad") == expected
        await ask_typed(w, "good")  # the other device is still served
        await ask_typed(w, "bad")  # and so is the device that sent garbage
        assert w.status == ["online"]
        assert await asyncio.to_thread(healthz, server.http_url) == (200, "ok\n")
    assert "MQTT bridge crashed" not in caplog.text
    assert "could not be handled" in caplog.text  # the simulated bug is in the log with its traceback
    for device in ("good", "bad"):
        assert_responses_paired(w, device)


async def test_crashed_bridge_restarts_offline_meanwhile_and_healthz_says_so(
    mosquitto, tiny_qwen_dir, server_tiny_backend, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="assistant.mqtt")
    device = MqttBridge._device
    crashes = []

    async def crash_once(self: MqttBridge, device_id: str) -> Any:
        if device_id == "crasher" and not crashes:
            crashes.append(device_id)
            raise RuntimeError("simulated bridge bug")
        return await device(self, device_id)

    monkeypatch.setattr(MqttBridge, "_device", crash_once)
    connections, reconnect = gate_reconnects(monkeypatch)  # the restarted bridge waits until the test saw it down
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await hello(w, "steady")
        assert await asyncio.to_thread(healthz, server.http_url) == (200, "ok\n")
        await publish(w, "crasher", "control", HELLO)
        await w.wait_for(lambda: w.status[-1] == "offline", "'offline' while the bridge is down")

        async def restarting() -> None:
            while len(connections) < 2:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(restarting(), CLIENT_TIMEOUT_S)
        status, body = await asyncio.to_thread(healthz, server.http_url)
        assert status == 503 and body.startswith("mqtt: MQTT bridge down") and "simulated bridge bug" in body
        reconnect.set()
        await w.wait_for(lambda: w.status[-1] == "online", "'online' after the restart")
        assert await asyncio.to_thread(healthz, server.http_url) == (200, "ok\n")
        await ask_typed(w, "steady")  # the session survived the restart: no new session.created
        assert w.types("steady").count("session.created") == 1
        await hello(w, "crasher")  # the message that hit the bug was lost; the device is served now
    assert "MQTT bridge crashed (RuntimeError('simulated bridge bug')); restarting it in" in caplog.text
    assert "Traceback" in caplog.text
    assert w.status == ["online", "offline", "online"]


# ---- item 4: device ids and WebSocket slots, idle timeout, refusal logs --------------------------------------------
async def test_devices_never_take_websocket_slots_and_a_third_device_is_busy(
    mosquitto, tiny_qwen_dir, server_tiny_backend, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(bridge_module, "REFUSAL_LOG_INTERVAL_S", CLIENT_TIMEOUT_S * 10)  # none due during the test
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"mqtt.max_devices": 2, "server.max_sessions": 1})
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await hello(w, "one")
        await hello(w, "two")
        async with websockets.connect(server.ws_url) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), CLIENT_TIMEOUT_S))
            assert first["type"] == "session.created"
            refused = ["three", "four", "five", "six"]
            for _ in range(3):
                for device in refused:
                    await publish(w, device, "control", HELLO)
            await hello(w, "one")  # processed after every refused message (one receive loop, in order)
            for device in refused:
                await w.wait_for(lambda d=device: "error" in w.types(d), f"server_busy for {device}")
                assert set(errors(w, device)) == {"server_busy"}
                assert "session.created" not in w.types(device)
        assert sum(c.transport == "mqtt" for c in server.hub.sessions.values()) == 2
    warnings = [r for r in caplog.records if r.name == "assistant.mqtt" and "refused" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # not one per id or per message
    assert "mqtt.max_devices=2" in warnings[0].getMessage()


def test_refusals_log_one_summary_per_interval(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="assistant.mqtt")
    r = Refusals(reply_interval_s=5.0, log_interval_s=60.0)
    assert r.refuse("a", "full", now_s=0.0)  # the first refusal is logged and answered at once
    assert not r.refuse("a", "full", now_s=1.0)  # same id within the reply interval: no second server_busy
    for i in range(10):
        assert r.refuse(f"id{i}", "full", now_s=2.0 + i)
    assert r.refuse("a", "full", now_s=30.0)  # answered again after its reply interval
    assert len(caplog.records) == 1
    assert r.refuse("z", "full", now_s=61.0)
    assert len(caplog.records) == 2
    summary = caplog.records[1].getMessage()
    assert "refused 12 device id(s)" in summary and "13 message(s) in 60 s" in summary and "and 7 more" in summary


async def test_device_sessions_expire_on_their_own_timeout(mosquitto, tiny_qwen_dir, server_tiny_backend) -> None:
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"mqtt.device_idle_timeout_s": 1.0})
    assert cfg.server.idle_timeout_s >= CLIENT_TIMEOUT_S  # the WebSocket client below must outlive the test
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        async with websockets.connect(server.ws_url) as ws:
            await asyncio.wait_for(ws.recv(), CLIENT_TIMEOUT_S)
            await hello(w, "attic")

            def transports() -> list[str]:
                return sorted(c.transport for c in server.hub.sessions.values())

            assert transports() == ["mqtt", "websocket"]

            async def device_expired() -> None:
                while transports() != ["websocket"]:
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(device_expired(), CLIENT_TIMEOUT_S)
            await hello(w, "attic")  # the bridge forgot the device: the next message opens a new session
            assert w.types("attic").count("session.created") == 2
            assert transports() == ["mqtt", "websocket"]


# ---- item 10: server.max_message_bytes ------------------------------------------------------------------------------
async def test_messages_over_max_message_bytes_are_refused(mosquitto, tiny_qwen_dir, server_tiny_backend) -> None:
    limit = 2048
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"server.max_message_bytes": limit})
    big_update = json.dumps({"type": "session.update", "session": {"instructions": "x" * limit}})
    async with bridge(cfg, server_tiny_backend), Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await hello(w, "porch")
        await publish(w, "porch", "audio", silence(100).tobytes())  # 3200 bytes
        await publish(w, "porch", "control", big_update)
        await publish(w, "porch", "audio", silence(60).tobytes())  # 1920 bytes: fine
        await hello(w, "porch")
        assert errors(w, "porch") == ["message_too_large", "message_too_large"]
        messages = [e["error"]["message"] for e in w.events["porch"] if e["type"] == "error"]
        assert f"server.max_message_bytes={limit}" in messages[0] and "3200 bytes" in messages[0]
        updated = [e for e in w.events["porch"] if e["type"] == "session.updated"]
        assert "x" * limit not in json.dumps(updated)  # the oversized session.update was dropped
        await ask_typed(w, "porch")


# ---- item 11: the broker killed in the middle of an utterance --------------------------------------------------------
async def test_broker_killed_mid_utterance_drops_the_turn_and_tells_the_device(
    mosquitto, tiny_qwen_dir, server_tiny_backend, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="assistant.mqtt")
    _, watching = gate_reconnects(monkeypatch)  # after the restart: once the new watcher is subscribed
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend) as server:
        async with Watcher(mosquitto.url) as w:
            await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
            await hello(w, "hall")
            for chunk in chunks(silence(300)) + chunks(vowel(800)):
                await publish(w, "hall", "audio", chunk)
            await w.wait_for(lambda: "input_audio_buffer.speech_started" in w.types("hall"), "speech_started")
        await restart_broker(mosquitto, caplog)  # mid-utterance: no speech_stopped ever came
        async with Watcher(mosquitto.url) as w2:
            watching.set()
            await w2.wait_for(lambda: "error" in w2.types("hall"), "the device told its turn was dropped")
            assert w2.types("hall")[:2] == ["input_audio_buffer.cleared", "error"]
            err = w2.events["hall"][1]["error"]
            assert err["code"] == "turn_interrupted" and "say it again" in err["message"]
            # The device goes on: silence (which would have ended and committed the fragment), then a question.
            for chunk in chunks(silence(1000)):
                await publish(w2, "hall", "audio", chunk)
            await ask_typed(w2, "hall")
            assert "input_audio_buffer.committed" not in w2.types("hall"), "the fragment was committed"
            assert w2.types("hall").count("response.created") == 1
            assert w2.status[-1] == "online"
        assert len(server.hub.sessions) == 1
    assert "lost: device hall was speaking when the connection went away; that turn was dropped" in caplog.text


# ---- fuzz: random and malformed traffic from several devices -------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
EVENT_TYPES = st.sampled_from(
    [
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "response.create",
        "response.cancel",
        "conversation.item.create",
        "conversation.reset",
        "output_audio_buffer.clear",
        "conversation.item.truncate",
        "conversation.item.retrieve",
        "no.such.event",
    ]
)
FIELDS = st.sampled_from(
    ["session", "audio", "response", "response_id", "item", "event_id", "content", "item_id", "audio_end_ms"]
)
CONTROL = st.one_of(
    st.builds(
        lambda t, extra: json.dumps({"type": t, **extra}),
        EVENT_TYPES,
        st.dictionaries(FIELDS, JSON_VALUES, max_size=3),
    ),
    JSON_VALUES.map(json.dumps),
    st.binary(max_size=64),
    st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.sampled_from(typed_question() + [payload for payload, _ in MALFORMED]),
)
AUDIO = st.one_of(
    st.binary(max_size=641),
    st.sampled_from(chunks(vowel(200)) + chunks(silence(100))),
)
MESSAGE = st.tuples(st.sampled_from(["fuzz1", "fuzz2", "fuzz3"]), st.sampled_from(["audio", "control"])).flatmap(
    lambda dk: st.tuples(st.just(dk[0]), st.just(dk[1]), AUDIO if dk[1] == "audio" else CONTROL)
)


@pytest.fixture
async def fuzz_bridge(mosquitto, tiny_qwen_dir, server_tiny_backend):
    """One broker, server and bridge for every hypothesis example; the well-behaved device 'steady' is set up."""
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await hello(w, "steady")
        yield server, w


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_fuzzed_device_traffic_never_ends_the_bridge(fuzz_bridge, data, caplog) -> None:
    server, w = fuzz_bridge
    for device, kind, payload in data.draw(st.lists(MESSAGE, min_size=1, max_size=25), label="messages"):
        await publish(w, device, kind, payload)
    await ask_typed(w, "steady")  # after all of the above (one receive loop, in order): still answered
    assert w.status == ["online"]
    assert "MQTT bridge crashed" not in caplog.text
    assert await asyncio.to_thread(healthz, server.http_url) == (200, "ok\n")
    assert_responses_paired(w, "steady")
    for device in ("fuzz1", "fuzz2", "fuzz3"):
        assert_responses_paired(w, device, finished=False)
