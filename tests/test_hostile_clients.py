"""What a hostile or careless network does to the WebSocket/HTTP port (issue: nothing a client does takes the server
down, locks others out or loses a turn silently). Real server on port 0, tiny random Qwen-Audio model; each test
would have failed before the fix it guards."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.realtime.session import Session
from assistant.transport.server import running_server
from tests.server_util import TIMEOUT_S, make_cfg, recv_event, recv_until, send_json


@pytest.fixture
async def server(server_tiny_backend):
    async with running_server(make_cfg(**{"server.token": "tok"}), backend=server_tiny_backend) as srv:
        yield srv


def raw_http(port: int, data: bytes) -> bytes:
    """Send raw bytes (without half-closing, as HTTP clients do), return everything the server answers before it
    closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(data)
        if not data:
            s.shutdown(socket.SHUT_WR)  # a port scanner: connect and go
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


async def http(port: int, data: bytes) -> bytes:
    return await asyncio.to_thread(raw_http, port, data)


async def test_every_http_request_gets_a_status_line(server, caplog):
    caplog.set_level(logging.INFO)
    port = server.port
    cases = [
        (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # over websockets' line limit
        (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # over ours
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # a name the filesystem refuses
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n", 400),  # a TLS hello on the plain port
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ]
    for request, expected in cases:
        answer = await http(port, request)
        assert status_of(answer) == expected, (request[:40], answer[:120])
    assert await http(port, b"") == b""  # a port scanner's connect-and-close: nothing to answer
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    refused = [r for r in caplog.records if "refused a request from" in r.getMessage()]
    assert refused and all("\n" not in r.getMessage() and not r.exc_info for r in refused)


async def test_metrics_need_the_token_unless_public(server, server_tiny_backend):
    denied = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    allowed = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
    assert status_of(denied) == 401 and status_of(allowed) == 200 and b"assistant_server_sessions" in allowed
    cfg = make_cfg(**{"server.token": "tok", "server.metrics_public": True})
    async with running_server(cfg, engine=server.engine) as public:
        assert status_of(await http(public.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


async def open_ws(srv):
    ws = await websockets.connect(srv.ws_url, additional_headers={"Authorization": "Bearer tok"})
    assert (await recv_event(ws))["type"] == "session.created"
    return ws


async def ask(ws) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}
    await send_json(ws, {"type": "conversation.item.create", "item": item})
    await send_json(ws, {"type": "response.create"})
    return await recv_until(ws, "response.done")


MALFORMED = [
    '{"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "user", "content": 5}}',
    '{"type": "session.update", "event_id": "e2", "session": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"type": "session.update", "event_id": "e3", "session": {"temperature": ' + "9" * 5000 + "}}",
    '{"type": "session.update", "event_id": "e4", "session": {"temperature": NaN}}',
    '{"type": "session.update", "event_id": "e5", "session": {"audio": {"input": {"turn_detection": '
    '{"threshold": Infinity}}}}}',
]


async def test_malformed_events_get_an_error_and_the_session_goes_on(server):
    ws = await open_ws(server)
    for frame in MALFORMED:
        await ws.send(frame)
        err = await recv_event(ws)
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", (frame[:60], err)
        assert err["error"]["event_id"] == frame.split('"event_id": "')[1].split('"')[0]  # even when not JSON
    done = await ask(ws)
    assert done["response"]["status"] in ("completed", "incomplete")
    await ws.close()


async def test_an_unexpected_error_is_logged_once_and_closes_1011_others_go_on(server, caplog, monkeypatch):
    calls = {"n": 0}
    real = Session.receive_event

    def broken(self, raw, now_s):
        if isinstance(raw, str) and "boom" in raw:
            calls["n"] += 1
            raise RuntimeError("a bug")
        return real(self, raw, now_s)

    monkeypatch.setattr(Session, "receive_event", broken)
    caplog.set_level(logging.INFO)
    victim, bystander = await open_ws(server), await open_ws(server)
    await victim.send('{"type": "boom"}')
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(victim.recv(), TIMEOUT_S)
    assert closed.value.rcvd.code == 1011
    logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(logged) == 1 and "sess_" in logged[0].getMessage() and calls["n"] == 1
    assert (await ask(bystander))["response"]["status"] in ("completed", "incomplete")
    await bystander.close()


CLIENT_EVENTS = st.one_of(
    st.builds(
        lambda t: {"type": t},
        st.sampled_from(
            [
                "input_audio_buffer.commit",
                "input_audio_buffer.clear",
                "response.create",
                "response.cancel",
                "conversation.reset",
                "nonsense",
                "session.update",
            ]
        ),
    ),  # fmt: skip
    st.fixed_dictionaries(
        {
            "type": st.just("session.update"),
            "session": st.dictionaries(
                st.sampled_from(
                    ["temperature", "instructions", "turn_detection", "audio", "max_output_tokens", "voice"]
                ),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(),
                    st.floats(),
                    st.text(max_size=20),
                    st.lists(st.integers()),
                    st.dictionaries(st.text(max_size=8), st.integers()),
                ),
            ),
        }
    ),  # fmt: skip
    st.fixed_dictionaries(
        {
            "type": st.just("conversation.item.create"),
            "item": st.one_of(
                st.integers(),
                st.fixed_dictionaries(
                    {
                        "type": st.just("message"),
                        "role": st.just("user"),
                        "content": st.one_of(
                            st.text(),
                            st.lists(
                                st.fixed_dictionaries({"type": st.just("input_text"), "text": st.text(max_size=30)}),
                                max_size=2,
                            ),
                        ),
                    }
                ),
            ),
        }
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"type": st.just("input_audio_buffer.append"), "audio": st.one_of(st.text(max_size=12), st.integers())}
    ),  # fmt: skip
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(CLIENT_EVENTS, st.binary(max_size=64), st.text(max_size=40)), max_size=25))
async def test_random_client_events_never_take_the_server_down(server, events):
    ws, bystander = await open_ws(server), await open_ws(server)
    for ev in events:
        await ws.send(json.dumps(ev, allow_nan=True) if isinstance(ev, dict) else ev)
    await send_json(ws, {"type": "conversation.reset"})
    await send_json(ws, {"type": "input_audio_buffer.clear"})  # its reply marks the end of the synchronous replies
    seen: list[dict] = []
    clears = sum(isinstance(e, dict) and e.get("type") == "input_audio_buffer.clear" for e in events) + 1
    for _ in range(clears):
        await recv_until(ws, "input_audio_buffer.cleared", seen)
    created = lambda: [e["response"]["id"] for e in seen if e["type"] == "response.created"]  # noqa: E731
    done = lambda: [e["response"]["id"] for e in seen if e["type"] == "response.done"]  # noqa: E731
    while len(done()) < len(created()):  # answers the fuzz started end (the reset cancelled them)
        seen.append(await recv_event(ws))
    assert sorted(created()) == sorted(done()) and len(set(done())) == len(done())
    for e in seen:
        json.dumps(e, allow_nan=False)  # the server never sends NaN, whatever it was sent
    # whatever came before, the session still answers, and so does everyone else
    assert (await ask(ws))["response"]["status"] in ("completed", "incomplete")
    assert (await ask(bystander))["response"]["status"] in ("completed", "incomplete")
    await ws.close()
    await bystander.close()
