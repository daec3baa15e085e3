"""The wake word through the real server: WebSocket clients and MQTT devices, real embedded weights or the tiny model.

Stream time, not sleeping: the follow-up window is passed by sending silence, and "nothing happened" is checked by
sending `input_audio_buffer.commit` afterwards: the server handles a connection's messages in order, so when the
first event after it is `input_audio_buffer_commit_empty`, no turn was open and no turn had been committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import wave

import numpy as np
import pytest
import websockets

from assistant.audio.wake_word import WakeWordSettings
from assistant.transport.hub import SessionHub
from assistant.transport.server import running_server
from bench.wake_word import speak
from tests.server_util import chunks, make_cfg, recv_event, recv_until, send_json, silence, tiny_qwen_cfg
from tests.test_client_desktop import run_desktop
from tests.test_mqtt_bridge import Watcher, _answered, _cfg, ask_by_device, bridge

FOLLOW_UP_MS = 3000


def question_then_wake_word() -> np.ndarray:
    """A question without the wake word, then the same one after it (espeak-ng)."""
    return np.concatenate(
        [silence(300), speak("What is the capital of France?"), silence(1500)]
        + [silence(500), speak("Alexa, what is the capital of France?"), silence(300)]
    )


def write_wav(path, pcm: np.ndarray):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


async def send_audio(ws, pcm: np.ndarray) -> None:
    for frame in chunks(pcm):
        await ws.send(frame)


async def nothing_was_heard(ws) -> None:
    """The audio sent so far opened no turn: a commit now finds an empty buffer, and nothing came before that."""
    await send_json(ws, {"type": "input_audio_buffer.commit"})
    event = await recv_event(ws)
    assert event["type"] == "error" and event["error"]["code"] == "input_audio_buffer_commit_empty", event


@pytest.mark.slow  # real embedded weights, espeak-ng
async def test_wake_word_then_question_answered_without_it_ignored_follow_up_window(embedded_backend):
    cfg = make_cfg(**{"generation.max_new_tokens": 48, "wake_word.follow_up_ms": FOLLOW_UP_MS})
    question = speak("What is the capital of France?")
    async with running_server(cfg, backend=embedded_backend) as srv:
        ws = await websockets.connect(srv.ws_url)
        assert (await recv_event(ws))["session"]["audio"]["input"]["wake_word"] is None  # off by default
        session = {"input_sample_rate": 16000, "audio": {"input": {"wake_word": {"name": "alexa"}}}}
        await send_json(ws, {"type": "session.update", "session": session})
        updated = await recv_until(ws, "session.updated")
        assert updated["session"]["audio"]["input"]["wake_word"] == {"name": "alexa", "follow_up_ms": FOLLOW_UP_MS}

        # The question without the wake word: no turn, no response.
        await send_audio(ws, np.concatenate([silence(300), question, silence(1500)]))
        await nothing_was_heard(ws)

        # "Alexa, what is the capital of France?" in one breath: the question is the turn.
        await send_audio(
            ws, np.concatenate([silence(500), speak("Alexa, what is the capital of France?"), silence(1500)])
        )
        log: list[dict] = []
        done = await recv_until(ws, "response.done", log)
        types = [e["type"] for e in log]
        assert types[0] == "input_audio_buffer.wake_word_detected" and log[0]["name"] == "alexa", types
        assert types.count("input_audio_buffer.committed") == 1
        transcript = next(e for e in log if e["type"] == "conversation.item.input_audio_transcription.completed")
        assert "capital" in transcript["transcript"].lower() and "alexa" not in transcript["transcript"].lower()
        answer = done["response"]["output"][0]["content"][0]["text"]
        assert done["response"]["status"] == "completed" and "paris" in answer.lower(), answer

        # A follow-up inside the window needs no wake word.
        await send_audio(ws, np.concatenate([silence(500), speak("What is the capital of Germany?"), silence(1500)]))
        log = []
        done = await recv_until(ws, "response.done", log)
        types = [e["type"] for e in log]
        assert "input_audio_buffer.wake_word_detected" not in types and types[0] == "input_audio_buffer.speech_started"
        transcript = next(e for e in log if e["type"] == "conversation.item.input_audio_transcription.completed")
        assert "germany" in transcript["transcript"].lower() and done["response"]["status"] == "completed"

        # After the window (passed in stream time with silence) the same kind of question is ignored.
        await send_audio(ws, np.concatenate([silence(FOLLOW_UP_MS + 200), question, silence(1500)]))
        await nothing_was_heard(ws)
        await ws.close()


async def test_devices_start_with_the_mqtt_wake_word_and_websockets_with_theirs():
    """Per transport defaults (`mqtt.wake_word`, `wake_word.name`), both with `wake_word.follow_up_ms`; no sockets."""
    cfg = make_cfg(**{"mqtt.wake_word": "okay_nabu", "wake_word.follow_up_ms": 1234})
    hub = SessionHub(cfg, engine=None)

    async def close(code: int, reason: str) -> None:
        pass

    device = hub.open("mqtt", lambda e: None, close, input_rate_hz=16000)
    browser = hub.open("websocket", lambda e: None, close)
    assert device.session.settings.wake_word is not None
    assert (device.session.settings.wake_word.name, device.session.settings.wake_word.follow_up_ms) == (
        "okay_nabu",
        1234,
    )
    assert browser.session.settings.wake_word is None  # wake_word.name is "" (off) by default
    # a session turning its wake word on without follow_up_ms gets the server's
    browser.session.start(0.0)
    browser.session.receive_event({"type": "session.update", "session": {"wake_word": {"name": "alexa"}}}, 0.0)
    assert browser.session.settings.wake_word == WakeWordSettings("alexa", 1234)
    for conn in (device, browser):
        hub.release(conn)
    if hub._sweeper is not None:
        hub._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hub._sweeper


@pytest.mark.slow  # espeak-ng, mosquitto
async def test_a_device_behind_the_mqtt_wake_word_is_heard_only_after_it(
    mosquitto, tiny_qwen_dir, server_tiny_backend, tmp_path
):
    """`mqtt.wake_word = "alexa"`: the device client streams a question without the wake word, then one with it; only
    the second becomes a turn (tiny random model: the answer's text is noise)."""
    wav = write_wav(tmp_path / "device.wav", question_then_wake_word())
    cfg = _cfg(tiny_qwen_dir, mosquitto.url, **{"mqtt.wake_word": "alexa"})
    async with bridge(cfg, server_tiny_backend), Watcher(mosquitto.url) as w:
        await w.wait_for(lambda: "online" in w.status, "the bridge's online status")
        assert await ask_by_device(mosquitto.url, "hall", wav) == 0
        await w.wait_for(lambda: _answered(w.events["hall"]), "response.done on hall/events")
    events = w.events["hall"]
    types = w.types("hall")
    updated = next(e for e in events if e["type"] == "session.updated")
    assert updated["session"]["audio"]["input"]["wake_word"]["name"] == "alexa"
    first_turn_event = next(t for t in types if t.startswith("input_audio_buffer."))
    assert first_turn_event == "input_audio_buffer.wake_word_detected", types
    assert types.count("input_audio_buffer.committed") == 1


@pytest.mark.slow  # espeak-ng
async def test_desktop_client_with_a_wake_word(tiny_qwen_dir, server_tiny_backend, tmp_path):
    """`clients.desktop --wake-word alexa --wav`: the question without it is not heard, the one after it is answered."""
    wav = write_wav(tmp_path / "desk.wav", question_then_wake_word())
    async with running_server(tiny_qwen_cfg(tiny_qwen_dir), backend=server_tiny_backend) as server:
        rc, out, err = await run_desktop("--url", server.ws_url, "--wav", str(wav), "--wake-word", "alexa")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines.count("[wake word: alexa]") == 1 and lines.count("[speech]") == 1, out
    assert lines.index("[wake word: alexa]") < lines.index("[speech]")
