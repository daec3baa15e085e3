"""The Wyoming server against the real `wyoming` client (AsyncTcpClient), on port 0.

Without a model: `describe` answered before the model is loaded, bad messages (an `error` each, the connection goes
on), connection capacity and idle timeout. With the real embedded weights and the real voice (slow): an espeak-ng
question transcribed, two turns of one conversation, a sentence synthesised (plain and streaming) and transcribed
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import soxr
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice
from wyoming.wake import Detect, Detection

from assistant.audio.voice import open_pool
from assistant.transport.server import running_server
from assistant.transport.wyoming import WyomingServer
from bench.wake_word import speak
from tests.server_util import TIMEOUT_S, silence
from tests.wyoming_util import ask, audio_events, client, read_until, spoken, transcribe, words, wy_cfg


# ---- without a model -------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def loading_server(**overrides: Any) -> AsyncIterator[WyomingServer]:
    """The Wyoming server as `serve` runs it while the model is still loading (no hub attached yet)."""
    cfg = wy_cfg(**overrides)
    voice = open_pool(cfg.voice.params())
    wy = WyomingServer(cfg, voice)
    await wy.start()
    try:
        yield wy
    finally:
        await wy.shutdown(0)
        if voice is not None:
            voice.close()


async def test_describe_is_answered_while_the_model_loads_and_asr_handle_say_so():
    async with loading_server() as wy:
        [ev] = await ask(wy.port, Describe().event(), until="info")
        info = Info.from_event(ev)
        assert [p.name for p in info.asr] == ["qwen-assistant"] and "en" in info.asr[0].models[0].languages
        assert [p.name for p in info.handle] == ["qwen-assistant"]
        assert info.handle[0].models[0].languages == info.asr[0].models[0].languages  # what Whisper hears
        assert [p.name for p in info.tts] == ["qwen-assistant"] and info.tts[0].supports_synthesize_streaming
        assert info.tts[0].voices[0].name == "joe" and info.tts[0].voices[0].languages == ["en"]
        assert [p.name for p in info.wake] == ["qwen-assistant"]
        assert {m.name: m.phrase for m in info.wake[0].models}["hey_jarvis"] == "Hey Jarvis"

        events = await ask(wy.port, Transcribe().event(), *audio_events(b"\0" * 3200, 16000), until="error")
        assert events[-1].data["code"] == "model_loading"
        [ev] = await ask(wy.port, Transcript("hello", context={"conversation_id": "c"}).event(), until="not-handled")
        assert "loading" in NotHandled.from_event(ev).text


async def test_bad_messages_get_an_error_and_the_connection_goes_on():
    async with loading_server(**{"server.max_message_bytes": 4096}) as wy:
        reader, writer = await asyncio.open_connection("127.0.0.1", wy.port)
        c = AsyncTcpClient("127.0.0.1", wy.port)
        c._reader, c._writer = reader, writer  # the package's client reading our raw connection

        async def error_after(raw: bytes) -> dict[str, Any]:
            writer.write(raw)
            await writer.drain()
            [ev] = await asyncio.wait_for(read_until(c, "error"), TIMEOUT_S)
            return ev.data

        assert (await error_after(b"this is not json\n"))["code"] == "invalid_json"
        assert (await error_after(b'["a list"]\n'))["code"] == "invalid_event"
        assert (await error_after(b'{"type": "synthesize", "data": {"text": 5}}\n'))["code"] == "invalid_event"
        voice_as_text = b'{"type": "synthesize", "data": {"text": "Hi.", "voice": "joe"}}\n'  # voice is an object
        assert (await error_after(voice_as_text))["code"] == "invalid_event"
        big = json.dumps({"type": "audio-chunk", "payload_length": 10000}).encode() + b"\n" + b"\0" * 10000
        assert (await error_after(big))["code"] == "message_too_large"
        chunk = AudioChunk(16000, 2, 1, b"\0" * 320).event()
        await c.write_event(chunk)
        assert (await read_until(c, "error"))[-1].data["code"] == "audio_not_started"
        unknown = json.dumps({"type": "not-a-wyoming-event"}).encode() + b"\n"
        writer.write(unknown)  # unknown types are dropped, as the protocol asks of servers
        await c.write_event(Describe().event())
        assert [e.type for e in await read_until(c, "info")] == ["info"]
        over = json.dumps({"type": "audio-chunk", "payload_length": 10**9}).encode() + b"\n"
        assert (await error_after(over))["code"] == "message_too_large"  # far over the limit: then closed
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
        writer.close()


@pytest.mark.slow  # espeak-ng
async def test_wake_word_detection_works_while_the_model_loads():
    """`detect` then audio: `detection` with the model's name and the stream time for "Alexa, ...", `not-detected`
    at audio-stop for speech without it; a name that is not installed is an error listing the installed ones. At
    22050 Hz, as a satellite might send, to check the conversion to the models' 16 kHz."""
    rate_hz = 22050

    def said(text: str) -> np.ndarray:
        return soxr.resample(speak(text), 16000, rate_hz).astype(np.int16)

    wake, plain = said("Alexa, what is the capital of France?"), said("What is the capital of France?")
    lead_in = silence(500, rate_hz)
    async with loading_server() as wy:
        events = await ask(
            wy.port, Detect(names=["alexa"]).event(), *audio_events(np.concatenate([lead_in, wake]).tobytes(), rate_hz),
            until=("detection", "not-detected"),
        )  # fmt: skip
        det = Detection.from_event(events[-1])
        assert det.name == "alexa" and 500 < det.timestamp < 500 + len(wake) * 1000 // rate_hz, det
        events = await ask(
            wy.port, Detect().event(), *audio_events(plain.tobytes(), rate_hz), until=("detection", "not-detected")
        )
        assert events[-1].type == "not-detected"
        [err] = await ask(wy.port, Detect(names=["hey_siri"]).event(), until="error")
        assert err.data["code"] == "unknown_wake_word" and "alexa" in err.data["text"]


