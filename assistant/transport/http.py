"""The plain-HTTP edge of the one port: what is not a WebSocket upgrade gets a proper HTTP answer, never a dropped
connection, a 500 or an ERROR traceback in the log.

- `HttpConnection`: the websockets connection class the server uses. A request websockets cannot parse gets a
  status line before the connection closes: 405 for methods other than GET (HEAD, POST...), 414 for a request line
  over websockets' 8 KiB line limit, 431 for an oversized header, 400 for anything else that is not HTTP (a TLS
  hello on the plain port, a port scanner's bytes). A peer that sends nothing gets nothing.
  websockets logs each failed opening handshake as a 26-line ERROR traceback; here it is one line at INFO naming
  the peer and the reason. After answering, the server waits up to `ANSWER_LINGER_S` for the peer to close, so a
  client that sent more than was read still receives the answer (closing first would reset the connection).
- `static_file(...)`: the browser client's files, 404 for anything else (paths the filesystem cannot even represent
  included), 414 for paths longer than `MAX_PATH_CHARS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
from collections.abc import Generator
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidMessage, SecurityError
from websockets.http11 import Request, Response
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

log = logging.getLogger("assistant.server")

ANSWER_LINGER_S = 2.0  # after an error answer: time the peer gets to read it and close first
MAX_PATH_CHARS = 2048  # longer request paths get 414 (no file of the browser client is near this)
_CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html"}


def _status_for(exc: Exception, line_no: int) -> tuple[int, str] | None:
    """The HTTP answer to a request websockets refused to parse (None: the peer sent nothing to answer)."""
    if isinstance(exc, EOFError) and line_no <= 1:
        return None
    text = str(exc)
    if "unsupported HTTP method" in text:
        return 405, "this server answers GET only (the WebSocket endpoint, the browser client, /healthz, /metrics)\n"
    if isinstance(exc, SecurityError) and "line too long" in text:
        if line_no <= 1:
            return 414, "request line too long: the URL must fit in 8 KiB\n"
        return 431, "a request header line is longer than 8 KiB\n"
    if isinstance(exc, SecurityError):
        return 431, f"request headers refused: {text}\n"
    return 400, "this port speaks HTTP/1.1 and WebSocket (TLS only when the server is configured for it)\n"


def _parse_or_answer(p: ServerProtocol) -> Generator[None]:
    """`ServerProtocol.parse`, except that an unparsable request is answered with a status line before EOF."""
    lines = 0

    def read_line(m: int) -> Generator[None, None, bytes]:
        nonlocal lines
        lines += 1
        return (yield from p.reader.read_line(m))

    try:
        request = yield from Request.parse(read_line)
    except Exception as exc:
        p.handshake_exc = InvalidMessage("did not receive a valid HTTP request")
        p.handshake_exc.__cause__ = exc
        answer = _status_for(exc, lines)
        if answer is not None:
            response = p.reject(*answer)
            if answer[0] == 405:
                response.headers["Allow"] = "GET"
            p.send_response(response)  # a rejection: it ends with EOF
        else:
            p.send_eof()
        p.parser = p.discard()
        next(p.parser)
        yield
    p.events.append(request)
    yield from Protocol.parse(p)


class HttpConnection(ServerConnection):
    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        protocol.parser = _parse_or_answer(protocol)  # nothing was received yet: swap the request parser
        next(protocol.parser)
        super().__init__(protocol, *args, **kwargs)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except (InvalidMessage, ConnectionClosed, EOFError) as exc:
            reason = exc.__cause__ or exc
            peer = self.remote_address[0] if self.remote_address else "?"
            log.info("refused a request from %s (not a WebSocket upgrade or GET this port serves): %s", peer, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.connection_lost_waiter), ANSWER_LINGER_S)
            # returning without the WebSocket open: websockets closes the connection without logging an error


def http_response(connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    resp = connection.respond(status, "")
    resp.body = body
    for name in ("Content-Type", "Content-Length"):
        del resp.headers[name]
    resp.headers["Content-Type"] = content_type
    resp.headers["Content-Length"] = str(len(body))
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def static_file(connection: ServerConnection, root: Path, path: str) -> Response:
    if len(path) > MAX_PATH_CHARS:
        return connection.respond(414, f"path too long: {len(path)} characters, at most {MAX_PATH_CHARS}\n")
    rel = path.lstrip("/") or "index.html"
    try:
        target = (root / rel).resolve()
        found = target.is_relative_to(root) and target.is_file()
    except (OSError, ValueError):  # a name the filesystem cannot represent (too long, NUL byte)
        found = False
    if not found:
        return connection.respond(404, "not found\n")
    ctype = _CONTENT_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if ctype.startswith("text/"):
        ctype += "; charset=utf-8"
    return http_response(connection, 200, target.read_bytes(), ctype)
