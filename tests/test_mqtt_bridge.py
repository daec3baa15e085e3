"""MQTT bridge against a real Mosquitto broker and a real server core (tiny random Qwen-Audio model).

Covers: a spoken question published by the device client is answered on the events topic, retained status with
online/offline, a broker restart in the middle of a session (reconnect, same session resumed, the loss logged), two
devices at once, and the session limit. Pure parts (topics, URL parsing, the outbox) are tested without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from assistant.config import parse_mqtt_url
from assistant.realtime.events import encode_event
from assistant.transport.mqtt import run_mqtt_bridge
from assistant.transport.mqtt_devices import Outbox, Topics
from assistant.transport.server import running_server
from clients import mqtt as device_client
from tests.conftest import CLIENT_TIMEOUT_S
from tests.server_util import make_cfg, tiny_qwen_cfg

REPO = Path(__file__).resolve().parent.parent

PREFIX = "assistant"


# ---- pure parts -----------------------------------------------------------------------------------------------------
def test_topics_route_only_device_audio_and_control() -> None:
    t = Topics("home/assistant")
    assert t.parse("home/assistant/kitchen/audio") == ("kitchen", "audio")
    assert t.parse("home/assistant/kitchen/control") == ("kitchen", "control")
    assert t.parse("home/assistant/kitchen/events") is None  # our own output
    assert t.parse("home/assistant/bridge/control") is None  # the status namespace is not a device
    assert t.parse("other/assistant/kitchen/audio") is None
    assert t.events("kitchen") == "home/assistant/kitchen/events" and t.status == "home/assistant/bridge/status"
    assert t.out("kitchen", "speech") == "home/assistant/kitchen/speech"
    assert t.parse("home/assistant/kitchen/speech") is None  # our own output


def test_parse_mqtt_url_and_tls() -> None:
    a = parse_mqtt_url("mqtt://u:p@broker:1999")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker", 1999, False, "u", "p")
    assert parse_mqtt_url("mqtts://broker").port == 8883
    assert parse_mqtt_url("mqtt://broker", cfg_tls=True).tls
    with pytest.raises(ValueError, match="mqtt.url"):
        parse_mqtt_url("tcp://broker")


def test_published_json_is_strict() -> None:
    payload = encode_event({"type": "x", "timings_ms": {"total": float("nan"), "queue": float("inf"), "ok": 1.5}})
    event = json.loads(payload, parse_constant=_not_json)
    assert event == {"type": "x", "timings_ms": {"total": None, "queue": None, "ok": 1.5}}


async def test_outbox_drops_oldest_and_counts_per_device() -> None:
    box = Outbox(capacity=2)
    box.put("a", b"1")
    box.put("b", b"2")
    box.put("b", b"3", "speech")  # full: a's oldest event goes
    assert box.dropped == {"a": 1}
    first = await box.get()
    assert first == ("b", "events", b"2")
    box.requeue_front(first)  # a publish that did not complete is delivered first after reconnecting
    assert [await box.get(), await box.get()] == [("b", "events", b"2"), ("b", "speech", b"3")]
    assert len(box) == 0


# ---- against a real broker -------------------------------------------------------------------------------------
def _cfg(tiny_qwen_dir, broker_url: str, **extra: Any):
    return tiny_qwen_cfg(tiny_qwen_dir, **{"mqtt.url": broker_url, "mqtt.reconnect_max_s": 0.5, **extra})


@contextlib.asynccontextmanager
async def bridge(cfg, backend, speech=None):
    """The real server core plus the bridge, wired exactly as `serve()` does (`speech`: a loaded voice pool)."""
    async with running_server(cfg, backend=backend, speech=speech) as server:
        stop = asyncio.Event()
        task = asyncio.create_task(run_mqtt_bridge(cfg, server.hub, stop, server.app.health_checks))
        try:
            yield server
        finally:
            stop.set()
            await asyncio.wait_for(task, CLIENT_TIMEOUT_S)


def _not_json(name: str) -> None:
    raise AssertionError(f"the bridge published {name}, which is not JSON (allow_nan=False)")


class Watcher:
    """A separate MQTT client that records every device's server events and the bridge status."""

    def __init__(self, broker_url: str, **client_options: Any) -> None:
        b = parse_mqtt_url(broker_url)
        self.client = aiomqtt.Client(b.host, b.port, **client_options)
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.speech: dict[str, bytearray] = defaultdict(bytearray)  # raw answer audio per device
        self.status: list[str] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self.client.__aenter__()
        topics = [(f"{PREFIX}/+/events", 1), (f"{PREFIX}/+/speech", 1), (f"{PREFIX}/bridge/status", 1)]
        await self.client.subscribe(topics)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            topic = message.topic.value
            if topic.endswith("/bridge/status"):
                self.status.append(bytes(message.payload).decode())
            elif topic.endswith("/speech"):
                self.speech[topic.split("/")[1]] += bytes(message.payload)
            else:
                self.events[topic.split("/")[1]].append(json.loads(message.payload, parse_constant=_not_json))
            self._changed.set()

    async def wait_for(self, predicate, what: str) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), CLIENT_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}; status {self.status}, events {dict(self.events)}")

    def types(self, device: str) -> list[str]:
        return [e["type"] for e in self.events[device]]


