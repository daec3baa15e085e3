"""Per-response token bookkeeping on the worker: pick the next id, detect stops, stream UTF-8-safe text.

`TokenStream` is what the batched decode loop holds per response. The streamed deltas concatenate exactly to the
response text that enters the history: leading whitespace is dropped and trailing whitespace is held back until
more text follows (the history keeps the stripped reply), and an incomplete UTF-8 sequence is never split.
"""

from __future__ import annotations

import dataclasses

import torch

from assistant.backends.base import Tokenizer
from assistant.config import GenerationConfig
from assistant.engine.api import ResponseOptions
from assistant.generation import Sampler, SamplingParams, StreamDecoder, params_for


def sampling_params(
    gen_cfg: GenerationConfig, options: ResponseOptions, checkpoint_default: SamplingParams | None = None
) -> SamplingParams:
    """The `[generation]` config (or the backend's chat defaults, see `generation.params_for`) with a response's
    overrides applied."""
    base = params_for(gen_cfg, checkpoint_default)
    greedy = base.greedy if options.greedy is None else options.greedy
    temperature = base.temperature if options.temperature is None else options.temperature
    seed = base.seed if options.seed is None else options.seed
    return dataclasses.replace(base, greedy=greedy or temperature == 0.0, temperature=temperature, seed=seed)


class TokenStream:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, max_new_tokens: int, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(params, n_valid=tokenizer.n_valid, prompt_ids=prompt_ids)
        self.output_ids: list[int] = []
        self._detok = StreamDecoder(tokenizer)
        self._emitted: list[str] = []  # deltas handed out, concatenated = the stripped text so far
        self._held = ""  # trailing whitespace not yet emitted

    def pick(self, logits_row: torch.Tensor) -> int:
        return self.sampler.pick(logits_row, self.output_ids)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.tokenizer.stop_ids

    def append(self, token_id: int) -> str:
        """Record an output id and return the text that can be streamed now (may be empty)."""
        self.output_ids.append(token_id)
        return self._release(self._detok.push(token_id))

    def _release(self, piece: str) -> str:
        text = self._held + piece
        if not self._emitted:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            self._emitted.append(body)
        return body

    def flush(self) -> str:
        """At the end: the last incomplete UTF-8 bytes (as U+FFFD); held-back trailing whitespace is dropped."""
        text = self._held + self._detok.finish()
        self._held = ""
        body = (text if self._emitted else text.lstrip()).rstrip()
        if body:
            self._emitted.append(body)
        return body

    def text(self) -> str:
        return "".join(self._emitted)
