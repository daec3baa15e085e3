"""Helpers for the tests that run a real server: configs, synthetic voiced audio, event receiving with one timeout.

Shared by the server, OpenAI SDK, desktop/browser client and MQTT bridge tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np

from assistant.config import Config, load_config

TIMEOUT_S = 120.0  # the one bound every wait in the server tests derives from (the machine is shared and slow)


# Piper draws noise for every clip, and a test that transcribes an answer's audio back must not hear a different clip
# each run (about one draw in twelve of "What is the capital of France?" is heard as "... of friends").
VOICE_SEED = 0


def make_cfg(**overrides: Any) -> Config:
    """A server on a free port (0) with greedy 6-token answers, text only (no voice: the tiny random model's answers
    are not worth speaking; spoken-answer tests set `voice.name`); `overrides` by dotted key, e.g. `server.token`."""
    base: dict[str, Any] = {
        "server.port": 0,
        "generation.max_new_tokens": 6,
        "generation.greedy": True,
        "voice.name": "",
        "voice.seed": VOICE_SEED,
    }
    base.update(overrides)
    return load_config(overrides=base)


def tiny_qwen_cfg(tiny_qwen_dir: Any, **overrides: Any) -> Config:
    """`make_cfg` naming the tiny random Qwen-Audio checkpoint as the model, with 8-token answers (client tests)."""
    model = {"model.backend": "qwen-audio", "model.path": str(tiny_qwen_dir), "generation.max_new_tokens": 8}
    return make_cfg(**{**model, **overrides})


def vowel(ms: int, rate_hz: int = 16000, f0_hz: float = 140.0, amplitude: int = 12000) -> np.ndarray:
    """Harmonic-rich, syllable-modulated tone: webrtcvad classifies every frame of it as speech."""
    t = np.arange(rate_hz * ms // 1000) / rate_hz
    harmonics = [k for k in range(1, 25) if f0_hz * k < rate_hz / 2]
    sig = sum((1.0 / k) * np.sin(2 * np.pi * f0_hz * k * t) for k in harmonics)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t)
    return (sig * envelope / np.abs(sig).max() * amplitude).astype(np.int16)


def silence(ms: int, rate_hz: int = 16000) -> np.ndarray:
    return np.zeros(rate_hz * ms // 1000, dtype=np.int16)


def chunks(pcm: np.ndarray, rate_hz: int = 16000, chunk_ms: int = 20) -> list[bytes]:
    n = rate_hz * chunk_ms // 1000
    return [pcm[i : i + n].astype("<i2").tobytes() for i in range(0, len(pcm), n)]


def wav_pcm16(path: Any) -> np.ndarray:
    """A WAV file (e.g. the espeak-ng question) as 16 kHz int16 samples, through the server's own loader."""
    from assistant.audio.io import load_audio

    return np.round(load_audio(path) * 32768.0).clip(-32768, 32767).astype(np.int16)


GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "qwen_golden"  # copies of the reference's golden clips


def golden_clips() -> tuple[np.ndarray, np.ndarray]:
    """The two golden espeak-ng clips (3.2 s and 2.1 s) as float32 samples on the int16 grid, for engine tests."""

    def read(path: Path) -> np.ndarray:
        with wave.open(str(path)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0

    return read(GOLDEN_DIR / "tiny.wav"), read(GOLDEN_DIR / "history_audio_2.wav")


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


async def recv_event(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))


async def recv_until(ws: Any, etype: str, log: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Receive events until one of type `etype`; every received event is appended to `log`."""
    while True:
        ev = await recv_event(ws)
        if log is not None:
            log.append(ev)
        if ev["type"] == etype:
            return ev


async def send_json(ws: Any, obj: dict[str, Any]) -> None:
    await ws.send(json.dumps(obj))


class RecordingBackend:
    """The real backend, with every `prepare` call recorded (keys, audio lengths, utterances), so tests can count
    the audio work done per turn and wait (without sleeping) until a given turn's audio work has run."""

    def __init__(self, backend: Any) -> None:
        import threading

        self._backend = backend
        self.calls: list[list[tuple[str, int]]] = []  # per prepare call: (key, audio samples or -1 for text)
        self.utterances: list[Any] = []  # every utterance prepared, as the backend got it, in order
        self._cond = threading.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def prepare(self, utterances: list[Any], audio_numbers: list[int]) -> list[Any]:
        turns = self._backend.prepare(utterances, audio_numbers)
        with self._cond:
            self.calls.append([(u.key, -1 if u.audio is None else len(u.audio)) for u in utterances])
            self.utterances += utterances
            self._cond.notify_all()
        return turns

    def runs(self, key: str) -> list[int]:
        """Audio lengths (samples) of every prepare that included `key`, in order."""
        with self._cond:
            return [n for call in self.calls for k, n in call if k == key]

    def wait_for_runs(self, count: int) -> None:
        """Block (a worker thread, never the loop) until `count` prepare calls ran in total."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, TIMEOUT_S):
                raise TimeoutError(f"expected {count} prepare calls, saw {len(self.calls)}")


async def worker_conversation(engine: Any, session_id: str) -> Any:
    """The engine's `Conversation` of `session_id`, fetched on the worker thread that owns it (after every command
    sent before this call was handled). Tests read its fields for their assertions only."""
    return await engine.call(lambda _backend: engine._worker.conversations[session_id])