async def ask_by_device(broker_url: str, device: str, wav, *extra: str) -> int:
    """The device client, in process: streams the WAV (4x real time) and returns once the answer is done."""
    args = device_client.build_parser().parse_args(
        ["--broker", broker_url, "--device", device, "--wav", str(wav), "--speed", "4", "--quiet"]
        + ["--wait-s", str(CLIENT_TIMEOUT_S), "--max-retries", "20", "--reconnect-max-s", "0.5", *extra]
    )
    return await asyncio.wait_for(device_client.run(args), CLIENT_TIMEOUT_S)


async def restart_broker(mosquitto, caplog) -> None:
    """Kill the broker, wait until the bridge logs it unavailable (caplog at INFO for assistant.mqtt), restart it."""
    await asyncio.to_thread(mosquitto.stop)

    async def lost() -> None:
        while "unavailable" not in caplog.text:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(lost(), CLIENT_TIMEOUT_S)
    await asyncio.to_thread(mosquitto.start)


def _answered(events: list[dict[str, Any]], n: int = 1) -> bool:
    return sum(e["type"] == "response.done" for e in events) >= n


async def test_spoken_question_from_device_client_answered_on_events_topic(
    mosquitto, tiny_qwen_dir, server_tiny_backend, question_wav, capsys
) -> None:
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with Watcher(mosquitto.url) as w:
        async with bridge(cfg, server_tiny_backend):
            await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
            assert await ask_by_device(mosquitto.url, "kitchen", question_wav) == 0
            await w.wait_for(lambda: _answered(w.events["kitchen"]), "response.done on kitchen/events")
        types = w.types("kitchen")
        assert types[0] == "session.created"
        for expected in ("session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"):
            assert expected in types
        assert types.index("input_audio_buffer.committed") < types.index("response.created")
        done = [e for e in w.events["kitchen"] if e["type"] == "response.done"][0]
        assert done["response"]["status"] in ("completed", "incomplete")
        ids = [e["event_id"] for e in w.events["kitchen"]]
        assert len(ids) == len(set(ids))
        await w.wait_for(lambda: w.status[-1] == "offline", "'offline' after the bridge stopped")
    # The device client printed the answer it streamed (the tiny model's text may be empty, the line is not).
    assert "assistant" in capsys.readouterr().out or done["response"]["output"][0]["content"][0]["text"] == ""
    # Retained: a late subscriber still learns the bridge is offline.
    async with Watcher(mosquitto.url) as late:
        await late.wait_for(lambda: late.status == ["offline"], "the retained status")


async def test_broker_restart_mid_session_resumes_the_session(
    mosquitto, tiny_qwen_dir, server_tiny_backend, question_wav, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="assistant.mqtt")
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend) as server:
        async with Watcher(mosquitto.url) as w:
            assert await ask_by_device(mosquitto.url, "hall", question_wav) == 0
            await w.wait_for(lambda: _answered(w.events["hall"]), "the first answer")
            session_id = w.events["hall"][0]["session"]["id"]
        await restart_broker(mosquitto, caplog)
        async with Watcher(mosquitto.url) as w2:
            await w2.wait_for(lambda: "online" in w2.status, "'online' again after the broker restart")
            assert await ask_by_device(mosquitto.url, "hall", question_wav) == 0
            await w2.wait_for(lambda: _answered(w2.events["hall"]), "the answer after the restart")
            types = w2.types("hall")
            assert "session.created" not in types, "the device's session should be resumed, not recreated"
            updated = [e for e in w2.events["hall"] if e["type"] == "session.updated"]
            assert updated[0]["session"]["id"] == session_id
        assert len(server.hub.sessions) == 1
    assert "back after" in caplog.text and "resuming 1 device session" in caplog.text
    assert "lost: any audio and control events devices published during the" in caplog.text


