"""Spoken answers through the real server and the real voice (Piper), with the official `openai` SDK as the client
(GA and beta): every event is validated strictly against the SDK's models. The answers that must make sense come
from the embedded model (slow); the answer's audio is transcribed back by the server's own recogniser (a push-to-talk
text session on the same server), so "the client heard Paris" is checked end to end."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import soxr
import websockets
from openai import AsyncOpenAI

from assistant.transport.server import running_server
from tests.server_util import (
    TIMEOUT_S,
    b64,
    make_cfg,
    recv_event,
    recv_until,
    send_json,
    silence,
    vowel,
    wav_pcm16,
    worker_conversation,
)
from tests.test_openai_sdk import events_until, strict

AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")


def spoken_cfg(**overrides):
    return make_cfg(**{"voice.name": "joe", "generation.max_new_tokens": 48, **overrides})


def client(srv) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="unused", websocket_base_url=srv.ws_url.removesuffix("/realtime"))


def answer_pcm(log: list[dict]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in log if e["type"] in AUDIO_DELTAS)


async def transcribe(srv, pcm24k: bytes) -> str:
    """What the server's own recogniser hears in 24 kHz PCM16 (a text session, push-to-talk, no answer)."""
    async with websockets.connect(srv.ws_url) as ws:
        await recv_event(ws)
        td = {"output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
        await send_json(ws, {"type": "session.update", "session": td})
        await recv_until(ws, "session.updated")
        await ws.send(pcm24k + silence(300, 24000).tobytes())
        await send_json(ws, {"type": "input_audio_buffer.commit"})
        ev = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
        return ev["transcript"]


def check_spoken_response(log: list[dict]) -> dict:
    """One response: audio only between response.created and response.done, the transcript deltas are the
    transcript, and the final item holds it."""
    types = [e["type"] for e in log]
    created, done = types.index("response.created"), types.index("response.done")
    audio_at = [i for i, t in enumerate(types) if t in AUDIO_DELTAS]
    assert audio_at and created < audio_at[0] and audio_at[-1] < done
    final = log[done]["response"]
    spoken = final["output"][0]["content"][0]
    pieces = [e["delta"] for e in log if e["type"].endswith("audio_transcript.delta")]
    assert spoken["transcript"] == "".join(pieces).strip()
    return final


@pytest.mark.slow
async def test_ga_spoken_round_trip(embedded_backend, speech_pool, question_wav):
    """GA, server VAD: espeak-ng asks, the answer comes back as audio that says Paris."""
    pcm16k = wav_pcm16(question_wav)
    async with running_server(spoken_cfg(), backend=embedded_backend, speech=speech_pool) as srv:
        log: list = []
        async with client(srv).realtime.connect(model="local") as conn:
            created = await events_until(conn, "ga", "session.created", log)
            assert created["session"]["output_modalities"] == ["audio"]  # audio by default, as OpenAI
            session = {"type": "realtime", "input_sample_rate": 16000, "audio": {"output": {"voice": "marin"}}}
            await conn.session.update(session=session)
            updated = await events_until(conn, "ga", "session.updated", log)
            assert updated["session"]["audio"]["output"]["voice"] == "marin"
            audio = np.concatenate([pcm16k, silence(1500)])
            for i in range(0, len(audio), 1600):
                await conn.input_audio_buffer.append(audio=b64(audio[i : i + 1600]))
            await events_until(conn, "ga", "response.done", log)
        assert "error" not in [e["type"] for e in log]
        final = check_spoken_response(log)
        assert final["status"] == "completed" and final["output_modalities"] == ["audio"]
        assert final["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert "paris" in final["output"][0]["content"][0]["transcript"].lower()
        heard = await transcribe(srv, answer_pcm(log))
    assert "paris" in heard.lower(), heard


@pytest.mark.slow
async def test_beta_spoken_round_trip(embedded_backend, speech_pool, question_wav):
    """Beta, push-to-talk, an OpenAI voice name: `response.audio.*` events, the audio says Paris."""
    pcm24k = soxr.resample(wav_pcm16(question_wav), 16000, 24000)
    async with running_server(spoken_cfg(), backend=embedded_backend, speech=speech_pool) as srv:
        log: list = []
        async with client(srv).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
            await events_until(conn, "beta", "session.created", log)
            session = {"modalities": ["audio", "text"], "voice": "alloy", "output_audio_format": "pcm16"}
            await conn.session.update(session={**session, "turn_detection": None})
            updated = await events_until(conn, "beta", "session.updated", log)
            assert updated["session"]["voice"] == "alloy" and updated["session"]["modalities"] == ["audio", "text"]
            await conn.input_audio_buffer.append(audio=b64(pcm24k))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await events_until(conn, "beta", "response.done", log)
        types = [e["type"] for e in log]
        assert "response.audio.done" in types and "response.audio_transcript.done" in types
        assert not any(t.startswith("response.output_audio") for t in types) and "error" not in types
        final = check_spoken_response(log)
        assert final["modalities"] == ["audio", "text"] and final["voice"] == "alloy"
        assert final["output"][0]["content"][0]["type"] == "audio"
        heard = await transcribe(srv, answer_pcm(log))
    assert "paris" in heard.lower(), heard


@pytest.mark.slow
async def test_barge_in_stops_the_audio_and_truncate_cuts_what_the_model_remembers(embedded_backend, speech_pool):
    """Talking over a spoken answer stops its audio (nothing after speech_started) and ends it cancelled;
    truncating it to what was played leaves only that in the engine's history and in the next turn's prompt."""
    cfg = spoken_cfg(**{"generation.max_new_tokens": 120})
    async with running_server(cfg, backend=embedded_backend, speech=speech_pool) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            created = await recv_event(ws)
            session_id = created["session"]["id"]
            td = {"type": "server_vad", "create_response": False, "interrupt_response": True}
            await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000, "audio": {
                "input": {"turn_detection": td}}}})  # fmt: skip
            await recv_until(ws, "session.updated")
            question = "Describe Paris in five long sentences: its river, its museums, its food, its parks, its people."
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
            await send_json(ws, {"type": "conversation.item.create", "item": item})
            await send_json(ws, {"type": "response.create"})
            log: list = []
            await recv_until(ws, "response.output_audio.delta", log)
            for chunk in np.array_split(np.concatenate([vowel(900), silence(900)]), 90):
                await ws.send(chunk.tobytes())  # the user talks over the answer
            await recv_until(ws, "response.done", log)
            types = [e["type"] for e in log]
            after = types[types.index("input_audio_buffer.speech_started") :]
            assert after.count("response.output_audio.delta") <= 1  # stopped within one chunk (here: at once)
            final = log[-1]["response"]
            assert final["status"] == "cancelled" and final["status_details"]["reason"] == "turn_detected"
            spoken = final["output"][0]["content"][0]["transcript"]
            item_id = final["output"][0]["id"]
            played_ms = len(answer_pcm(log)) * 1000 // (2 * 24000) // 2  # the client played half of what came
            await send_json(ws, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                 "audio_end_ms": played_ms})  # fmt: skip
            truncated = await recv_until(ws, "conversation.item.truncated")
            assert truncated["audio_end_ms"] == played_ms
            await send_json(ws, {"type": "conversation.item.retrieve", "item_id": item_id})
            heard = (await recv_until(ws, "conversation.item.retrieved"))["item"]["content"][0]["transcript"]
            assert heard and len(heard) < len(spoken) and spoken.startswith(heard)
            conv = await worker_conversation(srv.engine, session_id)
            assert conv.history[-1].reply == heard  # the model remembers saying only what was heard
            # the next answer's prompt holds the truncated reply and nothing after it
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]}
            await send_json(ws, {"type": "conversation.item.create", "item": item})
            await send_json(ws, {"type": "response.create", "response": {"output_modalities": ["text"]}})
            await recv_until(ws, "response.done")
            conv = await worker_conversation(srv.engine, session_id)
            cache_ids = conv.cache.token_ids[: conv.cache.length]
            prompt_text = await srv.engine.call(lambda b: b.tokenizer.decode(cache_ids))
            rest = spoken[len(heard) :].strip()
            assert heard in prompt_text and rest[:20] not in prompt_text


