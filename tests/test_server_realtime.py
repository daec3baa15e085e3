"""Real server on port 0 with the tiny random Qwen-Audio model: turns, barge-in, push-to-talk, bad input, limits."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket

import numpy as np
import pytest
import websockets
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter
from websockets.exceptions import ConnectionClosed, InvalidStatus

from assistant.realtime import protocol as P
from assistant.transport.server import running_server
from assistant.transport.websocket import AssistantServer
from tests.server_util import (
    TIMEOUT_S,
    b64,
    chunks,
    make_cfg,
    recv_event,
    recv_until,
    send_json,
    silence,
    vowel,
    wav_pcm16,
)


@pytest.fixture
async def server(server_tiny_backend):
    async with running_server(make_cfg(), backend=server_tiny_backend) as srv:
        yield srv


async def connect(srv, **kw):
    ws = await websockets.connect(srv.ws_url, **kw)
    created = await recv_event(ws)
    assert created["type"] == "session.created"
    return ws


async def ptt_session(srv, rate_hz=16000):
    ws = await connect(srv)
    session = {"input_sample_rate": rate_hz, "audio": {"input": {"turn_detection": None}}}
    await send_json(ws, {"type": "session.update", "session": session})
    updated = await recv_until(ws, "session.updated")
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    return ws


async def ptt_turn(ws, ms=600, rate_hz=16000, log=None):
    await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(vowel(ms, rate_hz))})
    await send_json(ws, {"type": "input_audio_buffer.commit"})
    await send_json(ws, {"type": "response.create"})
    return await recv_until(ws, "response.done", log)


async def test_http_routes(server):
    def get(path):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()

    status, _, body = await asyncio.to_thread(get, "/healthz")
    assert status == 200 and body == b"ok\n"
    status, ctype, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and b"assistant_server_sessions" in body
    status, ctype, body = await asyncio.to_thread(get, "/")
    assert status == 200 and ctype.startswith("text/html") and b"<" in body
    for bad in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/nope.js"):
        status, _, _ = await asyncio.to_thread(get, bad)
        assert status == 404, bad
    status, _, _ = await asyncio.to_thread(get, "/v1/realtime")  # plain GET, no upgrade
    assert status == 426


async def test_healthz_503_before_model(server_tiny_backend):
    app = AssistantServer(make_cfg())
    await app.start()
    try:
        with pytest.raises(InvalidStatus) as e:
            await websockets.connect(f"ws://127.0.0.1:{app.port}/v1/realtime")
        assert e.value.response.status_code == 503
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=TIMEOUT_S)
        await asyncio.to_thread(conn.request, "GET", "/healthz")
        assert (await asyncio.to_thread(conn.getresponse)).status == 503
    finally:
        await app.shutdown()


async def test_server_vad_full_turn(server):
    ws = await connect(server)
    await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
    await recv_until(ws, "session.updated")
    audio = np.concatenate([silence(500), vowel(1000), silence(1200)])
    for frame in chunks(audio):
        await ws.send(frame)
    log = []
    done = await recv_until(ws, "response.done", log)
    types = [e["type"] for e in log]
    for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"):
        assert types.count(t) == 1, types
    started = next(e for e in log if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in log if e["type"] == "input_audio_buffer.speech_stopped")
    committed = next(e for e in log if e["type"] == "input_audio_buffer.committed")
    # onset at 500 ms (within two frames); end at 1500 ms plus webrtcvad's own hangover (it keeps ~100 ms voiced)
    assert 440 <= started["audio_start_ms"] <= 560 and 1440 <= stopped["audio_end_ms"] <= 1700
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert types.index("input_audio_buffer.committed") < types.index("response.created") < len(types) - 1
    deltas = "".join(e["delta"] for e in log if e["type"] == "response.output_text.delta")
    assert done["response"]["status"] in ("completed", "incomplete")
    assert done["response"]["output"][0]["content"][0]["text"] == deltas.strip()
    assert done["response"]["usage"]["output_tokens"] >= 1
    assert "conversation.item.input_audio_transcription.completed" not in types  # qwen-audio gives no transcript
    ids = [e["event_id"] for e in log]
    assert len(set(ids)) == len(ids)
    adapter = TypeAdapter(RealtimeServerEvent)
    for e in log:
        assert adapter.validate_python(e, strict=True).type == e["type"]
    await ws.close()


async def test_barge_in_cancels_streaming_answer(server_tiny_backend):
    cfg = make_cfg(**{"generation.max_new_tokens": 4000})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        ws = await connect(srv)
        session = {"input_sample_rate": 16000, "audio": {"input": {"turn_detection": {"silence_duration_ms": 300}}}}
        await send_json(ws, {"type": "session.update", "session": session})
        await recv_until(ws, "session.updated")
        for frame in chunks(np.concatenate([vowel(800), silence(600)])):
            await ws.send(frame)
        first = await recv_until(ws, "response.output_text.delta")
        for frame in chunks(np.concatenate([vowel(800), silence(600)])):
            await ws.send(frame)
        log = []
        done = await recv_until(ws, "response.done", log)
        assert done["response"]["id"] == first["response_id"]
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert "input_audio_buffer.speech_started" in [e["type"] for e in log]
        # the interrupting turn is answered in its own response (cancel it too: the limit is long)
        second = await recv_until(ws, "response.created")
        assert second["response"]["id"] != first["response_id"]
        await send_json(ws, {"type": "response.cancel"})
        done2 = await recv_until(ws, "response.done")
        assert done2["response"]["status"] == "cancelled"
        assert done2["response"]["status_details"]["reason"] == "client_cancelled"
        await ws.close()


async def test_push_to_talk_answers_only_on_response_create(server):
    ws = await ptt_session(server, rate_hz=24000)
    log = []
    done = await ptt_turn(ws, rate_hz=24000, log=log)
    types = [e["type"] for e in log]
    assert types.count("input_audio_buffer.committed") == 1 and types.count("response.created") == 1
    assert "error" not in types and "input_audio_buffer.speech_started" not in types
    first_tokens = done["response"]["usage"]["input_tokens"]
    # second turn: history grows
    done2 = await ptt_turn(ws, rate_hz=24000)
    assert done2["response"]["usage"]["input_tokens"] > first_tokens
    # conversation.reset: history dropped, the next turn's prompt is the first turn's size again
    await send_json(ws, {"type": "conversation.reset"})
    done3 = await ptt_turn(ws, rate_hz=24000)
    assert done3["response"]["usage"]["input_tokens"] == first_tokens
    # instructions replace the system prompt
    await send_json(ws, {"type": "session.update", "session": {"instructions": "Be brief. " * 20}})
    await recv_until(ws, "session.updated")
    await send_json(ws, {"type": "conversation.reset"})
    done4 = await ptt_turn(ws, rate_hz=24000)
    assert done4["response"]["usage"]["input_tokens"] > first_tokens
    await ws.close()


def update(session):
    return json.dumps({"type": "session.update", "session": session})


BAD_INPUTS = [
    ("not json{", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    (json.dumps({"type": "no.such.event", "event_id": "c1"}), "unknown_event"),
    (json.dumps({"event_id": "c2"}), "invalid_event"),
    (update({"turn_detection": {"silence_duration_ms": "x"}}), "invalid_event"),
    (update({"turn_detection": {"aggressiveness": 7}}), "invalid_event"),
    (update({"input_sample_rate": 96000}), "sample_rate_out_of_range"),
    (update({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 4000}}}}), "sample_rate_out_of_range"),
    (update({"input_audio_format": "g711_ulaw"}), "unsupported_audio_format"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@notbase64"}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_event"),
    (b"\x01\x02\x03", "invalid_audio"),
    (b"\x00" * 70000, "message_too_large"),
    (json.dumps({"type": "input_audio_buffer.commit", "event_id": "c3"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "output_audio_buffer.clear"}), "audio_output_unsupported"),
    (json.dumps({"type": "conversation.item.delete", "item_id": "x"}), "item_not_found"),
    (json.dumps({"type": "session.close"}), "unsupported_event"),
]


async def test_bad_input_gets_error_and_session_goes_on(server_tiny_backend):
    cfg = make_cfg(**{"server.max_message_bytes": 65536})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        ws = await ptt_session(srv)
        for message, code in BAD_INPUTS:
            await ws.send(message)
            err = await recv_event(ws)
            assert err["type"] == "error", (message, err)
            assert err["error"]["code"] == code, (message, err)
            assert err["error"]["message"]
            sent = json.loads(message) if isinstance(message, str) and message.startswith("{") else {}
            assert err["error"]["event_id"] == sent.get("event_id")
        # audio output in session.update: an error, yet the update applies (text only)
        await ws.send(update({"output_modalities": ["audio"], "instructions": "x"}))
        assert (await recv_event(ws))["error"]["code"] == "audio_output_unsupported"
        updated = await recv_event(ws)
        assert updated["type"] == "session.updated" and updated["session"]["output_modalities"] == ["text"]
        assert updated["session"]["instructions"] == "x"
        # a second response.create while one runs is refused, the running one still finishes
        await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(vowel(500))})
        await send_json(ws, {"type": "input_audio_buffer.commit"})
        await send_json(ws, {"type": "response.create"})
        await send_json(ws, {"type": "response.create", "event_id": "dup"})
        log = []
        await recv_until(ws, "response.done", log)
        errors = [e for e in log if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["conversation_already_has_active_response"]
        assert sum(e["type"] == "response.done" for e in log) == 1
        # and the session still works
        done = await ptt_turn(ws)
        assert done["response"]["status"] in ("completed", "incomplete")
        await ws.close()


async def test_input_audio_buffer_clear(server):
    ws = await ptt_session(server)
    await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(vowel(500))})
    await send_json(ws, {"type": "input_audio_buffer.clear"})
    assert (await recv_event(ws))["type"] == "input_audio_buffer.cleared"
    await send_json(ws, {"type": "input_audio_buffer.commit"})
    assert (await recv_event(ws))["error"]["code"] == "input_audio_buffer_commit_empty"
    await ws.close()


async def test_session_not_ready_before_start(server):
    sent = []

    async def close(code, reason):
        raise AssertionError("the hub must not close a session that is only being set up")

    session = server.hub.open("websocket", sent.append, close, "ga", 16000)
    try:
        session.receive_audio(vowel(100).tobytes())
        assert sent[0]["type"] == "error" and sent[0]["error"]["code"] == "session_not_ready"
        await session.start()
        assert sent[1]["type"] == "session.created"
    finally:
        await session.close()
    assert session.id not in server.hub.sessions


async def test_auth(server_tiny_backend):
    cfg = make_cfg(**{"server.token": "s3cret"})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        for kw in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}, {"subprotocols": ["realtime"]}):
            with pytest.raises(InvalidStatus) as e:
                await websockets.connect(srv.ws_url, **kw)
            assert e.value.response.status_code == 401
        ok = [
            (srv.ws_url, {"additional_headers": {"Authorization": "Bearer s3cret"}}),
            (srv.ws_url + "?model=x&token=s3cret", {}),
            (srv.ws_url, {"subprotocols": ["realtime", "openai-insecure-api-key.s3cret"]}),
        ]
        for url, kw in ok:
            ws = await websockets.connect(url, **kw)
            assert (await recv_event(ws))["type"] == "session.created"
            if "subprotocols" in kw:
                assert ws.subprotocol == "realtime"
            await ws.close()


async def test_allowed_origins(server_tiny_backend):
    cfg = make_cfg(**{"server.allowed_origins": ["https://home.example"]})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        with pytest.raises(InvalidStatus) as e:
            await websockets.connect(srv.ws_url, origin="https://evil.example")
        assert e.value.response.status_code == 403
        ws = await websockets.connect(srv.ws_url, origin="https://home.example")
        assert (await recv_event(ws))["type"] == "session.created"
        await ws.close()


async def test_server_busy_over_max_sessions(server_tiny_backend):
    async with running_server(make_cfg(**{"server.max_sessions": 1}), backend=server_tiny_backend) as srv:
        first = await connect(srv)
        second = await websockets.connect(srv.ws_url)
        err = await recv_event(second)
        assert err["type"] == "error" and err["error"]["code"] == "server_busy"
        with pytest.raises(ConnectionClosed):
            await recv_event(second)
        assert second.close_code == 1013
        await first.close()
        await asyncio.sleep(0)  # the slot frees when the server sees the close
        for _ in range(100):
            if not srv.hub.sessions:
                break
            await asyncio.sleep(0.05)
        third = await connect(srv)
        await third.close()


async def test_idle_timeout_closes(server_tiny_backend):
    async with running_server(make_cfg(**{"server.idle_timeout_s": 1.0}), backend=server_tiny_backend) as srv:
        ws = await connect(srv)
        with pytest.raises(ConnectionClosed):
            while True:
                await recv_event(ws)
        assert ws.close_code == 1000 and "idle" in ws.close_reason


async def test_slow_client_is_closed(server_tiny_backend):
    cfg = make_cfg(**{"server.send_queue_events": 16})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        # A client that stops reading: max_queue=1 pauses its reads, a 4 kB socket buffer stops the kernel from
        # absorbing much, and no compression (the server would shrink the repetitive replies to nothing).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((srv.host, srv.port))
        sock.setblocking(False)
        stalled = await websockets.connect(srv.ws_url, max_queue=1, sock=sock, compression=None)
        other = await ptt_session(srv)
        bad = json.dumps({"type": "x" * 3000})  # each gets a ~3 kB unknown_event error the client never reads
        with contextlib.suppress(ConnectionClosed):
            for _ in range(4000):  # ~12 MB of replies: more than the server's socket buffer holds
                await stalled.send(bad)
                if len(srv.hub.sessions) == 1:
                    break  # the server dropped the stalled session
        for _ in range(int(TIMEOUT_S / 0.05)):
            if len(srv.hub.sessions) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(srv.hub.sessions) == 1, "the server never closed a client that stopped reading"
        stalled.transport.abort()
        # the other session is unaffected
        done = await ptt_turn(other)
        assert done["response"]["status"] in ("completed", "incomplete")
        await other.close()


async def test_graceful_shutdown_cancels_and_closes(server_tiny_backend):
    cfg = make_cfg(**{"generation.max_new_tokens": 4000, "server.shutdown_grace_s": 0.0})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        ws = await ptt_session(srv)
        await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(vowel(500))})
        await send_json(ws, {"type": "input_audio_buffer.commit"})
        await send_json(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
        shutdown = asyncio.create_task(srv.app.shutdown())
        done = await recv_until(ws, "response.done")
        assert done["response"]["status"] == "cancelled"
        with pytest.raises(ConnectionClosed):
            while True:
                await recv_event(ws)
        assert ws.close_code == 1001
        await asyncio.wait_for(shutdown, TIMEOUT_S)
        with pytest.raises(OSError):
            await websockets.connect(srv.ws_url)


def test_protocol_error_codes_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text()
    for code in P.ERROR_CODES:
        assert f"`{code}`" in doc, code


async def test_serve_cli_sigterm_graceful(tiny_qwen_dir):
    """`python -m assistant serve --port 0` prints the URL, serves, and on SIGTERM closes sockets (1001), exit 0."""
    import re
    import signal
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "assistant", "serve", "--port", "0", "--model", str(tiny_qwen_dir)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=repo, stdout=asyncio.subprocess.PIPE, stderr=None)
    try:
        lines = []
        while not lines or not lines[-1].startswith("Ready"):
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
            assert line, f"serve exited early: {lines}"
            lines.append(line.decode().strip())
        url = re.search(r"(ws://127\.0\.0\.1:\d+/v1/realtime)", lines[0]).group(1)
        ws = await websockets.connect(url)
        assert (await recv_event(ws))["type"] == "session.created"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            while True:
                await recv_event(ws)
        assert ws.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
async def test_tls(server_tiny_backend, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: install Debian's openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    cmd += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT_S)
    cfg = make_cfg(**{"server.tls_cert": str(cert), "server.tls_key": str(key)})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        assert srv.ws_url.startswith("wss://")
        ctx = ssl.create_default_context(cafile=str(cert))
        ws = await websockets.connect(srv.ws_url, ssl=ctx)
        assert (await recv_event(ws))["type"] == "session.created"
        await ws.close()


@pytest.mark.slow
async def test_spoken_question_end_to_end_embedded(embedded_backend, question_wav):
    """espeak-ng asks "What is the capital of France?" over binary frames at 16 kHz; server VAD; the answer: Paris."""
    cfg = make_cfg(**{"generation.max_new_tokens": 48})
    pcm = wav_pcm16(question_wav)
    async with running_server(cfg, backend=embedded_backend) as srv:
        ws = await connect(srv)
        await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
        await recv_until(ws, "session.updated")
        for frame in chunks(np.concatenate([pcm, silence(1500)])):
            await ws.send(frame)
        log = []
        done = await recv_until(ws, "response.done", log)
        await ws.close()
    types = [e["type"] for e in log]
    assert types.count("input_audio_buffer.committed") == 1, types
    transcript = next(e for e in log if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert "capital" in transcript["transcript"].lower() and "france" in transcript["transcript"].lower()
    assert types.index("conversation.item.input_audio_transcription.completed") < types.index("response.created")
    answer = done["response"]["output"][0]["content"][0]["text"]
    assert done["response"]["status"] == "completed" and "paris" in answer.lower(), answer
    assert set(done["response"]["timings_ms"]) >= {"queue", "encode", "prefill", "first_token", "total"}


async def test_barge_in_before_the_answer_started(server):
    """Speech resuming while the committed turn's audio is still being processed: that answer starts cancelled."""
    ws = await connect(server)
    await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
    await recv_until(ws, "session.updated")
    # One frame: turn 1, the 600 ms silence that commits it, then turn 2's onset; the server handles it in one go,
    # before the worker could start turn 1's answer.
    await ws.send(np.concatenate([vowel(800), silence(700), vowel(800), silence(1000)]).astype("<i2").tobytes())
    log = []
    first = await recv_until(ws, "response.done", log)
    assert first["response"]["status"] == "cancelled"
    assert first["response"]["status_details"]["reason"] == "turn_detected"
    second = await recv_until(ws, "response.done", log)
    assert second["response"]["status"] in ("completed", "incomplete")
    types = [e["type"] for e in log]
    assert types.count("input_audio_buffer.committed") == 2 and types.count("response.created") == 2
    await ws.close()


async def test_concurrent_sessions_are_independent(server):
    """Four sessions speak at once; each gets exactly its own turn and one response.done, ids never cross."""

    async def one(k: int) -> list[dict]:
        ws = await connect(server)
        await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
        await recv_until(ws, "session.updated")
        for frame in chunks(np.concatenate([silence(200), vowel(600 + 100 * k), silence(900)])):
            await ws.send(frame)
        log: list[dict] = []
        await recv_until(ws, "response.done", log)
        await ws.close()
        return log

    logs = await asyncio.gather(*(one(k) for k in range(4)))
    response_ids = set()
    for log in logs:
        types = [e["type"] for e in log]
        assert types.count("input_audio_buffer.committed") == 1 and types.count("response.done") == 1
        rid = log[-1]["response"]["id"]
        assert all(e["response_id"] == rid for e in log if e["type"] == "response.output_text.delta")
        response_ids.add(rid)
    assert len(response_ids) == 4
