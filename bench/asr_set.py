"""The speech-recognition set and its one scoring rule, shared by `bench/asr_peers.py` and the tests
(`tests/test_asr_silence.py`): the spoken set's questions said by several espeak-ng voices at several speeds, each
clip with 0, 0.3, 0.5 and 1.0 s of leading silence and 1.5 s of trailing silence; word error rate against the text
spoken, after Whisper's English text normalisation (numbers as digits, no punctuation, lower case).

Clips are float32 at 16 kHz on the int16 grid, exactly what a 16-bit WAV (`ask --audio`) or a PCM16 stream (the
server) carries, so every path sees the same samples.
"""

from __future__ import annotations

import functools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.spoken_set import QUESTIONS, synthesize

# espeak-ng voice, words per minute: a US, a British, a female and a slow low-pitched voice.
VOICES: tuple[tuple[str, int], ...] = (("en-us", 150), ("en-gb-x-rp", 130), ("en+f3", 175), ("en-us+m3", 120))
LEADS_S: tuple[float, ...] = (0.0, 0.3, 0.5, 1.0)
TRAIL_S = 1.5


@dataclass(frozen=True)
class Clip:
    text: str  # what was spoken
    voice: str
    wpm: int
    speech: np.ndarray  # the espeak-ng output alone, float32 16 kHz on the int16 grid

    @property
    def name(self) -> str:
        return f"{self.voice}@{self.wpm}: {self.text}"

    def with_silence(self, lead_s: float, trail_s: float = TRAIL_S) -> np.ndarray:
        """The clip with `lead_s` of digital silence before it and `trail_s` after it."""
        return pad_silence(self.speech, lead_s, trail_s)


def pad_silence(audio: np.ndarray, lead_s: float, trail_s: float) -> np.ndarray:
    def zeros(s: float) -> np.ndarray:
        return np.zeros(int(round(s * 16000)), np.float32)

    return np.concatenate([zeros(lead_s), np.asarray(audio, np.float32), zeros(trail_s)])


def clips(questions: int = len(QUESTIONS), voices: tuple[tuple[str, int], ...] = VOICES) -> list[Clip]:
    """The first `questions` questions in every voice (question-major order)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (text, _) in enumerate(QUESTIONS[:questions]):
            for voice, wpm in voices:
                audio = synthesize(text, Path(tmp) / f"q{i}.wav", voice=voice, wpm=wpm)
                grid = np.clip(audio, -1, 1 - 1 / 32768) * 32768  # as the WAV `synthesize` writes (truncated)
                out.append(Clip(text, voice, wpm, (grid.astype(np.int16).astype(np.float32) / 32768.0)))
    return out


@functools.cache
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # no British->American spelling table: espeak says the text as written


def words(text: str) -> list[str]:
    """Whisper's English normalisation, then only letters and digits ("2 +3" and "2 plus 3" both give 2, 3)."""
    return [w for w in (re.sub(r"[^\w]", "", t) for t in _normalizer()(text).split()) if w]


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Errors over all pairs / reference words over all pairs (the corpus WER, not a mean of per-clip rates)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"expected one hypothesis per reference ({len(references)}), got {len(hypotheses)}")
    errors = sum(word_errors(r, h) for r, h in zip(references, hypotheses, strict=True))
    return errors / max(1, sum(len(words(r)) for r in references))
