"""Helpers for the tests that talk to the Wyoming server with the real `wyoming` client (AsyncTcpClient)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from assistant.config import Config, load_config
from tests.server_util import TIMEOUT_S, VOICE_SEED


def wy_cfg(**overrides: Any) -> Config:
    """A server on port 0 with Wyoming on port 0, greedy answers of up to 32 tokens."""
    base = {"server.port": 0, "wyoming.uri": "tcp://127.0.0.1:0", "generation.greedy": True, "voice.seed": VOICE_SEED}
    return load_config(overrides={**base, "generation.max_new_tokens": 32, **overrides})


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[AsyncTcpClient]:
    async with AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT_S) as c:
        yield c


async def ask(port: int, *events: Event, until: str | tuple[str, ...]) -> list[Event]:
    """Send `events` on a new connection; every event received up to and including the first of type `until`."""
    async with client(port) as c:
        for ev in events:
            await c.write_event(ev)
        return await read_until(c, until)


async def read_until(c: AsyncTcpClient, until: str | tuple[str, ...]) -> list[Event]:
    got = []
    while True:
        ev = await c.read_event()
        assert ev is not None, f"connection closed before {until!r}; got {[e.type for e in got]}"
        got.append(ev)
        if ev.type in ((until,) if isinstance(until, str) else until):
            return got


def audio_events(pcm: bytes, rate_hz: int, chunk_bytes: int = 4096) -> list[Event]:
    chunks = [AudioChunk(rate_hz, 2, 1, pcm[i : i + chunk_bytes]).event() for i in range(0, len(pcm), chunk_bytes)]
    return [AudioStart(rate_hz, 2, 1).event(), *chunks, AudioStop().event()]


async def transcribe(port: int, pcm: bytes, rate_hz: int) -> str:
    events = await ask(port, Transcribe(language="en").event(), *audio_events(pcm, rate_hz), until="transcript")
    return Transcript.from_event(events[-1]).text


def spoken(events: list[Event]) -> tuple[bytes, int]:
    """The PCM and rate of a synthesis answer (audio-start, audio-chunk..., audio-stop)."""
    start = next(e for e in events if e.type == "audio-start")
    chunks = [AudioChunk.from_event(e) for e in events if e.type == "audio-chunk"]
    assert chunks and all(c.rate == start.data["rate"] and c.width == 2 and c.channels == 1 for c in chunks)
    return b"".join(c.audio for c in chunks), start.data["rate"]


def words(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())