@pytest.mark.slow
async def test_cancel_leaves_no_audio_after_response_done(embedded_backend, speech_pool):
    cfg = spoken_cfg(**{"generation.max_new_tokens": 120})
    async with running_server(cfg, backend=embedded_backend, speech=speech_pool) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await recv_event(ws)
            question = "Tell me a long story about a dragon and a knight."
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
            await send_json(ws, {"type": "conversation.item.create", "item": item})
            await send_json(ws, {"type": "response.create"})
            log: list = []
            await recv_until(ws, "response.output_audio.delta", log)
            await send_json(ws, {"type": "response.cancel"})
            done = await recv_until(ws, "response.done", log)
            assert done["response"]["status"] == "cancelled"
            # every clause submitted before the cancel has left the voice pool (it is FIFO): nothing can follow
            await asyncio.wrap_future(speech_pool.submit("marker"))
            await send_json(ws, {"type": "conversation.item.retrieve", "item_id": "item_marker", "event_id": "m"})
            tail: list = []
            await recv_until(ws, "error", tail)
            assert [e["type"] for e in tail] == ["error"] and tail[0]["error"]["code"] == "item_not_found"


@pytest.mark.slow
async def test_a_chinese_answer_is_sent_as_text_with_the_reason_it_has_no_audio(embedded_backend, speech_pool):
    async with running_server(spoken_cfg(), backend=embedded_backend, speech=speech_pool) as srv:
        log: list = []
        async with client(srv).realtime.connect(model="local") as conn:
            await events_until(conn, "ga", "session.created", log)
            await conn.session.update(session={"type": "realtime", "instructions": "请只用中文回答。"})
            await events_until(conn, "ga", "session.updated", log)
            question = [{"type": "input_text", "text": "法国的首都是哪里？"}]
            item = {"type": "message", "role": "user", "content": question}
            await conn.conversation.item.create(item=item)
            await conn.response.create()
            done = await events_until(conn, "ga", "response.done", log)
    deltas = [e for e in log if e["type"] == "response.output_audio_transcript.delta"]
    assert deltas and not [e for e in log if e["type"] == "response.output_audio.delta"]
    for d in deltas:
        assert d["no_audio"]["code"] == "no_voice_for_language" and d["no_audio"]["language"] == "zh"
    transcript = done["response"]["output"][0]["content"][0]["transcript"]
    assert "巴黎" in transcript and done["response"]["status"] == "completed"