async def test_two_devices_at_once_get_their_own_sessions(
    mosquitto, tiny_qwen_dir, server_tiny_backend, question_wav
) -> None:
    cfg = _cfg(tiny_qwen_dir, mosquitto.url)
    async with bridge(cfg, server_tiny_backend), Watcher(mosquitto.url) as w:
        rcs = await asyncio.gather(
            ask_by_device(mosquitto.url, "den", question_wav), ask_by_device(mosquitto.url, "loft", question_wav)
        )
        assert rcs == [0, 0]
        await w.wait_for(lambda: _answered(w.events["den"]) and _answered(w.events["loft"]), "both answers")
    sessions = {d: w.events[d][0]["session"]["id"] for d in ("den", "loft")}
    assert sessions["den"] != sessions["loft"]
    for device in ("den", "loft"):  # no cross-talk: every response on a device's topic belongs to its own turns
        assert w.types(device).count("session.created") == 1
        assert w.types(device).count("response.created") == w.types(device).count("response.done")


async def test_device_over_the_session_limit_gets_server_busy(mosquitto, tiny_qwen_dir, server_tiny_backend) -> None:
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"mqtt.max_devices": 1})
    hello = json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000}})
    async with bridge(cfg, server_tiny_backend), Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await w.client.publish(f"{PREFIX}/first/control", hello, qos=1)
        await w.wait_for(lambda: "session.updated" in w.types("first"), "the first device's session")
        await w.client.publish(f"{PREFIX}/second/control", hello, qos=1)
        await w.wait_for(lambda: "error" in w.types("second"), "server_busy for the second device")
    assert w.events["second"][0]["error"]["code"] == "server_busy"


@pytest.mark.slow
async def test_spoken_question_answered_right_with_the_embedded_model(
    mosquitto, embedded_backend, question_wav
) -> None:
    """The real model behind the bridge: the device asks 'What is the capital of France?', the answer says Paris."""
    cfg = make_cfg(**{"generation.max_new_tokens": 48, "mqtt.url": mosquitto.url})
    async with bridge(cfg, embedded_backend), Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        assert await ask_by_device(mosquitto.url, "speaker", question_wav) == 0
        await w.wait_for(lambda: _answered(w.events["speaker"]), "the answer on speaker/events")
    transcripts = [e["transcript"] for e in w.events["speaker"] if e["type"].endswith("transcription.completed")]
    assert "france" in " ".join(transcripts).lower()
    answer = "".join(e["delta"] for e in w.events["speaker"] if e["type"] == "response.output_text.delta")
    assert "paris" in answer.lower(), answer
    done = [e for e in w.events["speaker"] if e["type"] == "response.done"][0]
    assert done["response"]["status"] == "completed"
    assert done["response"]["output"][0]["content"][0]["text"] == answer.strip()


async def test_credentials_and_tls_come_from_the_config(
    secure_mosquitto, tiny_qwen_dir, server_tiny_backend, question_wav, caplog
) -> None:
    broker = secure_mosquitto
    tls = ssl.create_default_context(cafile=broker.ca_file)
    creds = {"mqtt.username": "bridge", "mqtt.password": "bridge-pw", "mqtt.ca_file": broker.ca_file}
    async with Watcher(broker.url, username="device", password="device-pw", tls_context=tls) as w:
        async with bridge(_cfg(tiny_qwen_dir, broker.url, **creds), server_tiny_backend):
            await w.wait_for(lambda: "online" in w.status, "the bridge online over TLS with its password")
            device_auth = ("--username", "device", "--password", "device-pw", "--ca-file", broker.ca_file)
            assert await ask_by_device(broker.url, "porch", question_wav, *device_auth) == 0
            await w.wait_for(lambda: _answered(w.events["porch"]), "the answer over TLS")
        # A wrong password is refused by the broker: the bridge says so and keeps retrying, it does not crash.
        caplog.set_level(logging.INFO, logger="assistant.mqtt")
        wrong = {**creds, "mqtt.password": "nope"}
        async with bridge(_cfg(tiny_qwen_dir, broker.url, **wrong), server_tiny_backend):

            async def refused_twice() -> None:
                while caplog.text.count("cannot reach the MQTT broker") < 2:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(refused_twice(), CLIENT_TIMEOUT_S)
        assert "not authorized" in caplog.text.lower() or "bad user name or password" in caplog.text.lower()


async def test_idle_device_sessions_are_closed(mosquitto, tiny_qwen_dir, server_tiny_backend) -> None:
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"mqtt.device_idle_timeout_s": 1.0})
    hello = json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000}})
    async with bridge(cfg, server_tiny_backend) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        await w.client.publish(f"{PREFIX}/attic/control", hello, qos=1)
        await w.wait_for(lambda: "session.updated" in w.types("attic"), "the device's session")
        assert len(server.hub.sessions) == 1

        async def closed() -> None:
            while server.hub.sessions:
                await asyncio.sleep(0.1)

        await asyncio.wait_for(closed(), CLIENT_TIMEOUT_S)


