"""Speech out, the running half: the installed voices and one bounded synthesis pool shared by every session and
transport. What to say (clauses, languages, voice names) is decided by the pure `assistant.audio.speech_text`.

Piper (piper-tts, GPL-3.0-or-later, the optional `voice` extra) is imported only when a voice is loaded, so a server
without the extra runs text-only (`open_pool` says so in one log line).

    pool = open_pool(VoiceParams(...))           # None: no voice (name "" or the extra is not installed)
    pool.load()                                  # load now, off the caller's thread (server start)
    fut = pool.submit("Paris is the capital.", speed=1.0, out_rate_hz=24000)   # concurrent.futures.Future[Speech]

No asyncio here: transports wrap the futures (`asyncio.wrap_future`). Cancelling is the caller's business: it stops
submitting clauses and cancels futures that have not started, so a cancelled answer stops within one clause.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from assistant.audio.speech_text import (  # noqa: F401  (re-exported: the voice API in one place)
    MAX_SPEED,
    MIN_SPEED,
    VOICE_PACKAGES,
    ClauseSplitter,
    has_words,
    no_voice_reason,
    speakable_text,
    text_language,
    voice_language,
)

log = logging.getLogger("assistant.voice")


def installed_voices() -> list[str]:
    """Names of voices whose model package and the Piper runtime are installed (without importing Piper)."""
    if importlib.util.find_spec("piper") is None:
        return []
    return [name for name, (pkg, _) in VOICE_PACKAGES.items() if importlib.util.find_spec(pkg) is not None]


def unspeakable_reason(text: str, voice: str) -> str | None:
    """Why `voice` cannot say `text` (None when it can): no installed voice for its script, or nothing to say."""
    reason = no_voice_reason(text, voice, installed_voices())
    if reason is None and not has_words(text):
        return "nothing to say"
    return reason


@dataclass(frozen=True)
class VoiceParams:
    """What the pool needs to load and run a voice (the `[voice]` config section supplies it)."""

    name: str = "joe"
    threads: int = 1  # onnxruntime intra-op threads per synthesis: the LLM and the recogniser need the other cores
    max_concurrent: int = 1  # clauses synthesised at once across all sessions
    seed: int = -1  # -1: Piper's random noise varies every run; N: a reproducible sequence of synthesised audio


@dataclass(frozen=True)
class Speech:
    """One synthesised clause: PCM16 mono at `rate_hz`, and what it took."""

    text: str
    pcm: np.ndarray = field(repr=False)
    rate_hz: int
    synth_s: float

    @property
    def audio_ms(self) -> int:
        return int(len(self.pcm) * 1000 // self.rate_hz)


class _PiperVoice:
    """One loaded Piper voice (an onnxruntime session: `run` is thread-safe, so the pool's threads share it)."""

    def __init__(self, name: str, threads: int, seed: int = -1) -> None:
        if name not in VOICE_PACKAGES:
            raise ValueError(f"unknown voice {name!r}: expected one of {sorted(VOICE_PACKAGES)}")
        if name not in installed_voices():
            raise RuntimeError(
                f"voice {name!r} is not installed: install the optional extra with `pip install -e '.[voice]'` "
                '(piper-tts is GPL-3.0-or-later), or set [voice] name = "" for text-only answers'
            )
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        model = importlib.import_module(VOICE_PACKAGES[name][0])
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if seed >= 0:
            # Piper's network draws noise (noise_scale, noise_w) from onnxruntime's random ops, whose generators are
            # seeded from this process-wide seed when the session is created: one clip in about twelve of the same
            # sentence was misheard by Whisper base ("France" as "friends"), so tests that listen pin the draws.
            onnxruntime.set_seed(seed)
        with open(model.config_path(), encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        session = onnxruntime.InferenceSession(
            str(model.model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._voice = PiperVoice(session=session, config=config)
        self.rate_hz: int = config.sample_rate

    def synthesize(self, text: str, speed: float) -> np.ndarray:
        from piper.config import SynthesisConfig

        syn = SynthesisConfig(length_scale=1.0 / speed)
        chunks = [c.audio_int16_array for c in self._voice.synthesize(text, syn)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


class SpeechPool:
    """The process's voice: loaded once (lazily, on a pool thread), shared by all sessions, at most
    `max_concurrent` clauses at a time; further clauses wait in submission order."""

    def __init__(self, params: VoiceParams) -> None:
        self.params = params
        self._executor = ThreadPoolExecutor(max_workers=params.max_concurrent, thread_name_prefix="voice")
        self._lock = threading.Lock()
        self._voice: _PiperVoice | None = None

    @property
    def language(self) -> str:
        return voice_language(self.params.name)

    @property
    def voices(self) -> tuple[str, ...]:
        """The voices this pool speaks with (sessions may choose among them)."""
        return (self.params.name,)

    def load(self) -> Future[None]:
        """Load the voice now (e.g. at server start, so the first answer does not pay for it)."""
        return self._executor.submit(self._loaded)

    def submit(self, text: str, speed: float = 1.0, out_rate_hz: int = 24000) -> Future[Speech]:
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speaking speed must be in [{MIN_SPEED}, {MAX_SPEED}], got {speed}")
        return self._executor.submit(self._speak, text, speed, out_rate_hz)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _loaded(self) -> _PiperVoice:
        with self._lock:
            if self._voice is None:
                t0 = time.perf_counter()
                self._voice = _PiperVoice(self.params.name, self.params.threads, self.params.seed)
                log.info("voice %s loaded in %.2f s", self.params.name, time.perf_counter() - t0)
            return self._voice

    def _speak(self, text: str, speed: float, out_rate_hz: int) -> Speech:
        voice = self._loaded()
        t0 = time.perf_counter()
        pcm = voice.synthesize(speakable_text(text), speed)
        if out_rate_hz != voice.rate_hz and len(pcm):
            pcm = soxr.resample(pcm, voice.rate_hz, out_rate_hz, quality="HQ").astype(np.int16, copy=False)
        return Speech(text=text, pcm=pcm, rate_hz=out_rate_hz, synth_s=time.perf_counter() - t0)


def open_pool(params: VoiceParams) -> SpeechPool | None:
    """The server's voice pool, or None (answers are text only) with one log line saying why."""
    if not params.name:
        log.info('voice: [voice] name = "": answers are text only')
        return None
    if params.name not in installed_voices():
        log.warning(
            "voice %r is not installed: answers are text only (install the optional extra: pip install '.[voice]'; "
            "piper-tts is GPL-3.0-or-later)",
            params.name,
        )
        return None
    return SpeechPool(params)


def describe(params: VoiceParams) -> dict[str, Any]:
    """What a client may be told about the voice (Wyoming `info`, logs)."""
    return {
        "name": params.name,
        "language": voice_language(params.name),
        "installed": params.name in installed_voices(),
    }
