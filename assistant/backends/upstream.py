"""The `openai` backend's HTTP side: streams `/chat/completions` from a pool of OpenAI-compatible servers (vLLM),
balanced by load, with health checks, and turns every way a server can fail into one of three stable error codes.

Error codes (`UPSTREAM_CODES`, protocol `error.code`; each answer ends in bounded time, never hangs):
- `upstream_unavailable`: no server could be reached (each candidate refused or timed out connecting), or the
  connection broke mid-answer (the server was killed or restarted);
- `upstream_timeout`: a server took longer than `read_timeout_s` for the next piece of an answer (the first one
  included) or `response_timeout_s` for all of it;
- `upstream_error`: a server answered with an HTTP error status, something other than an event stream of chat
  chunks, an error object, or a stream that ended without a finish reason.

Why its own thread and event loop: the engine's worker thread, which submits answers, is synchronous and runs
Whisper in steps; the server's event loop is not the backend's to use (the engine knows no event loop). One small
I/O thread owns every upstream socket, so many answers stream at once, the worker never waits on the network, and a
cancel closes its stream at once (`Future.cancel` ends the task, which closes the response; vLLM then aborts the
request).

Balancing: an answer goes to the healthy server with the fewest answers in flight (ties: the one used least
recently), so long and short answers spread by load, not by count. A server is marked unhealthy by a failed connect
or health check and healthy again by a passing check (`GET {base_url}/models` every `health_interval_s`, which must
list `model`). When no server is marked healthy, each is still tried in turn: a stale mark must not refuse work that a
restarted server could do. Until the first text of an answer arrives, a failed connect, a dropped connection or a
429/502/503/504 moves the answer to the next untried server; after that it is never retried elsewhere (the user
already heard part of it). A timeout is not retried either: the request may still be running on that server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2
from prometheus_client import Counter, Gauge

log = logging.getLogger("assistant.upstream")

UPSTREAM_CODES = ("upstream_unavailable", "upstream_timeout", "upstream_error")
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # overloaded or restarting: another server may answer
ERROR_BODY_CHARS = 300  # of an error response, quoted in the message

REQUESTS = Counter(
    "assistant_upstream_requests_total",
    "Answers streamed from OpenAI-compatible servers, by server and outcome (completed, cancelled or an error code)",
    ["upstream", "outcome"],
)
IN_FLIGHT = Gauge("assistant_upstream_in_flight", "Answers streaming from each server now", ["upstream"])
HEALTHY = Gauge("assistant_upstream_healthy", "1 when the server's last health check or request passed", ["upstream"])


class UpstreamFailure(Exception):
    """An answer the servers could not give; `code` is one of `UPSTREAM_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ChatSink(Protocol):
    """Receives one answer's stream, on the pool's I/O thread: deltas, then exactly one `finished` or `failed`
    (nothing after a cancel)."""

    def delta(self, text: str) -> None: ...

    def tool_call(self, call_id: str | None, name: str | None, arguments: str) -> None:
        """A piece of the answer's first function call (`tool_calls[0]`): id and name once, arguments in pieces."""
        ...

    def finished(self, finish_reason: str, usage: dict[str, Any] | None) -> None: ...

    def failed(self, code: str, message: str) -> None: ...


@dataclass
class Upstream:
    base_url: str  # the API root, e.g. http://127.0.0.1:8000/v1
    healthy: bool = True  # until the first check says otherwise
    problem: str | None = None  # why it is unhealthy
    in_flight: int = 0
    last_used_s: float = 0.0

    def mark(self, problem: str | None) -> None:
        if (problem is None) != self.healthy or problem != self.problem:
            if problem is None:
                log.info("upstream %s is healthy", self.base_url)
            else:
                log.warning("upstream %s is unhealthy: %s", self.base_url, problem)
        self.healthy, self.problem = problem is None, problem
        HEALTHY.labels(upstream=self.base_url).set(1 if self.healthy else 0)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    read_s: float
    response_s: float
    health_interval_s: float


class UpstreamPool:
    """Every configured server, one `httpx2.AsyncClient`, and the I/O thread that runs them (see the module doc)."""

    def __init__(self, base_urls: list[str], model: str, api_key: str, timeouts: Timeouts) -> None:
        self.upstreams = [Upstream(u.rstrip("/")) for u in base_urls]
        self.model, self.timeouts = model, timeouts
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-upstream", daemon=True)
        self._client: httpx2.AsyncClient | None = None
        self._health_task: concurrent.futures.Future[None] | None = None

    # ---- lifecycle (any thread) ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread, check every server once (bounded by the connect timeout) and keep checking."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        asyncio.run_coroutine_threadsafe(self._check_all(), self._loop).result()
        self._health_task = asyncio.run_coroutine_threadsafe(self._health_loop(), self._loop)

    def close(self) -> None:
        if self._thread.is_alive():
            if self._health_task is not None:
                self._health_task.cancel()
            if self._client is not None:
                closing = asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop)
                closing.result(timeout=self.timeouts.connect_s)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self.timeouts.connect_s)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def health(self) -> str | None:
        """None while some server is healthy, else what is wrong with each (the server's /healthz)."""
        if any(u.healthy for u in self.upstreams):
            return None
        return "; ".join(f"{u.base_url}: {u.problem}" for u in self.upstreams)

    def submit(self, body: dict[str, Any], sink: ChatSink) -> concurrent.futures.Future[None]:
        """Stream one answer for the chat request `body` (model and streaming fields are added) into `sink`.
        Cancel the returned future to close the stream; the sink then hears nothing more."""
        request = {**body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        return asyncio.run_coroutine_threadsafe(self._answer(request, sink), self._loop)

    # ---- the I/O thread ------------------------------------------------------------------------------------------
    async def _open(self) -> None:
        t = self.timeouts
        self._client = httpx2.AsyncClient(
            headers=self._headers,
            timeout=httpx2.Timeout(connect=t.connect_s, read=t.read_s, write=t.read_s, pool=t.connect_s),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,  # servers are named by URL; a proxy from the environment would be a surprise
        )

    def _pick(self, tried: set[str]) -> Upstream | None:
        left = [u for u in self.upstreams if u.base_url not in tried]
        if not left:
            return None
        return min(left, key=lambda u: (not u.healthy, u.in_flight, u.last_used_s))

    async def _answer(self, request: dict[str, Any], sink: ChatSink) -> None:
        tried: list[str] = []
        reasons: list[str] = []
        streamed = [False]  # set once the first text reached the sink: no retry on another server after that
        try:
            async with asyncio.timeout(self.timeouts.response_s):
                while (up := self._pick(set(tried))) is not None:
                    tried.append(up.base_url)
                    try:
                        finish, usage = await self._stream_from(up, request, sink, streamed)
                    except _TryNext as e:
                        reasons.append(f"{up.base_url}: {e}")
                        continue
                    REQUESTS.labels(upstream=up.base_url, outcome="completed").inc()
                    sink.finished(finish, usage)
                    return
            raise UpstreamFailure("upstream_unavailable", "no server answered: " + "; ".join(reasons))
        except TimeoutError:
            failure = UpstreamFailure(
                "upstream_timeout",
                f"the answer took longer than openai.response_timeout_s = {self.timeouts.response_s} s",
            )
        except UpstreamFailure as e:
            failure = e
        except asyncio.CancelledError:
            REQUESTS.labels(upstream=tried[-1] if tried else "", outcome="cancelled").inc()
            raise
        except Exception as e:  # a bug here must still end the answer
            log.exception("upstream stream failed")
            failure = UpstreamFailure("upstream_error", f"{type(e).__name__}: {e}")
        REQUESTS.labels(upstream=tried[-1] if tried else "", outcome=failure.code).inc()
        sink.failed(failure.code, failure.message)

    async def _stream_from(
        self, up: Upstream, request: dict[str, Any], sink: ChatSink, streamed: list[bool]
    ) -> tuple[str, dict[str, Any] | None]:
        """One attempt on `up`: (finish reason, usage), or `_TryNext`, or `UpstreamFailure`."""
        assert self._client is not None
        up.in_flight += 1
        up.last_used_s = time.monotonic()
        IN_FLIGHT.labels(upstream=up.base_url).inc()
        url = f"{up.base_url}/chat/completions"
        try:
            async with self._client.stream("POST", url, json=request) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
                    what = f"HTTP {resp.status_code} from {url}: {body}"
                    if resp.status_code in RETRY_STATUSES:
                        raise _TryNext(what)
                    raise UpstreamFailure("upstream_error", what)
                return await _read_chunks(resp, url, sink, streamed)
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
            up.mark(f"connect failed: {type(e).__name__}: {e}")
            raise _TryNext(f"connect failed ({type(e).__name__}: {e})") from None
        except httpx2.TimeoutException as e:
            raise UpstreamFailure(
                "upstream_timeout",
                f"{url} sent nothing for openai.read_timeout_s = {self.timeouts.read_s} s ({type(e).__name__})",
            ) from None
        except (httpx2.NetworkError, httpx2.RemoteProtocolError) as e:
            up.mark(f"connection lost: {type(e).__name__}: {e}")
            if not streamed[0]:
                raise _TryNext(f"connection lost before any text ({type(e).__name__}: {e})") from None
            raise UpstreamFailure(
                "upstream_unavailable", f"connection to {url} lost mid-answer ({type(e).__name__}: {e})"
            ) from None
        finally:
            up.in_flight -= 1
            IN_FLIGHT.labels(upstream=up.base_url).dec()

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timeouts.health_interval_s)
            await self._check_all()

    async def _check(self, up: Upstream) -> None:
        assert self._client is not None
        url = f"{up.base_url}/models"
        try:
            resp = await self._client.get(url, timeout=self.timeouts.connect_s)
            if resp.status_code != 200:
                up.mark(f"GET {url}: HTTP {resp.status_code}")
                return
            served = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (httpx2.HTTPError, ValueError, AttributeError) as e:
            up.mark(f"GET {url}: {type(e).__name__}: {e}")
            return
        if self.model not in served:
            up.mark(f"serves {served}, not openai.model = {self.model!r}")
            return
        up.mark(None)


class _TryNext(Exception):
    """This server cannot take the answer now and nothing was streamed: the next server may."""


async def _read_chunks(
    resp: httpx2.Response, url: str, sink: ChatSink, streamed: list[bool]
) -> tuple[str, dict[str, Any] | None]:
    """Server-sent `chat.completion.chunk`s -> sink deltas; returns (finish reason, usage) at `[DONE]` / the end."""
    finish: str | None = None
    usage: dict[str, Any] | None = None
    try:
        async for sse in httpx2.EventSource(resp):
            if sse.data.strip() == "[DONE]":
                break
            try:
                chunk = json.loads(sse.data)
            except ValueError:
                raise UpstreamFailure(
                    "upstream_error", f"{url} sent an event that is not JSON: {sse.data[:200]!r}"
                ) from None
            text, reason, chunk_usage, calls = _parse_chunk(chunk, url)
            if text:
                streamed[0] = True
                sink.delta(text)
            for call_id, name, arguments in calls:
                streamed[0] = True
                sink.tool_call(call_id, name, arguments)
            finish = reason or finish
            usage = chunk_usage or usage
    except httpx2.SSEError as e:
        raise UpstreamFailure("upstream_error", f"{url} did not answer with an event stream: {e}") from None
    if finish is None:
        raise UpstreamFailure("upstream_error", f"the stream from {url} ended without a finish_reason")
    return finish, usage


ToolPiece = tuple[str | None, str | None, str]  # (call id, function name, arguments piece) of tool_calls[0]


def _parse_chunk(chunk: Any, url: str) -> tuple[str, str | None, dict[str, Any] | None, list[ToolPiece]]:
    """(text, finish reason, usage, pieces of the first tool call) of one chunk; an error object or a malformed
    chunk is an `upstream_error`. Parallel calls beyond the first are not used (the session shows one call)."""
    if not isinstance(chunk, dict):
        raise UpstreamFailure("upstream_error", f"{url} sent {type(chunk).__name__}, expected a chunk object")
    if "error" in chunk or chunk.get("object") == "error":
        err = chunk.get("error", chunk)
        message = err.get("message", err) if isinstance(err, dict) else err
        raise UpstreamFailure("upstream_error", f"{url} reported an error: {str(message)[:ERROR_BODY_CHARS]}")
    choices = chunk.get("choices")
    usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None
    if not isinstance(choices, list):
        raise UpstreamFailure("upstream_error", f"{url} sent a chunk without a choices list: {str(chunk)[:200]}")
    text, finish, calls = "", None, []
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise UpstreamFailure("upstream_error", f"{url} sent a choice without a delta: {str(choice)[:200]}")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise UpstreamFailure("upstream_error", f"{url} sent non-text content: {str(content)[:200]}")
        text += content or ""
        finish = choice.get("finish_reason") or finish
        calls += _tool_pieces(delta.get("tool_calls"), url)
    return text, finish, usage, calls


def _tool_pieces(tool_calls: Any, url: str) -> list[ToolPiece]:
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise UpstreamFailure("upstream_error", f"{url} sent tool_calls that are not a list: {str(tool_calls)[:200]}")
    pieces: list[ToolPiece] = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise UpstreamFailure("upstream_error", f"{url} sent a tool call without a function: {str(call)[:200]}")
        if call.get("index", 0) != 0:
            continue
        args = fn.get("arguments") or ""
        call_id, name = call.get("id"), fn.get("name")
        if not isinstance(args, str) or not isinstance(call_id, str | None) or not isinstance(name, str | None):
            raise UpstreamFailure("upstream_error", f"{url} sent a malformed tool call: {str(call)[:200]}")
        pieces.append((call_id, name, args))
    return pieces