async def test_serve_with_mqtt_flag_bridges_devices_and_goes_offline_on_sigint(
    mosquitto, tiny_qwen_dir, question_wav, tmp_path
) -> None:
    """`python -m assistant serve --mqtt URL` end to end: online, a device's question answered, offline on Ctrl-C."""
    config = tmp_path / "server.toml"
    config.write_text("[generation]\ngreedy = true\nmax_new_tokens = 8\n")
    cmd = [sys.executable, "-m", "assistant", "--config", str(config), "serve", "--port", "0"]
    cmd += ["--model", str(tiny_qwen_dir), "--mqtt", mosquitto.url]
    async with Watcher(mosquitto.url) as w:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=None)
        try:
            await w.wait_for(lambda: "online" in w.status, "'online' from the serve process")
            assert await ask_by_device(mosquitto.url, "garage", question_wav) == 0
            await w.wait_for(lambda: _answered(w.events["garage"]), "the answer from the serve process")
        finally:
            proc.send_signal(signal.SIGINT)
            rc = await asyncio.wait_for(proc.wait(), CLIENT_TIMEOUT_S)
        assert rc == 0
        await w.wait_for(lambda: w.status[-1] == "offline", "'offline' after Ctrl-C")


async def test_spoken_answer_goes_as_raw_pcm_on_the_speech_topic(
    mosquitto, tiny_qwen_dir, server_tiny_backend, speech_pool
) -> None:
    """A device that asks for 16 kHz output gets its answer's audio as raw PCM16 on `<prefix>/<id>/speech`,
    announced on its events topic by `response.output_audio.started` (format, rate) and ended by
    `response.output_audio.done`; no base64 audio on the events topic. (The tiny random model's 16-token answer to
    "hello" has a clause the voice can say.)"""
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"voice.name": "joe", "generation.max_new_tokens": 16})
    hello = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    control = [
        {"type": "session.update", "session": {"output_sample_rate": 16000}},
        {"type": "conversation.item.create", "item": hello},
        {"type": "response.create"},
    ]
    async with bridge(cfg, server_tiny_backend, speech_pool), Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        for event in control:
            await w.client.publish(f"{PREFIX}/box/control", json.dumps(event), qos=1)
        await w.wait_for(lambda: _answered(w.events["box"]), "the spoken answer")
    types = w.types("box")
    assert "error" not in types and not [t for t in types if t.endswith("audio.delta")]
    started = [e for e in w.events["box"] if e["type"] == "response.output_audio.started"]
    assert len(started) == 1 and started[0]["format"] == "pcm16" and started[0]["sample_rate"] == 16000
    done = w.events["box"][-1]["response"]
    assert started[0]["item_id"] == done["output"][0]["id"] and started[0]["response_id"] == done["id"]
    order = [types.index(t) for t in ("response.output_audio.started", "response.output_audio.done", "response.done")]
    assert order == sorted(order)
    audio_ms = done["timings_ms"]["audio"]  # what the server says it sent (whole ms per clause)
    assert audio_ms > 0 and len(w.speech["box"]) / (2 * 16000) * 1000 == pytest.approx(audio_ms, abs=5)


@pytest.mark.slow
async def test_device_client_writes_an_intelligible_spoken_answer(
    mosquitto, embedded_backend, speech_pool, question_wav, tmp_path
) -> None:
    """The device client asks 'What is the capital of France?' at its own 16 kHz output rate and writes the spoken
    answer to a file (`--out`): the server's recogniser hears Paris in it."""
    import wave

    import soxr

    from tests.test_spoken_answers import transcribe

    answer = tmp_path / "answer.wav"
    cfg = make_cfg(**{"voice.name": "joe", "generation.max_new_tokens": 48, "mqtt.url": mosquitto.url})
    async with bridge(cfg, embedded_backend, speech_pool) as server, Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        extra = ("--out", str(answer), "--output-rate", "16000")
        assert await ask_by_device(mosquitto.url, "speaker", question_wav, *extra) == 0
        with wave.open(str(answer)) as f:
            assert f.getframerate() == 16000
            pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        heard = await transcribe(server, soxr.resample(pcm, 16000, 24000).tobytes())
    assert len(pcm) > 16000 and "paris" in heard.lower(), heard
    assert bytes(w.speech["speaker"]) == pcm.tobytes()  # the file is exactly what came on the speech topic
    assert not [t for t in w.types("speaker") if t.endswith("audio.delta")]
