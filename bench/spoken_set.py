"""The spoken question set of the embedded backend and its one scoring rule, shared by the test
(`tests/test_embedded_backend.py`) and the benchmarks (`bench/embedded_latency.py`, `bench/server_latency.py`).

16 English questions spoken by espeak-ng (default `en` voice, 150 wpm, resampled to 16 kHz mono), answered greedily
with at most `ANSWER_TOKENS` new tokens by the embedded LLM, Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF, run here
in bf16) after Whisper base (CTranslate2 weights) transcribed the question. An answer is correct when it contains one
of the question's keywords as a whole word.
"""

from __future__ import annotations

import re
import subprocess
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many days are in a week?", ("seven", "7")),
    ("What is two plus three?", ("five", "5")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the boiling point of water in Celsius?", ("100", "hundred")),
    ("Which animal says moo?", ("cow",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("Who painted the Mona Lisa?", ("leonardo", "vinci")),
    ("What is ten minus four?", ("six", "6")),
    ("What is the chemical symbol for gold?", ("au",)),
]
ANSWER_TOKENS = 48  # new tokens per answer (greedy), the same for the test and every benchmark
SYNTH_TIMEOUT_S = 60.0


def synthesize(text: str, wav_path: Path, voice: str = "en", wpm: int = 150) -> np.ndarray:
    """Speak `text` with espeak-ng (`voice`, e.g. "en-gb" or "en-us+f3"; `wpm` words per minute); returns 16 kHz
    mono float32 and writes it to `wav_path` as 16-bit PCM (for `ask --audio`)."""
    import soxr

    raw = wav_path.with_suffix(".espeak.wav")
    cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text]
    subprocess.run(cmd, check=True, timeout=SYNTH_TIMEOUT_S)
    with wave.open(str(raw)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    raw.unlink()
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 16000).astype(np.float32)
    write_wav(wav_path, audio)
    return audio


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono float32 -> 16-bit PCM WAV (truncated to the int16 grid, as `synthesize` always did)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype(np.int16).tobytes())


def correct(answer: str, keywords: tuple[str, ...]) -> bool:
    """Any keyword as a whole word ("au" must not match "because")."""
    low = answer.lower()
    return any(re.search(rf"\b{re.escape(k)}\b", low) for k in keywords)


def answered_correctly(answers: list[str]) -> list[str]:
    """The questions (text, in set order) whose answer is correct; `answers` are in set order."""
    if len(answers) != len(QUESTIONS):
        raise ValueError(f"expected one answer per question ({len(QUESTIONS)}), got {len(answers)}")
    return [q for (q, keywords), a in zip(QUESTIONS, answers, strict=True) if correct(a, keywords)]


@dataclass
class Answer:
    text: str
    ids: list[int]  # generated ids before the first stop id
    first_token_at: float  # time.perf_counter() when the first token was chosen (after the prefill)
    decode_steps: int  # tokens chosen after the first (a stop id included)
    decode_s: float  # first token -> last token: the decode phase alone

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps else None


def greedy_answer(backend, ids: list[int], cache=None, max_tokens: int = ANSWER_TOKENS) -> Answer:
    """Greedy answer of the embedded backend's LM to prompt `ids`, prefilled onto `cache` from `cache.length` on
    (a new cache when None), with the backend's own calls: one prefill, then one `decode` per token."""
    import torch

    lm, tok = backend.lm, backend.tokenizer
    cache = cache if cache is not None else lm.new_cache()
    with torch.inference_mode():
        logits = lm.prefill(lm.embed(torch.tensor(ids[cache.length :])), cache)
        out = [int(logits[0, : tok.n_valid].argmax())]
        t_first = time.perf_counter()
        while len(out) < max_tokens and out[-1] not in tok.stop_ids:
            logits = lm.decode(lm.embed(torch.tensor([out[-1]])), [cache])
            out.append(int(logits[0, : tok.n_valid].argmax()))
        t_last = time.perf_counter()
    kept = next((out[:i] for i, t in enumerate(out) if t in tok.stop_ids), out)
    return Answer(tok.decode(kept).strip(), kept, t_first, len(out) - 1, t_last - t_first)
