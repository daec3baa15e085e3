"""Choosing the next token: the `[generation]` config with a backend's own defaults, and `Sampler`.

params_for(gen_cfg, checkpoint_default=None) -> SamplingParams
    the `[generation]` config; a backend's checkpoint defaults win while the sampling keys are untouched.
Sampler(params, n_valid, prompt_ids=None).pick(logits_row [vocab] float, output_ids) -> int
    repetition penalty over prompt + output ids, temperature, top-k, top-p, then a draw from a torch.Generator
    seeded per response (seed < 0: a fresh random seed); never returns an id >= n_valid.
"""

from __future__ import annotations

import dataclasses

import torch

from assistant.backends.base import SamplingParams
from assistant.config import GenerationConfig
from assistant.engine.api import ResponseOptions

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def params_for(gen_cfg, checkpoint_default: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from the `[generation]` config section. When the backend has its own chat defaults
    (qwen-audio: generation_config.json) and the user left the sampling keys at their shipped values, the
    checkpoint's values win (the chat generation config is the default); greedy and seed always come from config."""
    shipped = GenerationConfig()
    untouched = all(getattr(gen_cfg, f) == getattr(shipped, f) for f in _SAMPLING_FIELDS)
    if checkpoint_default is not None and untouched:
        base = {f: getattr(checkpoint_default, f) for f in _SAMPLING_FIELDS}
    else:
        base = {f: getattr(gen_cfg, f) for f in _SAMPLING_FIELDS}
    return SamplingParams(greedy=gen_cfg.greedy, seed=gen_cfg.seed, **base)


class Sampler:
    """Chooses the next id from one row of logits; one instance per response (it owns the random generator)."""

    def __init__(self, params: SamplingParams, n_valid: int, prompt_ids: list[int] | None = None):
        self.params = params
        self.n_valid = n_valid
        self.prompt_ids = list(prompt_ids or [])
        self.generator = torch.Generator(device="cpu")
        if params.seed >= 0:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()  # a fresh non-deterministic seed per response

    def pick(self, logits_row: torch.Tensor, output_ids: list[int]) -> int:
        p = self.params
        # Padding rows (ids >= n_valid) are untrained: cut them off before anything else.
        logits = logits_row[: self.n_valid].detach().to("cpu", torch.float32)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(output_ids)), dtype=torch.long)
            seen = seen[seen < self.n_valid]
            if len(seen):
                logits = logits.clone()
                s = logits[seen]
                logits[seen] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        if p.greedy or p.temperature <= 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest head whose mass reaches top_p: a token stays if the mass BEFORE it is < top_p.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            drop[0] = False
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sampling_params(
    gen_cfg: GenerationConfig, options: ResponseOptions, checkpoint_default: SamplingParams | None = None
) -> SamplingParams:
    """The `[generation]` config (or the backend's chat defaults, see `params_for`) with a response's
    overrides applied."""
    base = params_for(gen_cfg, checkpoint_default)
    greedy = base.greedy if options.greedy is None else options.greedy
    temperature = base.temperature if options.temperature is None else options.temperature
    seed = base.seed if options.seed is None else options.seed
    return dataclasses.replace(base, greedy=greedy or temperature == 0.0, temperature=temperature, seed=seed)