async def test_connections_over_capacity_are_refused_and_idle_ones_closed():
    async with loading_server(**{"wyoming.max_connections": 1, "wyoming.idle_timeout_s": 1}) as wy:
        async with client(wy.port) as first:
            await first.write_event(Describe().event())
            await read_until(first, "info")
            async with client(wy.port) as second:
                ev = await second.read_event()
                assert ev.type == "error" and ev.data["code"] == "server_busy"
                assert "wyoming.max_connections=1" in ev.data["text"]
                assert await second.read_event() is None  # closed
            assert await first.read_event() is None  # idle for 1 s: closed
        async with client(wy.port) as third:  # the slot is free again
            await third.write_event(Describe().event())
            await read_until(third, "info")


# ---- the real model and voice (slow) -------------------------------------------------------------------------------
@pytest.fixture
async def wyoming_server(embedded_backend, speech_pool):
    async with running_server(wy_cfg(), backend=embedded_backend, speech=speech_pool) as srv:
        yield srv


@pytest.mark.slow
async def test_a_spoken_question_is_transcribed(wyoming_server, question_wav):
    with wave.open(str(question_wav)) as w:  # espeak-ng's 22.05 kHz: the server resamples
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    text = words(await transcribe(wyoming_server.wyoming.port, pcm, rate))
    assert "capital" in text and "france" in text


@pytest.mark.slow
async def test_the_language_home_assistant_sends_is_the_one_heard(wyoming_server, question_wav):
    """`transcribe {language}` is told to the recogniser: the same English audio told German comes out otherwise;
    a language it does not know is reported (`unknown_language`) and the turn is still transcribed."""
    port = wyoming_server.wyoming.port
    with wave.open(str(question_wav)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())

    async def heard(language: str) -> tuple[str, list[str]]:
        events = await ask(port, Transcribe(language=language).event(), *audio_events(pcm, rate), until="transcript")
        return Transcript.from_event(events[-1]).text, [e.data["code"] for e in events if e.type == "error"]

    (en, en_errors), (de, de_errors) = await heard("en-US"), await heard("de")
    assert not en_errors and not de_errors and "france" in words(en) and de != en
    unknown, errors = await heard("xx")
    assert errors == ["unknown_language"] and "france" in words(unknown)


