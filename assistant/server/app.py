"""The asyncio server on one port: `/v1/realtime` WebSocket, `GET /` browser files, `/healthz`, `/metrics`.

Owner: engineer D. `serve(cfg)` is the `python -m assistant serve` entry point: it starts listening at once (health
says 503), loads the backend on a thread (never on the loop), starts the engine, optionally the MQTT bridge, and
shuts down gracefully on SIGINT/SIGTERM. `running_server(cfg, backend=...)` starts the same server for tests on an
already-loaded backend (use `server.port = 0`):

    async with running_server(cfg.replace(**{"server.port": 0}), backend=backend) as srv:
        srv.ws_url      # "ws://127.0.0.1:PORT/v1/realtime"
        srv.http_url    # "http://127.0.0.1:PORT"
        srv.hub         # the SessionHub (also what the MQTT bridge uses)

Per connection: the receive loop and the send loop run together and the survivor is cancelled. Outgoing events go
through a bounded queue (`server.send_queue_events`); a client that falls that far behind is closed with 1008.
Handshake: auth (Bearer / ?token= / `openai-insecure-api-key.<key>` subprotocol, constant-time compare, else HTTP
401), allowed origins (else 403), 503 while the model loads; the dialect is beta with `OpenAI-Beta: realtime=v1` or
the `openai-beta.realtime-v1` subprotocol, else GA.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import mimetypes
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from assistant.config import Config
from assistant.server.session import SessionHub, SessionLimitReached

log = logging.getLogger("assistant.server")

REALTIME_PATH = "/v1/realtime"
BROWSER_DIR = Path(__file__).resolve().parent.parent.parent / "clients" / "browser"
HARD_SIZE_FACTOR = 4  # messages up to 4x max_message_bytes get an error event; beyond it the socket closes (1009)
CLOSE_TIMEOUT_S = 5.0
_CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html"}

CLOSE_SLOW_CLIENT = 1008  # policy violation: the client does not read its events
CLOSE_BUSY = 1013  # try again later
CLOSE_GOING_AWAY = 1001


@dataclass
class RunningServer:
    host: str
    port: int
    ws_url: str
    http_url: str
    hub: SessionHub
    engine: Any
    app: AssistantServer


def _beta_requested(request: Request) -> bool:
    header = request.headers.get("OpenAI-Beta", "")
    protocols = _offered_subprotocols(request)
    return "realtime=v1" in header.replace(" ", "") or "openai-beta.realtime-v1" in protocols


def _offered_subprotocols(request: Request) -> list[str]:
    return [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol") for p in v.split(",") if p.strip()]


def _response(connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    resp = connection.respond(status, "")
    resp.body = body
    for name in ("Content-Type", "Content-Length"):
        del resp.headers[name]
    resp.headers["Content-Type"] = content_type
    resp.headers["Content-Length"] = str(len(body))
    resp.headers["Cache-Control"] = "no-cache"
    return resp


class AssistantServer:
    """HTTP routing, handshake policy and the per-connection loops. The engine is attached once loaded."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hub: SessionHub | None = None
        self.engine: Any = None
        self._server: Server | None = None
        self._connections: set[asyncio.Event] = set()  # one shutdown signal per open connection
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.cfg.server
        ssl_ctx = None
        if s.tls_cert:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(s.tls_cert, s.tls_key)
        self._server = await ws_serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            select_subprotocol=lambda conn, offered: "realtime" if "realtime" in offered else None,
            max_size=s.max_message_bytes * HARD_SIZE_FACTOR,
            ssl=ssl_ctx,
            close_timeout=CLOSE_TIMEOUT_S,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    def attach(self, engine: Any, model_name: str = "local") -> SessionHub:
        self.engine = engine
        self.hub = SessionHub(self.cfg, engine, model_name)
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
            if self.ready:
                return connection.respond(200, "ok\n")
            return connection.respond(503, "loading the model\n")
        if url.path == "/metrics":
            body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
            return _response(connection, 200, body, prometheus_client.CONTENT_TYPE_LATEST)
        if url.path in (REALTIME_PATH, REALTIME_PATH + "/"):
            if not self._authorized(request, parse_qs(url.query)):
                return connection.respond(401, "missing or wrong token: send Authorization: Bearer <token>\n")
            if not self.ready:
                return connection.respond(503, "the model is still loading; retry when /healthz says ok\n")
            if "websocket" not in request.headers.get("Upgrade", "").lower():
                return connection.respond(426, "this endpoint speaks WebSocket (OpenAI Realtime protocol)\n")
            return None
        return self._static(connection, url.path)

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

    def _static(self, connection: ServerConnection, path: str) -> Response:
        root = BROWSER_DIR.resolve()
        rel = path.lstrip("/") or "index.html"
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return connection.respond(404, f"not found: {path}\n")
        ctype = _CONTENT_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        return _response(connection, 200, target.read_bytes(), ctype)

    # ---- WebSocket side ----------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert self.hub is not None and ws.request is not None
        dialect = "beta" if _beta_requested(ws.request) else "ga"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.cfg.server.send_queue_events)
        overflow = asyncio.Event()

        def send(event: dict[str, Any]) -> None:
            if overflow.is_set():
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                overflow.set()

        try:
            session = self.hub.create_session(send, dialect)
        except SessionLimitReached as e:
            await ws.send(json.dumps(self.hub.busy_error(dialect, str(e))))
            await ws.close(CLOSE_BUSY, "server busy: too many sessions")
            return
        stop = asyncio.Event()
        self._connections.add(stop)
        tasks = [
            asyncio.create_task(self._send_loop(ws, queue)),
            asyncio.create_task(self._recv_loop(ws, session)),
            asyncio.create_task(overflow.wait()),
            asyncio.create_task(stop.wait()),
        ]
        try:
            await session.start()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[2] in done:
                limit = self.cfg.server.send_queue_events
                log.warning("session %s: client too slow (%d events unread), closing", session.id, limit)
                await self._close(ws, CLOSE_SLOW_CLIENT, f"client too slow: {limit} events unread")
            elif tasks[3] in done:
                await session.close()  # emits the last response.done, then the queue is flushed
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    await asyncio.wait_for(self._drain(ws, queue), CLOSE_TIMEOUT_S)
                await self._close(ws, CLOSE_GOING_AWAY, "server shutting down")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._connections.discard(stop)
            await session.close()

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionClosed):
            ws.transport.abort()  # a stalled peer cannot hold the close forever

    async def _drain(self, ws: ServerConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while not queue.empty():
            await ws.send(json.dumps(queue.get_nowait()))

    async def _send_loop(self, ws: ServerConnection, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                event = await queue.get()
                await ws.send(json.dumps(event))

    async def _recv_loop(self, ws: ServerConnection, session: Any) -> None:
        idle_s = self.cfg.server.idle_timeout_s
        limit = self.cfg.server.max_message_bytes
        with contextlib.suppress(ConnectionClosed):
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), idle_s)
                except TimeoutError:
                    await self._close(ws, 1000, f"idle timeout: nothing received for {idle_s:g} s")
                    return
                if len(message) > limit:
                    session.reject_oversized(len(message))
                elif isinstance(message, bytes):
                    await session.handle_audio(message)
                else:
                    await session.handle_text(message)


