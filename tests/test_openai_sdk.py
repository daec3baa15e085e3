"""The official `openai` SDK as the client of a real server on port 0 (tiny random model), GA and beta dialects.

Every event the SDK receives is validated strictly against the SDK's own pydantic models (the discriminated union
`RealtimeServerEvent` of the dialect): required fields present, literal values right, the right event class picked.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import TypeAdapter, ValidationError
from websockets.exceptions import InvalidStatus

from assistant.transport.server import running_server
from tests.server_util import TIMEOUT_S, b64, recv_event, silence, vowel, wav_pcm16
from tests.server_util import make_cfg as server_cfg

TOKEN = "test-token"
_ADAPTERS = {"ga": TypeAdapter(GAServerEvent), "beta": TypeAdapter(BetaServerEvent)}


def strict(event: dict, dialect: str):
    """Validate one server event strictly; returns the SDK model instance."""
    model = _ADAPTERS[dialect].validate_python(event, strict=True)
    assert model.type == event["type"]
    return model


def test_strict_validation_can_fail():
    with pytest.raises(ValidationError):
        strict({"type": "response.done", "event_id": "e1"}, "ga")  # no `response`
    with pytest.raises(ValidationError):
        strict({"type": "response.output_text.delta", "event_id": "e1", "delta": "x"}, "ga")  # no ids
    with pytest.raises(ValidationError):
        strict({"type": "response.output_text.delta", "event_id": "e1"}, "beta")  # GA name in beta


def make_cfg(**overrides):
    return server_cfg(**{"server.token": TOKEN, **overrides})


@pytest.fixture
async def server(server_tiny_backend):
    async with running_server(make_cfg(), backend=server_tiny_backend) as srv:
        yield srv


def sdk_client(srv, token=TOKEN) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=token, websocket_base_url=srv.ws_url.removesuffix("/realtime"))


async def events_until(conn, dialect: str, etype: str, log: list) -> dict:
    """Raw events from the SDK connection, each strictly validated, until one of `etype`."""
    while True:
        raw = await asyncio.wait_for(conn.recv_bytes(), TIMEOUT_S)
        event = json.loads(raw)
        strict(event, dialect)
        log.append(event)
        if event["type"] == etype:
            return event


async def test_ga_push_to_talk(server):
    log: list = []
    async with sdk_client(server).realtime.connect(model="qwen-local") as conn:
        created = await events_until(conn, "ga", "session.created", log)
        assert log == [created] and created["session"]["type"] == "realtime"
        session = {
            "type": "realtime",
            "output_modalities": ["text"],
            "instructions": "Answer briefly.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}},
        }
        await conn.session.update(session=session)
        updated = await events_until(conn, "ga", "session.updated", log)
        assert updated["session"]["instructions"] == "Answer briefly."
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        await conn.input_audio_buffer.append(audio=b64(vowel(700, 24000)))
        await conn.input_audio_buffer.commit()
        committed = await events_until(conn, "ga", "input_audio_buffer.committed", log)
        await conn.response.create()
        done = await events_until(conn, "ga", "response.done", log)
    types = [e["type"] for e in log]
    assert types[0] == "session.created"
    assert types.count("response.created") == 1 and "error" not in types
    for t in ("response.output_item.added", "response.content_part.added", "response.output_text.done"):
        assert t in types
    deltas = [e for e in log if e["type"] == "response.output_text.delta"]
    assert deltas and all(d["response_id"] == done["response"]["id"] for d in deltas)
    text = done["response"]["output"][0]["content"][0]
    assert text["type"] == "output_text" and text["text"] == "".join(d["delta"] for d in deltas).strip()
    usage = done["response"]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] >= 1
    assert committed["item_id"].startswith("item_")
    user_items = [e for e in log if e["type"] in ("conversation.item.added", "conversation.item.done")]
    assert [e["item"]["id"] for e in user_items] == [committed["item_id"]] * 2
    assert user_items[0]["item"]["content"][0]["type"] == "input_audio"
    assert len({e["event_id"] for e in log}) == len(log)


async def test_ga_server_vad_answers_by_itself(server):
    log: list = []
    async with sdk_client(server).realtime.connect(model="qwen-local") as conn:
        await events_until(conn, "ga", "session.created", log)
        td = {"type": "server_vad", "silence_duration_ms": 400, "create_response": True, "interrupt_response": True}
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": td}}})
        await events_until(conn, "ga", "session.updated", log)
        audio = np.concatenate([silence(300, 24000), vowel(900, 24000), silence(900, 24000)])
        for i in range(0, len(audio), 2400):  # 100 ms appends, like a microphone
            await conn.input_audio_buffer.append(audio=b64(audio[i : i + 2400]))
        done = await events_until(conn, "ga", "response.done", log)
    types = [e["type"] for e in log]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    assert [t for t in types if t in order] == order
    assert done["response"]["status"] in ("completed", "incomplete")
    started = next(e for e in log if e["type"] == order[0])
    assert 240 <= started["audio_start_ms"] <= 360  # the vowel starts 300 ms into the session's audio


async def test_ga_cancel(server_tiny_backend):
    async with running_server(make_cfg(**{"generation.max_new_tokens": 4000}), backend=server_tiny_backend) as srv:
        log: list = []
        async with sdk_client(srv).realtime.connect(model="qwen-local") as conn:
            await events_until(conn, "ga", "session.created", log)
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await conn.input_audio_buffer.append(audio=b64(vowel(500, 24000)))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            delta = await events_until(conn, "ga", "response.output_text.delta", log)
            await conn.response.cancel()
            done = await events_until(conn, "ga", "response.done", log)
            assert done["response"]["id"] == delta["response_id"]
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            await conn.response.cancel()  # nothing active any more
            err = await events_until(conn, "ga", "error", log)
            assert err["error"]["code"] == "response_cancel_not_active"
            # an audio-output request is refused clearly and the session goes on
            await conn.send({"type": "output_audio_buffer.clear"})
            err = await events_until(conn, "ga", "error", log)
            assert err["error"]["code"] == "audio_output_unsupported" and "text" in err["error"]["message"]
            await conn.input_audio_buffer.clear()
            await events_until(conn, "ga", "input_audio_buffer.cleared", log)
            await conn.input_audio_buffer.commit()
            err = await events_until(conn, "ga", "error", log)
            assert err["error"]["code"] == "input_audio_buffer_commit_empty"


async def test_beta_push_to_talk(server):
    log: list = []
    async with sdk_client(server).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
        created = await events_until(conn, "beta", "session.created", log)
        assert created["session"]["modalities"] == ["text"] and "model" not in created["session"]
        session = {"modalities": ["text"], "input_audio_format": "pcm16", "turn_detection": None}
        await conn.session.update(session=session)
        updated = await events_until(conn, "beta", "session.updated", log)
        assert updated["session"]["turn_detection"] is None
        await conn.input_audio_buffer.append(audio=b64(vowel(600, 24000)))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        done = await events_until(conn, "beta", "response.done", log)
    types = [e["type"] for e in log]
    assert "response.text.delta" in types and "response.text.done" in types
    assert types.count("conversation.item.created") == 1 and "conversation.item.added" not in types
    assert not any(t.startswith("response.output_text") for t in types)
    assert done["response"]["output"][0]["content"][0]["type"] == "text"


async def test_wrong_or_missing_token_is_401(server):
    with pytest.raises(InvalidStatus) as e:
        async with sdk_client(server, token="wrong").realtime.connect(model="x"):
            pass
    assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as e:
        await websockets.connect(server.ws_url)
    assert e.value.response.status_code == 401


async def test_browser_subprotocol_handshake(server):
    protocols = ["realtime", f"openai-insecure-api-key.{TOKEN}", "openai-beta.realtime-v1"]
    async with websockets.connect(server.ws_url + "?model=gpt-4o-realtime-preview", subprotocols=protocols) as ws:
        assert ws.subprotocol == "realtime"
        created = await recv_event(ws)
        strict(created, "beta")
        assert "modalities" in created["session"]  # the beta subprotocol chose the beta dialect
    async with websockets.connect(server.ws_url, subprotocols=protocols[:2]) as ws:
        created = await recv_event(ws)
        strict(created, "ga")
        assert created["session"]["type"] == "realtime"
    with pytest.raises(InvalidStatus) as e:
        await websockets.connect(server.ws_url, subprotocols=["realtime", "openai-insecure-api-key.nope"])
    assert e.value.response.status_code == 401


@pytest.mark.slow
async def test_ga_spoken_question_embedded(embedded_backend, question_wav):
    """One GA turn through the embedded default: espeak-ng asks, the answer names Paris."""
    cfg = server_cfg(**{"generation.max_new_tokens": 48})
    pcm16k = wav_pcm16(question_wav)
    async with running_server(cfg, backend=embedded_backend) as srv:
        log: list = []
        client = AsyncOpenAI(api_key="unused", websocket_base_url=srv.ws_url.removesuffix("/realtime"))
        async with client.realtime.connect(model="local") as conn:
            await events_until(conn, "ga", "session.created", log)
            await conn.session.update(session={"type": "realtime", "input_sample_rate": 16000})
            await events_until(conn, "ga", "session.updated", log)
            audio = np.concatenate([pcm16k, silence(1500)])
            for i in range(0, len(audio), 1600):
                await conn.input_audio_buffer.append(audio=b64(audio[i : i + 1600]))
            done = await events_until(conn, "ga", "response.done", log)
    transcript = next(e for e in log if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert "france" in transcript["transcript"].lower()
    assert transcript["usage"]["type"] == "duration" and transcript["usage"]["seconds"] > 1.0
    assert "paris" in done["response"]["output"][0]["content"][0]["text"].lower()


async def test_typed_user_message_and_metrics(server):
    """`conversation.item.create` with input_text is a typed turn; the latency histogram sees the response."""
    import http.client

    log: list = []
    async with sdk_client(server).realtime.connect(model="qwen-local") as conn:
        await events_until(conn, "ga", "session.created", log)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}
        await conn.conversation.item.create(item=item)
        added = await events_until(conn, "ga", "conversation.item.added", log)
        assert added["item"]["content"][0]["text"] == "Hello there"
        await conn.response.create()
        done = await events_until(conn, "ga", "response.done", log)
        assert done["response"]["status"] in ("completed", "incomplete")
    conn_http = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
    # /metrics needs the token, like the realtime endpoint (server.metrics_public is off)
    await asyncio.to_thread(conn_http.request, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    body = (await asyncio.to_thread(conn_http.getresponse)).read().decode()
    count = [ln for ln in body.splitlines() if ln.startswith("assistant_server_commit_to_first_text_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1
