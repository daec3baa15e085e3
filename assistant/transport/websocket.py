"""The WebSocket + HTTP transport on one port: `/v1/realtime` (the OpenAI Realtime protocol), `GET /` (the browser
client's files), `/healthz`, `/metrics`. A thin shell: frames go to a `Connection` (the session core's driver),
server events come back through a bounded queue.

Per connection: the receive loop and the send loop run together and the survivor is cancelled. Outgoing events go
through a bounded queue (`server.send_queue_events`); a client that falls that far behind is closed with 1008.
Handshake: auth (Bearer / ?token= / `openai-insecure-api-key.<key>` subprotocol, constant-time compare, else HTTP
401), allowed origins (else 403), 503 while the model loads; the dialect is beta with `OpenAI-Beta: realtime=v1` or
the `openai-beta.realtime-v1` subprotocol, else GA. Close codes: 1000 idle timeout (the hub's sweep), 1001 server
shutdown, 1008 client too slow, 1009 message far over the size limit, 1013 no session slot free.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from assistant.config import Config
from assistant.realtime.events import encode_event
from assistant.transport.connection import Connection
from assistant.transport.http import HttpConnection, http_response, static_file
from assistant.transport.hub import SessionHub, SessionLimitReached
from assistant.transport.tls import server_context

log = logging.getLogger("assistant.server")

REALTIME_PATH = "/v1/realtime"
BROWSER_DIR = Path(__file__).resolve().parent.parent.parent / "clients" / "browser"
HARD_SIZE_FACTOR = 4  # messages up to 4x max_message_bytes get an error event; beyond it the socket closes (1009)
CLOSE_TIMEOUT_S = 5.0

CLOSE_SLOW_CLIENT = 1008  # policy violation: the client does not read its events
CLOSE_BUSY = 1013  # try again later
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011


def _beta_requested(request: Request) -> bool:
    header = request.headers.get("OpenAI-Beta", "")
    protocols = _offered_subprotocols(request)
    return "realtime=v1" in header.replace(" ", "") or "openai-beta.realtime-v1" in protocols


def _offered_subprotocols(request: Request) -> list[str]:
    return [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol") for p in v.split(",") if p.strip()]


class AssistantServer:
    """HTTP routing, handshake policy and the per-connection loops. The engine is attached once loaded."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hub: SessionHub | None = None
        self.engine: Any = None
        self._server: Server | None = None
        self._connections: set[asyncio.Event] = set()  # one shutdown signal per open connection
        self.port = 0
        # name -> callable giving a problem description or None; /healthz answers 503 naming every problem
        # (e.g. "mqtt": the MQTT bridge is down). Registered by whoever runs that part (transport/server.py).
        self.health_checks: dict[str, Callable[[], str | None]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.cfg.server
        ssl_ctx = server_context(s.tls_cert, s.tls_key) if s.tls_cert else None
        self._server = await ws_serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            select_subprotocol=lambda conn, offered: "realtime" if "realtime" in offered else None,
            max_size=s.max_message_bytes * HARD_SIZE_FACTOR,
            ssl=ssl_ctx,
            close_timeout=CLOSE_TIMEOUT_S,
            create_connection=HttpConnection,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    def attach(self, engine: Any, model_name: str = "local", speech: Any = None) -> SessionHub:
        """Serve sessions on `engine`; `speech` is the shared voice pool (None: answers are text only)."""
        self.engine = engine
        self.hub = SessionHub(self.cfg, engine, model_name, speech)
        return self.hub

    @property
    def ready(self) -> bool:
        return self.hub is not None and bool(getattr(self.engine, "ready", False))

    async def shutdown(self) -> None:
        """Stop accepting, let responses finish (grace), cancel the rest, close every socket with 1001."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        if self.hub is not None:
            await self.hub.shutdown(self.cfg.server.shutdown_grace_s)
        for stop in list(self._connections):
            stop.set()
        await self._server.wait_closed()
        self._server = None

    # ---- HTTP side ---------------------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        allowed = self.cfg.server.allowed_origins
        origin = request.headers.get("Origin")
        if allowed and origin is not None and origin not in allowed:
            return connection.respond(403, f"origin {origin!r} is not in server.allowed_origins\n")
        if url.path == "/healthz":
            if not self.ready:
                return connection.respond(503, "loading the model\n")
            problems = [f"{name}: {p}" for name, check in self.health_checks.items() if (p := check())]
            if problems:
                return connection.respond(503, "".join(f"{p}\n" for p in problems))
            return connection.respond(200, "ok\n")
        if url.path == "/metrics":
            if not (self.cfg.server.metrics_public or self._authorized(request, parse_qs(url.query))):
                msg = "/metrics needs the token (Authorization: Bearer <token>), or set server.metrics_public = true\n"
                return connection.respond(401, msg)
            body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
            return http_response(connection, 200, body, prometheus_client.CONTENT_TYPE_LATEST)
        if url.path in (REALTIME_PATH, REALTIME_PATH + "/"):
            if not self._authorized(request, parse_qs(url.query)):
                return connection.respond(401, "missing or wrong token: send Authorization: Bearer <token>\n")
            if not self.ready:
                return connection.respond(503, "the model is still loading; retry when /healthz says ok\n")
            if "websocket" not in request.headers.get("Upgrade", "").lower():
                return connection.respond(426, "this endpoint speaks WebSocket (OpenAI Realtime protocol)\n")
            return None
        return static_file(connection, BROWSER_DIR.resolve(), url.path)

    def _authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        token = self.cfg.server.token
        if not token:
            return True
        candidates = list(query.get("token", []))
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(auth[7:].strip())
        prefix = "openai-insecure-api-key."
        candidates += [p[len(prefix) :] for p in _offered_subprotocols(request) if p.startswith(prefix)]
        expected = token.encode()
        # compare_digest on every candidate: no early exit that would leak which one matched or how far.
        return any([hmac.compare_digest(c.encode(), expected) for c in candidates])

    # ---- WebSocket side ----------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert self.hub is not None and ws.request is not None
        dialect = "beta" if _beta_requested(ws.request) else "ga"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.cfg.server.send_queue_events)
        overflow = asyncio.Event()
        stop = asyncio.Event()

        def send(event: dict[str, Any]) -> None:
            if overflow.is_set():
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                overflow.set()

        async def close(code: int, reason: str) -> None:
            await self._close(ws, code, reason)

        try:
            conn = self.hub.open("websocket", send, close, dialect)
        except SessionLimitReached as e:
            await ws.send(encode_event(self.hub.busy_error(dialect, str(e))))
            await ws.close(CLOSE_BUSY, "server busy: too many sessions")
            return
        self._connections.add(stop)
        tasks = [
            asyncio.create_task(self._send_loop(ws, queue)),
            asyncio.create_task(self._recv_loop(ws, conn)),
            asyncio.create_task(overflow.wait()),
            asyncio.create_task(stop.wait()),
        ]
        try:
            await conn.start()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[2] in done:
                limit = self.cfg.server.send_queue_events
                log.warning("session %s: client too slow (%d events unread), closing", conn.id, limit)
                await self._close(ws, CLOSE_SLOW_CLIENT, f"client too slow: {limit} events unread")
            elif tasks[3] in done:
                await conn.close()  # emits the last response.done, then the queue is flushed
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    await asyncio.wait_for(self._drain(ws, queue), CLOSE_TIMEOUT_S)
                await self._close(ws, CLOSE_GOING_AWAY, "server shutting down")
            else:
                for t in done:
                    t.result()  # an unexpected error in a loop: logged below, closed with 1011
        except Exception:
            log.exception("session %s: unexpected error; closing with 1011", conn.id)
            await self._close(ws, CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._connections.discard(stop)
            await conn.close()

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionClosed):
            ws.transport.abort()  # a stalled peer cannot hold the close forever

    async def _drain(self, ws: ServerConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while not queue.empty():
            await ws.send(encode_event(queue.get_nowait()))

    async def _send_loop(self, ws: ServerConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                event = await queue.get()
                await ws.send(encode_event(event))

    async def _recv_loop(self, ws: ServerConnection, conn: Connection) -> None:
        limit = self.cfg.server.max_message_bytes
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if len(message) > limit:
                    conn.reject_oversized(len(message))
                elif isinstance(message, bytes):
                    conn.receive_audio(message)
                else:
                    conn.receive_text(message)