@pytest.mark.slow
async def test_a_conversation_remembers_its_earlier_turn(wyoming_server):
    port = wyoming_server.wyoming.port

    async def handle(text: str, conv_id: str) -> Handled:
        [ev] = await ask(
            port,
            Transcript(text, context={"conversation_id": conv_id}, language="en").event(),
            until=("handled", "not-handled"),
        )
        assert ev.type == "handled", ev
        return Handled.from_event(ev)

    first = await handle("My name is Alice.", "kitchen-1")
    assert first.context == {"conversation_id": "kitchen-1"}
    second = await handle("What is my name?", "kitchen-1")
    assert "alice" in second.text.lower()
    other = await handle("What is my name?", "hall-1")  # another conversation has no such history
    assert "alice" not in other.text.lower()


@pytest.mark.slow
async def test_a_synthesised_sentence_transcribes_back(wyoming_server):
    port = wyoming_server.wyoming.port
    voice = SynthesizeVoice(name="joe")
    events = await ask(port, Synthesize("What is the capital of France?", voice=voice).event(), until="audio-stop")
    assert events[0].type == "audio-start" and not [e for e in events if e.type == "error"]
    pcm, rate = spoken(events)
    assert rate == 24000 and len(pcm) // 2 > rate  # more than a second of speech
    text = words(await transcribe(port, pcm, rate))
    assert "capital" in text and "france" in text


@pytest.mark.slow
async def test_streaming_synthesis_speaks_each_clause_as_its_text_arrives(wyoming_server):
    port = wyoming_server.wyoming.port
    async with client(port) as c:
        await c.write_event(SynthesizeStart().event())
        for piece in ("The capital of Fr", "ance is Paris. "):
            await c.write_event(SynthesizeChunk(piece).event())
        first = await read_until(c, "audio-chunk")  # the first sentence is spoken before the text stream ends
        assert [e.type for e in first] == ["audio-start", "audio-chunk"]
        for piece in ("It is a very", " beautiful city."):
            await c.write_event(SynthesizeChunk(piece).event())
        whole = "The capital of France is Paris. It is a very beautiful city."
        await c.write_event(Synthesize(whole).event())  # the copy for older servers: ignored inside a stream
        await c.write_event(SynthesizeStop().event())
        rest = await read_until(c, "synthesize-stopped")
    assert [e.type for e in rest[-2:]] == ["audio-stop", "synthesize-stopped"]
    pcm, rate = spoken(first + rest)
    text = words(await transcribe(port, pcm, rate))
    assert "paris" in text and "beautiful city" in text


@pytest.mark.slow
async def test_text_the_voice_cannot_read_gets_an_error_and_the_rest_is_spoken(wyoming_server):
    events = await ask(wyoming_server.wyoming.port, Synthesize("法国的首都是巴黎。 Paris.").event(), until="audio-stop")
    errors = [e.data for e in events if e.type == "error"]
    assert [e["code"] for e in errors] == ["unspeakable_text"]
    pcm, _ = spoken(events)
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 1000


# ---- handle's bounds, on the tiny random Qwen-Audio checkpoint (its answers are noise; the mechanics are not) -------
@contextlib.asynccontextmanager
async def tiny_server(tiny_qwen_dir, server_tiny_backend, **overrides: Any):
    model = {"model.backend": "qwen-audio", "model.path": str(tiny_qwen_dir), "generation.max_new_tokens": 4}
    cfg = wy_cfg(**{**model, "voice.name": "", **overrides})  # no tts needed here
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        yield srv


async def handle(port: int, text: str, conv_id: str | None, language: str | None = None) -> Event:
    context = {"conversation_id": conv_id} if conv_id else None
    [ev] = await ask(port, Transcript(text, context=context, language=language).event(), until=HANDLE_ENDS)
    return ev


HANDLE_ENDS = ("handled", "not-handled")


def conversations(srv) -> list[Any]:
    return [c for c in srv.hub.sessions.values() if c.transport == "wyoming_conversation"]


async def test_qwen_audio_offers_no_asr_and_says_so(tiny_qwen_dir, server_tiny_backend):
    async with tiny_server(tiny_qwen_dir, server_tiny_backend) as srv:
        [ev] = await ask(srv.wyoming.port, Describe().event(), until="info")
        info = Info.from_event(ev)
        assert info.asr == [] and [p.name for p in info.handle] == ["qwen-assistant"]
        events = await ask(srv.wyoming.port, *audio_events(b"\0" * 3200, 16000), until="error")
        assert events[-1].data["code"] == "service_unavailable"


