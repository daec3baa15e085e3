"""`SessionHub`: the one owner of the open sessions of every transport: admission (capacity), ids, the idle sweep
and graceful shutdown. Transports ask it for a `Connection` (`open`) and never keep sessions of their own.

    hub = SessionHub(cfg, engine, speech=pool)   # pool: the shared voice (`audio.voice.open_pool`), None = text only
    conn = hub.open("mqtt", send, close, dialect="ga", input_rate_hz=16000)   # raises SessionLimitReached
    await hub.shutdown(grace_s)                                                # refuse new, finish, close all

Sessions start from the server's settings: `[vad]` turn detection and, when the server has a voice, spoken answers
(`[voice]` speed and output rate; OpenAI's default output is audio, a client asks for `["text"]` to get text).

Capacity and idle timeout are per transport (`TransportLimits`: WebSocket `server.max_sessions` /
`server.idle_timeout_s`, MQTT `mqtt.max_devices` / `mqtt.device_idle_timeout_s`, Wyoming `wyoming.*`), so one
transport can never lock another out. Idle sweep: a
session with no client input for its transport's timeout and nothing in flight is ended by the hub
(`Connection.end`, the transport's close code 1000 "idle timeout").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from assistant.audio.voice import SpeechPool
from assistant.audio.wake_word import WakeWordSettings
from assistant.config import Config
from assistant.engine.api import new_id
from assistant.realtime.events import EventFactory
from assistant.realtime.protocol import Dialect, ProtocolError
from assistant.realtime.session import Session, SessionLimits
from assistant.realtime.settings import AudioOutput, SessionSettings
from assistant.transport.connection import CloseFn, Connection, SendFn

log = logging.getLogger("assistant.server")

SESSIONS = Gauge("assistant_server_sessions", "Open realtime sessions (all transports)", ["transport"])
IDLE_SWEEP_MAX_S = 5.0  # how often the hub looks for idle sessions (at most; sooner for short timeouts)
CLOSE_IDLE = 1000


class SessionLimitReached(Exception):
    """No session slot is free (or the server is shutting down); the transport sends `error` `server_busy`."""

    code = "server_busy"


@dataclass(frozen=True)
class TransportLimits:
    capacity: int  # open sessions at most
    idle_timeout_s: float
    capacity_key: str  # the config key, for the refusal message


def transport_limits(cfg: Config) -> dict[str, TransportLimits]:
    s, m, w = cfg.server, cfg.mqtt, cfg.wyoming
    return {
        "websocket": TransportLimits(s.max_sessions, s.idle_timeout_s, "server.max_sessions"),
        "mqtt": TransportLimits(m.max_devices, m.device_idle_timeout_s, "mqtt.max_devices"),
        # Wyoming: connections (each transcription is a session of its connection), and conversations by id
        "wyoming": TransportLimits(w.max_connections, w.idle_timeout_s, "wyoming.max_connections"),
        "wyoming_conversation": TransportLimits(
            w.max_conversations, w.conversation_idle_s, "wyoming.max_conversations"
        ),
    }


def transport_wake_word(cfg: Config, transport: str) -> WakeWordSettings | None:
    """The wake word a new session of `transport` starts with (None = off): MQTT devices `mqtt.wake_word`, others
    `wake_word.name`; `wake_word.follow_up_ms` for all."""
    name = cfg.mqtt.wake_word if transport == "mqtt" else cfg.wake_word.name
    return dataclasses.replace(cfg.wake_word, name=name) if name else None


class SessionHub:
    def __init__(self, cfg: Config, engine: Any, model_name: str = "local", speech: SpeechPool | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.model_name = model_name
        self.speech = speech  # the shared voice pool; None: answers are text only
        self.sessions: dict[str, Connection] = {}  # id -> the connection of every transport
        self.closing = False
        s = cfg.server
        self.limits = SessionLimits(s.max_message_bytes, s.max_queued_turns, s.max_turn_audio_ms)
        self.transports = transport_limits(cfg)
        # What a session's transcription `language` may name: the loaded backend's recogniser's codes.
        backend = engine.backend if engine else None
        self.languages: tuple[str, ...] = tuple(getattr(backend, "languages", ()))
        self.hears_trimmed = getattr(backend, "heard_audio", None) is not None  # `SessionSettings.hears_trimmed`
        self._sweeper: asyncio.Task[None] | None = None

    def open(
        self, transport: str, send: SendFn, close: CloseFn, dialect: Dialect = "ga", input_rate_hz: int | None = None
    ) -> Connection:
        if self.closing:
            raise SessionLimitReached("the server is shutting down; reconnect later")
        t = self.transports[transport]
        n = sum(c.transport == transport for c in self.sessions.values())
        if n >= t.capacity:
            raise SessionLimitReached(
                f"{n} {transport} sessions open, the limit is {t.capacity_key}={t.capacity}; retry later"
            )
        rate = {} if input_rate_hz is None else {"input_rate_hz": input_rate_hz}  # None: the dialect's default
        wake = transport_wake_word(self.cfg, transport)
        settings = SessionSettings(
            model=self.model_name,
            turn_detection=self.cfg.vad,
            wake_word=wake,
            languages=self.languages,
            hears_trimmed=self.hears_trimmed,
            **rate,
            **self._voice(),
        )
        cfg = self.cfg
        session = Session(
            new_id("sess"), settings, dialect, default_td=cfg.vad, default_wake=cfg.wake_word, limits=self.limits
        )
        conn = Connection(self, transport, session, send, close)
        self.sessions[conn.id] = conn
        self._count()
        self._ensure_sweeper()
        return conn

    def _voice(self) -> dict[str, Any]:
        """The spoken-answer settings every session starts with (none without a voice)."""
        if self.speech is None:
            return {}
        v = self.cfg.voice
        out = AudioOutput.of_server(
            self.speech.voices, speed=v.speed, pcm_rate_hz=v.output_rate_hz, first_clause_chars=v.first_clause_chars
        )
        return {"output_audio": True, "audio_out": out}

    def busy_error(self, dialect: Dialect, message: str) -> dict[str, Any]:
        """The `error` event a transport sends before closing a connection refused by `open`."""
        return EventFactory(dialect).error(ProtocolError("server_busy", message))

    def release(self, conn: Connection) -> None:
        self.sessions.pop(conn.id, None)
        self._count()

    def _count(self) -> None:
        by: dict[str, int] = {}
        for c in self.sessions.values():
            by[c.transport] = by.get(c.transport, 0) + 1
        for transport in ("websocket", "mqtt", *by):
            SESSIONS.labels(transport=transport).set(by.get(transport, 0))

    # ---- idle sweep ----------------------------------------------------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="session-idle-sweep")

    async def _sweep(self) -> None:
        shortest_s = min(t.idle_timeout_s for t in self.transports.values())
        while self.sessions:
            await asyncio.sleep(min(IDLE_SWEEP_MAX_S, shortest_s / 4))
            now_s = time.monotonic()
            for conn in list(self.sessions.values()):
                idle_s = self.transports[conn.transport].idle_timeout_s
                silent_s = now_s - conn.last_input_s
                if silent_s >= idle_s and conn.idle and not conn.closed:
                    log.info(
                        "session %s (%s): closing after %.0f s without client input", conn.id, conn.transport, silent_s
                    )
                    await conn.end(CLOSE_IDLE, f"idle timeout: nothing received for {idle_s:g} s")

    # ---- shutdown ------------------------------------------------------------------------------------------------
    async def shutdown(self, grace_s: float) -> None:
        """Refuse new sessions, let in-flight work finish for up to `grace_s`, then cancel and close all."""
        self.closing = True
        conns = list(self.sessions.values())
        for c in conns:
            c.session.stop_accepting()
        if conns and grace_s > 0:
            await asyncio.wait([asyncio.create_task(c.wait_idle()) for c in conns], timeout=grace_s)
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
