"""The transformers baseline of the benchmarks: `Qwen2ForCausalLM` on the very same converted bf16 tensors the
embedded backend loads (Qwen2.5-Coder-0.5B-Instruct, AWQ, Q4_K_M GGUF converted to bf16 by `prepare`), and
`generate()` timed per token with a streamer, so its decode speed excludes the prefill exactly as the engine's does
(first token -> last token / tokens after the first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


def load_qwen2(llm_dir: Path, dtype: torch.dtype):
    """transformers' Qwen2ForCausalLM, strict load of `llm_dir/model.safetensors`."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    from assistant.models.qwen2_lm import Qwen2Dims

    dims = Qwen2Dims.from_json(llm_dir / "config.json")
    model = Qwen2ForCausalLM(dims.transformers_config()).eval()
    model.load_state_dict(load_file(str(llm_dir / "model.safetensors")), strict=True)
    return model.to(dtype)


class _Clock:
    """A `generate()` streamer that only notes when each `put` came: the prompt first, then each chosen token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Generated:
    ids: torch.Tensor  # (batch, new tokens)
    first_token_s: float  # call -> first token of every row (prompt prefill included)
    decode_s: float  # first token -> last token
    decode_steps: int  # tokens per row after the first

    @property
    def decode_tok_s_per_row(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps else None


@torch.inference_mode()
def timed_generate(model, prompts: list[list[int]], n: int, pad_id: int, eos_ids: list[int] | None = None) -> Generated:
    """Greedy `generate()` of `prompts` (one row each, left-padded with `pad_id` when lengths differ). Without
    `eos_ids` exactly `n` tokens per row (same work for every row); with them, up to `n`, stopping at any of them."""
    width = max(len(p) for p in prompts)
    x = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = _Clock()
    fixed = {"min_new_tokens": n} if eos_ids is None else {"eos_token_id": eos_ids}
    t0 = time.perf_counter()
    out = model.generate(
        x, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad_id, streamer=clock, **fixed
    )
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt, put before the prefill
    return Generated(out[:, width:], first - t0, last - first, len(clock.times) - 2)