async def test_a_turn_over_the_token_limit_is_not_handled_with_the_reason(tiny_qwen_dir, server_tiny_backend):
    async with tiny_server(tiny_qwen_dir, server_tiny_backend, **{"engine.max_turn_tokens": 16}) as srv:
        ev = await handle(srv.wyoming.port, "word " * 200, "c1")
        assert ev.type == "not-handled" and "engine.max_turn_tokens" in ev.data["text"], ev
        assert (await handle(srv.wyoming.port, "Hello.", "c1")).type in HANDLE_ENDS  # the conversation goes on


async def test_conversations_are_bounded_least_recently_used_first(tiny_qwen_dir, server_tiny_backend):
    async with tiny_server(tiny_qwen_dir, server_tiny_backend, **{"wyoming.max_conversations": 2}) as srv:
        port = srv.wyoming.port
        for conv_id in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" needs a slot
            assert (await handle(port, "Hello.", conv_id)).type in HANDLE_ENDS
        assert sorted(srv.wyoming.conversations._by_id) == ["a", "c"] and len(conversations(srv)) == 2
        assert (await handle(port, "Hello.", None)).type in HANDLE_ENDS  # no id: one turn ("a" made room for it)
        assert list(srv.wyoming.conversations._by_id) == ["c"] and len(conversations(srv)) == 1


async def test_an_unused_conversation_expires(tiny_qwen_dir, server_tiny_backend):
    async with tiny_server(tiny_qwen_dir, server_tiny_backend, **{"wyoming.conversation_idle_s": 1}) as srv:
        assert (await handle(srv.wyoming.port, "Hello.", "a")).type in HANDLE_ENDS
        async with asyncio.timeout(TIMEOUT_S):
            while conversations(srv):  # idle for wyoming.conversation_idle_s: ended by the hub's sweep
                await asyncio.sleep(0.1)
        assert len(srv.wyoming.conversations) == 0


async def test_one_request_at_a_time_per_conversation_and_the_language_asked(tiny_qwen_dir, server_tiny_backend):
    async with tiny_server(tiny_qwen_dir, server_tiny_backend) as srv:
        convs = srv.wyoming.conversations
        # Both requests reach the conversation before the engine can answer the first (no await in between).
        first, second = await asyncio.gather(
            convs.answer("Erzähl mir etwas.", "de-DE", "k"), convs.answer("And now?", None, "k")
        )
        assert isinstance(first, Handled | NotHandled) and "still answering" not in (first.text or "")
        assert isinstance(second, NotHandled) and "still answering" in second.text
        [conv] = conversations(srv)
        assert conv.session.settings.instructions.endswith("Answer in German.")
        assert (await handle(srv.wyoming.port, "And now?", "k")).type in HANDLE_ENDS  # answered once it is free


def test_serve_answers_describe_while_loading_and_stops_on_sigterm(tmp_path):
    """`serve --wyoming`: the port answers while the model loads (the checkpoint's config.json is a FIFO nobody
    writes), and SIGTERM still reaches the server's own handler (wyoming's `run()` would have replaced it)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "config.json")
    cmd = [sys.executable, "-m", "assistant", "serve", "--port", "0", "--model", str(ckpt)]
    proc = subprocess.Popen([*cmd, "--wyoming", "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = None
        for line in proc.stdout:
            if line.startswith(b"Wyoming (Home Assistant): port "):
                port = int(line.split()[4])
                break
        assert port is not None, proc.stderr.read().decode()
        [ev] = asyncio.run(ask(port, Describe().event(), until="info"))
        assert Info.from_event(ev).handle[0].name == "qwen-assistant"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"stopped (signal) while loading the model" in err and b"Traceback" not in err


async def test_healthz_names_wyoming_when_its_port_stops_accepting(tiny_qwen_dir, server_tiny_backend):
    from tests.test_mqtt_failures import healthz

    async with tiny_server(tiny_qwen_dir, server_tiny_backend) as srv:
        assert await asyncio.to_thread(healthz, srv.http_url) == (200, "ok\n")
        srv.wyoming._server.close()  # what /healthz must notice, however it happens
        status, body = await asyncio.to_thread(healthz, srv.http_url)
        assert status == 503 and body.startswith("wyoming: ") and "not accepting" in body