@contextlib.asynccontextmanager
async def running_server(cfg: Config, backend: Any = None, engine: Any = None) -> AsyncIterator[RunningServer]:
    """A real server on `cfg.server.host:port` around an already-loaded `backend` (or a started `engine`)."""
    from assistant.engine.engine import Engine

    own_engine = engine is None
    if own_engine:
        engine = Engine(backend, cfg.engine, cfg.generation)
        await engine.start()
    app = AssistantServer(cfg)
    await app.start()
    hub = app.attach(engine)
    scheme = "wss" if cfg.server.tls_cert else "ws"
    host = cfg.server.host
    try:
        yield RunningServer(
            host=host,
            port=app.port,
            ws_url=f"{scheme}://{host}:{app.port}{REALTIME_PATH}",
            http_url=f"{'https' if scheme == 'wss' else 'http'}://{host}:{app.port}",
            hub=hub,
            engine=engine,
            app=app,
        )
    finally:
        await app.shutdown()
        if own_engine:
            await engine.stop()


def serve(cfg: Config) -> int:
    """`python -m assistant serve`: run until SIGINT/SIGTERM; 0 on a clean stop, 1 if the model failed to load."""
    return asyncio.run(_serve_main(cfg))


async def _serve_main(cfg: Config) -> int:
    from assistant.backends import load_backend
    from assistant.engine.engine import Engine
    from assistant.engine.fresh_thread import run_in_fresh_thread

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = AssistantServer(cfg)
    await app.start()
    scheme = "https" if cfg.server.tls_cert else "http"
    shown_host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "") else cfg.server.host
    base = f"{scheme}://{shown_host}:{app.port}"
    print(f"Voice assistant: open {base}/ in a browser (WebSocket {base.replace('http', 'ws', 1)}{REALTIME_PATH})")
    print(f"Loading the {cfg.model.backend} model; {base}/healthz answers 200 once it is ready.", flush=True)
    engine = None
    mqtt_task: asyncio.Task[Any] | None = None
    status = 0
    try:
        # Not asyncio.to_thread: its pool thread outlives the load and would slow the engine (see fresh_thread.py).
        load = asyncio.create_task(run_in_fresh_thread(load_backend, cfg))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info("stopped while loading the model")
            waiter.cancel()
            return 0  # the loading thread is a daemon: it does not hold up the exit
        waiter.cancel()
        try:
            backend = load.result()
        except Exception as e:
            log.error("could not load the %s model: %s", cfg.model.backend, e)
            print(f"error: could not load the model: {e}", flush=True)
            return 1
        engine = Engine(backend, cfg.engine, cfg.generation)
        await engine.start()
        hub = app.attach(engine, model_name=cfg.model.backend)
        if cfg.mqtt.url:
            from assistant.mqtt_bridge import run_mqtt_bridge

            mqtt_task = asyncio.create_task(run_mqtt_bridge(cfg, hub, stop))
        print(f"Ready: {base}/", flush=True)
        await stop.wait()
    finally:
        log.info("shutting down")
        await app.shutdown()
        if mqtt_task is not None:
            stop.set()
            try:
                await asyncio.wait_for(mqtt_task, cfg.server.shutdown_grace_s + CLOSE_TIMEOUT_S)
            except Exception as e:  # the bridge's failure must not hide a clean server stop
                log.warning("MQTT bridge ended with %r", e)
        if engine is not None:
            await engine.stop()
    return status
