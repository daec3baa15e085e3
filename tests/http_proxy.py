"""A TCP proxy in front of a real HTTP server, for the `openai` backend's tests: it forwards bytes both ways unchanged
(as a load balancer or a network hop would), records the JSON body of every chat request it forwards, and can be
killed (every connection reset at once, the port closed) and started again on the same port.

It runs on its own thread and event loop, so one proxy serves every test of a module whatever loop each test runs.

    proxy = RecordingProxy(target_port=vllm.port).start()
    proxy.api_url                 # "http://127.0.0.1:PORT/v1"
    proxy.chat_bodies             # [request JSON, ...] in the order they were forwarded
    proxy.kill(); proxy.start()
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

CHAT_PATH = b"/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RequestLog:
    """Parses the client->server bytes of one connection into HTTP/1.1 requests (Content-Length bodies: what
    httpx sends for JSON) and appends each chat request's JSON body."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return  # the body is still arriving
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            method, path = head[0].split(" ")[:2]
            if method == "POST" and path.encode().endswith(CHAT_PATH):
                self.bodies.append(json.loads(body))


class RecordingProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port, self.host = target_port, host
        self.port = _free_port()
        self.chat_bodies: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def start(self) -> RecordingProxy:
        self._run(self._start())
        return self

    def kill(self) -> None:
        """Stop listening and reset every open connection at once (no graceful close, as when a host dies)."""
        self._run(self._kill())

    def close(self) -> None:
        self.kill()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)

    async def _kill(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._transports):
            t.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair
        log = _RequestLog(self.chat_bodies)
        try:
            await asyncio.gather(_pipe(reader, up_writer, log.feed), _pipe(up_reader, writer, None))
        finally:
            self._transports -= pair


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: Any) -> None:
    try:
        while data := await reader.read(65536):
            if tap is not None:
                tap(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
