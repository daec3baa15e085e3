"""The Wyoming transport: Home Assistant (or any Wyoming client) reaches the speech recogniser (`asr`), the LLM as a
conversation agent (`handle`), the voice (`tts`) and the wake words (`wake`: `detect`, then audio) on one TCP port
(`[wyoming] uri`, `serve --wyoming`), all in one `info` answer to `describe`, which is answered at once, also while
the model loads.

A thin asyncio shell like websocket.py and mqtt.py: it reads events with bounds, answers `describe`, and hands each
request to the service that owns it (`wyoming_services.py`); model work runs on the engine's worker, synthesis on the
voice pool's threads, so nothing here blocks the loop.

    wy = WyomingServer(cfg, voice)      # voice: the process's SpeechPool (None: no tts)
    await wy.start()                    # listening; wy.port
    wy.attach(hub)                      # once the model is loaded: asr and handle work from now on
    await wy.shutdown(grace_s)

Framing: the `wyoming` package's events and writer; reading is `wyoming_events.read_event` (bounded). A header that
is not JSON, a field of the wrong type or a message over `server.max_message_bytes` gets an `error` event (code,
text) and the connection goes on; a message declared far over the limit ends it. Unknown event types are dropped, as
the protocol asks of servers. Not `AsyncTcpServer.run()`: it installs its own SIGTERM handler (../shared/WYOMING.md).

Bounds per connection (`hub.transport_limits(cfg)["wyoming"]`): at most `wyoming.max_connections` (more get `error`
`server_busy` and are closed); a connection with nothing received for `wyoming.idle_timeout_s` and nothing in flight
is closed; a peer that does not read (a write that cannot drain in `SEND_TIMEOUT_S`) is closed; one request of each
kind at a time. Error codes: `wyoming_services.WYOMING_ERROR_CODES` and the realtime protocol's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk, AudioChunkConverter
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import NotHandled
from wyoming.tts import SynthesizeStopped
from wyoming.wake import Detection, NotDetected

from assistant.audio.resample import MAX_RATE_HZ, MIN_RATE_HZ
from assistant.audio.voice import SpeechPool
from assistant.config import Config, parse_wyoming_uri
from assistant.transport.hub import SessionHub, transport_limits
from assistant.transport.wyoming_events import BadMessage, field, read_event
from assistant.transport.wyoming_services import (
    ASR_TRANSPORT,
    Conversations,
    SpeechStream,
    Transcription,
    WakeStream,
    WyomingError,
    asr_available,
    build_info,
    wake_names,
)

log = logging.getLogger("assistant.wyoming")

SEND_TIMEOUT_S = 30.0  # one event must drain to the peer within this
IDLE_CHECK_MAX_S = 5.0
REQUESTS = Counter("assistant_wyoming_requests_total", "Wyoming requests by service, outcome", ["service", "outcome"])


class WyomingServer:
    def __init__(self, cfg: Config, voice: SpeechPool | None) -> None:
        self.cfg, self.voice = cfg, voice
        self.info = build_info(cfg, voice).event()
        self.limits = transport_limits(cfg)[ASR_TRANSPORT]
        self.max_bytes = cfg.server.max_message_bytes
        self.hub: SessionHub | None = None
        self.conversations: Conversations | None = None
        self.clients: set[_Client] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = parse_wyoming_uri(self.cfg.wyoming.uri)
        self._server = await asyncio.start_server(self._accept, host, port, limit=self.max_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Wyoming server on tcp://%s:%d (%s)", host, self.port, ", ".join(self.services()))

    def services(self) -> list[str]:
        return [k for k in ("asr", "handle", "tts") if self.info.data[k]]

    def attach(self, hub: SessionHub) -> None:
        """asr and handle work from now on."""
        self.hub = hub
        self.conversations = Conversations(hub)

    def set_voice(self, voice: SpeechPool | None) -> None:
        """The voice as it loaded (None: it failed; tts is no longer offered)."""
        if voice is not self.voice:
            self.voice = voice
            self.info = build_info(self.cfg, voice).event()

    def health(self) -> str | None:
        """None while accepting connections (the `wyoming` check of /healthz)."""
        if self._server is not None and self._server.is_serving():
            return None
        return "the Wyoming server is not accepting connections"

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        busy = [c for c in self.clients if c.busy]
        if busy and grace_s > 0:
            waits = [asyncio.create_task(c.wait_idle()) for c in busy]
            await asyncio.wait(waits, timeout=grace_s)
            for w in waits:
                w.cancel()
        await asyncio.gather(*(c.close() for c in list(self.clients)), return_exceptions=True)
        if self.conversations is not None:
            await self.conversations.close()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(self, reader, writer)
        if len(self.clients) >= self.limits.capacity:
            msg = f"{len(self.clients)} Wyoming connections open, the limit is {self.limits.capacity_key}="
            with contextlib.suppress(Exception):
                await client.send_error(WyomingError("server_busy", f"{msg}{self.limits.capacity}; retry later"))
            await client.close()
            return
        self.clients.add(client)
        try:
            await client.run()
        finally:
            self.clients.discard(client)


class _Client:
    """One Wyoming connection: the read loop dispatches events; requests run as tasks so the next event (streamed
    text, a disconnect) is seen while the model or the voice works."""

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.last_input_s = time.monotonic()
        self._tasks: dict[str, asyncio.Task[None]] = {}  # service -> its request in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._asr: Transcription | None = None
        self._asr_language: str | None = None  # the last `transcribe`'s language: the next audio stream's
        self._asr_converter: AudioChunkConverter | None = None
        self._asr_rate_hz = 0
        self._audio_refused = False  # the audio-start was refused: its chunks are dropped without more errors
        self._tts: SpeechStream | None = None  # the streaming synthesis (synthesize-start .. -stop)
        self._wake_names: list[str] | None = None  # set by `detect`: the next audio stream goes to these models
        self._wake: WakeStream | None = None  # the audio stream being listened to for a wake word
        self._wake_converter: AudioChunkConverter | None = None
        self._reports = itertools.count()
        self._closed = False

    @property
    def busy(self) -> bool:
        """Work in flight for this peer (an open audio or text stream waits for the peer: not busy)."""
        return bool(self._tasks)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # ---- loop ----------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watch_idle())
        try:
            while not self._closed:
                try:
                    ev = await read_event(self.reader, self.server.max_bytes)
                except BadMessage as e:
                    await self.send_error(WyomingError(e.code, e.text))
                    if e.fatal:
                        break
                    continue
                if ev is None:
                    break
                self.last_input_s = time.monotonic()
                try:
                    await self._dispatch(ev)
                except WyomingError as e:
                    await self.send_error(e)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the peer left or stopped reading
        except Exception:
            log.exception("wyoming %s: unexpected error; closing the connection", self.peer)
        finally:
            watchdog.cancel()
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tts is not None:
            await self._tts.cancel()
        if self._asr is not None:
            await self._asr.close()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), SEND_TIMEOUT_S)

    async def _watch_idle(self) -> None:
        idle_s = self.server.limits.idle_timeout_s
        while True:
            await asyncio.sleep(min(IDLE_CHECK_MAX_S, idle_s / 4))
            silent_s = time.monotonic() - self.last_input_s
            if silent_s >= idle_s and not self.busy:
                log.info("wyoming %s: closing after %.0f s without input", self.peer, silent_s)
                self.writer.close()  # the read loop sees EOF and cleans up
                return

    async def write(self, event: Event) -> None:
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), SEND_TIMEOUT_S)
        except TimeoutError:
            log.warning("wyoming %s: peer does not read (%s not sent in %.0f s); closing", self.peer, event.type,
                        SEND_TIMEOUT_S)  # fmt: skip
            self.writer.transport.abort()
            raise ConnectionError("peer does not read") from None

    async def send_error(self, err: WyomingError) -> None:
        log.info("wyoming %s: error %s: %s", self.peer, err.code, err.text)
        await self.write(Error(text=err.text, code=err.code).event())

    def _report(self, err: WyomingError) -> None:
        self._spawn(f"report-{next(self._reports)}", self.send_error(err))

    def _spawn(self, service: str, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await coro
            except (ConnectionError, TimeoutError):
                self.writer.close()
            except Exception:  # a bug, not the peer's doing: logged once, this connection ends, others go on
                log.exception("wyoming %s: unexpected error in %s; closing the connection", self.peer, service)
                self.writer.close()
            finally:
                self._tasks.pop(service, None)
                if not self.busy:
                    self._idle.set()

        self._idle.clear()
        self._tasks[service] = asyncio.create_task(run(), name=f"wyoming-{service}")

    def _one_at_a_time(self, service: str) -> None:
        if service in self._tasks:
            raise WyomingError("request_in_progress", f"a {service} request is still running on this connection")

    # ---- dispatch ------------------------------------------------------------------------------------------------
    async def _dispatch(self, ev: Event) -> None:
        handlers: dict[str, Callable[[Event], Coroutine[Any, Any, None]]] = {
            "describe": self._describe,
            "transcribe": self._transcribe,
            "detect": self._detect,
            "audio-start": self._audio_start,
            "audio-chunk": self._audio_chunk,
            "audio-stop": self._audio_stop,
            "transcript": self._handle,
            "synthesize": self._synthesize,
            "synthesize-start": self._synthesize_start,
            "synthesize-chunk": self._synthesize_chunk,
            "synthesize-stop": self._synthesize_stop,
        }
        handler = handlers.get(ev.type)
        if handler is None:
            log.debug("wyoming %s: dropped an event of unknown type %.60r", self.peer, ev.type)
            return
        await handler(ev)

    async def _describe(self, ev: Event) -> None:
        await self.write(self.server.info)

    # ---- asr -----------------------------------------------------------------------------------------------------
    def _require_model(self, service: str) -> SessionHub:
        if service == "asr" and not asr_available(self.server.cfg):
            raise WyomingError("service_unavailable", "asr: the qwen-audio backend writes no transcripts")
        hub = self.server.hub
        if hub is None:
            raise WyomingError("model_loading", f"{service}: the model is still loading; retry when /healthz says ok")
        return hub

    async def _transcribe(self, ev: Event) -> None:
        self._asr_language = field(ev, "language", str, required=False)  # told to Whisper (`Transcription`)
        self._wake_names = None  # this audio stream is for the recogniser

    # ---- wake ----------------------------------------------------------------------------------------------------
    async def _detect(self, ev: Event) -> None:
        """`detect {names?}`: the next audio stream is listened to for these wake words (`detection` each time one
        fires, `not-detected` at audio-stop when none did). Needs no model: it works while the LLM loads."""
        if self._wake is not None or self._asr is not None:
            raise WyomingError("request_in_progress", "detect while an audio stream is open; send audio-stop first")
        self._wake_names = wake_names((ev.data or {}).get("names"))

    def _wake_start(self, rate: int, width: int, channels: int) -> None:
        names, self._wake_names = self._wake_names, None
        assert names is not None
        self._wake = WakeStream(names, rate)
        self._wake_converter = None if (width, channels) == (2, 1) else AudioChunkConverter(width=2, channels=1)

    async def _wake_chunk(self, chunk: AudioChunk) -> None:
        assert self._wake is not None
        if self._wake_converter is not None:
            try:
                chunk = self._wake_converter.convert(chunk)
            except Exception as e:  # audioop.error: a length that is not whole samples
                raise WyomingError("invalid_audio", f"audio-chunk is not {chunk.width}-byte PCM: {e}") from e
        for d in self._wake.feed(chunk.audio):
            await self.write(Detection(name=d.name, timestamp=d.audio_end_ms).event())

    async def _wake_stop(self) -> None:
        wake, self._wake = self._wake, None
        assert wake is not None
        REQUESTS.labels(service="wake", outcome="detected" if wake.detected else "not_detected").inc()
        if not wake.detected:
            await self.write(NotDetected().event())

    async def _audio_start(self, ev: Event) -> None:
        self._audio_refused = True  # until this start is accepted
        if self._asr is not None or self._wake is not None:
            raise WyomingError("request_in_progress", "audio-start while the previous audio was not stopped")
        rate, width, channels = (field(ev, k, int) for k in ("rate", "width", "channels"))
        if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
            raise WyomingError("sample_rate_out_of_range", f"audio-start: rate must be {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz")
        if width not in (1, 2, 3, 4) or channels not in (1, 2):
            msg = f"audio-start: expected width 1-4 (bytes) and 1-2 channels, got {width} and {channels}"
            raise WyomingError("invalid_audio", msg)
        if self._wake_names is not None:  # after `detect`: this stream is for the wake-word models
            self._wake_start(rate, width, channels)
            self._audio_refused = False
            return
        self._one_at_a_time("asr")
        hub = self._require_model("asr")
        asr = Transcription(hub, rate, self._report, self._end, self._asr_language)
        await asr.open()
        self._asr, self._asr_rate_hz, self._audio_refused = asr, rate, False
        self._asr_converter = None if (width, channels) == (2, 1) else AudioChunkConverter(width=2, channels=1)

    async def _audio_chunk(self, ev: Event) -> None:
        if self._wake is not None:
            rate, width, channels = (field(ev, k, int) for k in ("rate", "width", "channels"))
            await self._wake_chunk(AudioChunk(rate, width, channels, ev.payload or b""))
            return
        if self._asr is None:
            if not self._audio_refused:
                self._audio_refused = True  # one error per stream, not one per chunk
                raise WyomingError("audio_not_started", "audio-chunk without audio-start; send audio-start first")
            return
        rate, width, channels = (field(ev, k, int) for k in ("rate", "width", "channels"))
        if rate != self._asr_rate_hz:
            msg = f"audio-chunk at {rate} Hz after audio-start at {self._asr_rate_hz} Hz"
            raise WyomingError("invalid_audio", msg)
        chunk = AudioChunk(rate, width, channels, ev.payload or b"")
        if self._asr_converter is not None:
            try:
                chunk = self._asr_converter.convert(chunk)
            except Exception as e:  # audioop.error: a length that is not whole samples
                msg = f"audio-chunk is not {width}-byte x {channels}-channel PCM: {e}"
                raise WyomingError("invalid_audio", msg) from e
        self._asr.feed(chunk.audio)

    async def _audio_stop(self, ev: Event) -> None:
        if self._wake is not None:
            await self._wake_stop()
            return
        asr, self._asr = self._asr, None
        if asr is None:
            refused, self._audio_refused = self._audio_refused, False
            if not refused:
                raise WyomingError("audio_not_started", "audio-stop without audio-start")
            return

        async def transcribe() -> None:
            try:
                text = await asr.finish()
                REQUESTS.labels(service="asr", outcome="ok").inc()
            except WyomingError as e:  # Home Assistant waits for a transcript: an empty one ends its request
                REQUESTS.labels(service="asr", outcome="error").inc()
                await self.send_error(e)
                text = ""
            finally:
                await asr.close()
            await self.write(Transcript(text=text).event())

        self._spawn("asr", transcribe())

    async def _end(self, code: int, reason: str) -> None:
        """The hub ends the transcription's session (idle, shutdown): the connection goes with it."""
        log.info("wyoming %s: closing: %s", self.peer, reason)
        self.writer.close()

    # ---- handle --------------------------------------------------------------------------------------------------
    async def _handle(self, ev: Event) -> None:
        text = field(ev, "text", str)
        language = field(ev, "language", str, required=False)
        context = field(ev, "context", dict, required=False) or {}
        conv_id = context.get("conversation_id")
        if conv_id is not None and not isinstance(conv_id, str):
            msg = f"transcript: context.conversation_id must be a string, got {conv_id!r}"
            raise WyomingError("invalid_event", msg)
        if "handle" in self._tasks:
            busy = "Sorry, the previous request on this connection is still being answered."
            await self.write(NotHandled(busy).event())
            return
        try:
            self._require_model("handle")
        except WyomingError as e:
            await self.write(NotHandled(f"Sorry, the assistant is not ready yet: {e.text}").event())
            return
        conversations = self.server.conversations
        assert conversations is not None

        async def answer() -> None:
            reply = await conversations.answer(text, language, conv_id)
            REQUESTS.labels(service="handle", outcome=reply.event().type).inc()
            await self.write(reply.event())

        self._spawn("handle", answer())

    # ---- tts -----------------------------------------------------------------------------------------------------
    def _speech(self, ev: Event) -> SpeechStream:
        pool = self.server.voice
        if pool is None:
            raise WyomingError("service_unavailable", "tts: speech is off ([voice] name is empty or not installed)")
        voice = field(ev, "voice", dict, required=False) or {}
        name = voice.get("name")
        if name is not None and not isinstance(name, str):
            raise WyomingError("invalid_event", f"{ev.type}: voice.name must be a string, got {name!r}")
        if name is not None and name != pool.params.name:
            self._report(WyomingError("unknown_voice", f"no voice {name!r} here; speaking with {pool.params.name!r}"))
        return SpeechStream(pool, self.server.cfg.voice, self.write)

    async def _synthesize(self, ev: Event) -> None:
        if self._tts is not None:
            return  # inside a stream: this is the copy of the whole text sent for older servers
        text = field(ev, "text", str)
        self._one_at_a_time("tts")
        stream = self._speech(ev)

        async def speak() -> None:
            try:
                await stream.feed(text)
                await stream.finish()
                REQUESTS.labels(service="tts", outcome="ok").inc()
            except asyncio.CancelledError:
                await stream.cancel()
                raise

        self._spawn("tts", speak())

    async def _synthesize_start(self, ev: Event) -> None:
        self._one_at_a_time("tts")
        if self._tts is not None:
            raise WyomingError("request_in_progress", "synthesize-start inside a stream; send synthesize-stop first")
        self._tts = self._speech(ev)

    async def _synthesize_chunk(self, ev: Event) -> None:
        text = field(ev, "text", str)
        if self._tts is None:
            raise WyomingError("invalid_event", "synthesize-chunk outside a stream; send synthesize-start first")
        await self._tts.feed(text)  # waits while the stream's clauses queue in the pool (the peer's text backs up)

    async def _synthesize_stop(self, ev: Event) -> None:
        stream, self._tts = self._tts, None
        if stream is None:
            raise WyomingError("invalid_event", "synthesize-stop outside a stream; send synthesize-start first")

        async def stop() -> None:
            try:
                await stream.finish()
                REQUESTS.labels(service="tts", outcome="ok").inc()
            except asyncio.CancelledError:
                await stream.cancel()
                raise
            await self.write(SynthesizeStopped().event())

        self._spawn("tts", stop())