async def test_a_text_session_on_a_voice_server_is_unchanged(server_tiny_backend, speech_pool):
    """The same push-to-talk turn on a text-only server and, asking for text, on a server with a voice: the same
    events; clients that always send `audio.output` (the Agents SDK) get no error."""
    runs = {}
    for name, cfg in (("text_server", make_cfg()), ("voice_server", spoken_cfg(**{"generation.max_new_tokens": 6}))):
        speech = speech_pool if name == "voice_server" else None
        async with running_server(cfg, backend=server_tiny_backend, speech=speech) as srv:
            log: list = []
            async with client(srv).realtime.connect(model="local") as conn:
                created = await events_until(conn, "ga", "session.created", log)
                output = {"voice": "ash", "format": {"type": "audio/pcm", "rate": 24000}}
                audio = {"input": {"turn_detection": None}, "output": output}
                session = {"type": "realtime", "output_modalities": ["text"], "audio": audio}
                await conn.session.update(session=session)
                await events_until(conn, "ga", "session.updated", log)
                await conn.input_audio_buffer.append(audio=b64(vowel(600, 24000)))
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                await events_until(conn, "ga", "response.done", log)
            runs[name] = [e["type"] for e in log]
            runs[name + "_default"] = created["session"]["output_modalities"]
            runs[name + "_answer"] = log[-1]["response"]["output"][0]["content"][0]
    # the text-only server warns that it cannot speak; the voice server takes audio.output silently
    assert runs["text_server"].count("error") == 1 and "error" not in runs["voice_server"]
    assert [t for t in runs["text_server"] if t != "error"] == runs["voice_server"]
    assert runs["text_server_default"] == ["text"] and runs["voice_server_default"] == ["audio"]
    assert runs["text_server_answer"] == runs["voice_server_answer"]  # same greedy answer, as output_text


async def test_unknown_voice_is_refused_naming_the_installed_ones(server_tiny_backend, speech_pool):
    async with running_server(spoken_cfg(), backend=server_tiny_backend, speech=speech_pool) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            created = await recv_event(ws)
            strict(created, "ga")
            await send_json(ws, {"type": "session.update", "event_id": "v1", "session": {"audio": {"output": {
                "voice": "darth"}}}})  # fmt: skip
            err = await recv_event(ws)
            strict(err, "ga")
            assert err["error"]["code"] == "unknown_voice" and "installed: joe" in err["error"]["message"]
            assert err["error"]["event_id"] == "v1"
            await send_json(ws, {"type": "session.update", "session": {"audio": {"output": {"voice": "joe"}}}})
            updated = await asyncio.wait_for(recv_until(ws, "session.updated"), TIMEOUT_S)
            assert updated["session"]["audio"]["output"]["voice"] == "joe"
            assert json.dumps(updated)  # strict JSON
