"""Qwen2 decoder-only LM (Qwen2.5-0.5B-Instruct of the embedded backend), implementing `DecoderLM` over `KVCache`.

Owns the network: token embedding, N blocks of (RMSNorm -> grouped-query attention with q/k/v biases and rotary
positions -> residual, RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head (tied to the embedding when the
checkpoint has no separate head). Weights come from the safetensors `assistant/weights/convert.py` writes
(transformers' Qwen2 names); q/k/v and gate/up are fused at load so a decode step runs few, large matmuls, and every
matmul (the LM head included) is quantized at load when asked (`quant.make_linear`: "none", "int8", "int4"; the
embedding table stays as stored). Rotary runs in the model dtype from a cos/sin table. The forward passes
and the (grouped-query) attention over the cache are `layers.CachedDecoder`'s, shared with QWen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from assistant.models.device import resolve_device, resolve_dtype
from assistant.models.kv_cache import KVCache
from assistant.models.layers import (
    CachedDecoder,
    apply_rotary,
    rms_norm,
    rotary_cos_sin,
    rotary_inv_freq,
    split_qkv,
    swiglu,
)
from assistant.models.quant import QUANT_FORMAT, make_linear, quantize, resolve_quantization


@dataclass(frozen=True)
class Qwen2Dims:
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def transformers_config(self):
        """The same dimensions as a transformers `Qwen2Config` (tests and the benchmark compare against it)."""
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tied_embeddings,
            max_position_embeddings=32768,
        )

    @classmethod
    def from_json(cls, path: Path) -> Qwen2Dims:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


def _save_quantized(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write the quantized matrices atomically (two processes may load at once); a read-only cache only costs the
    next load its quantizing time."""
    import logging
    import os

    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logging.getLogger(__name__).warning(
            "could not cache the quantized LLM at %s (%s); it is quantized again at every load", path, e
        )


class Qwen2LM(CachedDecoder):
    """Weights + the CachedDecoder hooks. Not an nn.Module: there is no training here, and plain tensors keep it
    light."""

    def __init__(
        self,
        dims: Qwen2Dims,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        quantization: str = "none",
        stored: dict[str, torch.Tensor] | None = None,
    ):
        """`stored`: the quantized matrices as `quant.quantize` made them, under "<layer>/<tensor>" names (what
        `quantized` holds after a first build, and `load` caches on disk); the others are quantized here."""
        self.dims, self.device, self.dtype, self.quantization = dims, device, dtype, quantization
        self.vocab_size, self.hidden_size = dims.vocab_size, dims.hidden_size
        self.kv_group = dims.n_heads // dims.n_kv_heads
        expected = self.expected_keys(dims)
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected - {"lm_head.weight"})
        if missing or unexpected:
            raise ValueError(f"Qwen2 checkpoint: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        stored = stored or {}
        self.quantized: dict[str, torch.Tensor] = {}  # every quantized matrix in its stored form, by layer name

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def linear(key: str, names: list[str], bias: list[str] | None = None):
            """The named weights fused along the output rows, quantized as asked (one matrix at a time, so the
            float copies of a quantized model never all exist at once) unless `stored` has them already."""

            def fused(parts: list[str]) -> torch.Tensor:
                return w(parts[0]) if len(parts) == 1 else torch.cat([w(n) for n in parts])

            b = fused(bias) if bias else None
            if quantization == "none":
                return make_linear(fused(names), b, quantization)
            mine = {k.split("/", 1)[1]: v.to(device) for k, v in stored.items() if k.split("/", 1)[0] == key}
            if not mine:
                mine = quantize(fused(names), quantization)
            self.quantized.update({f"{key}/{k}": v for k, v in mine.items()})
            return make_linear(None, b, quantization, mine)

        # [V, H] as stored (bf16 from `prepare`): a lookup casts its rows exactly, and a float32 copy of the table
        # would cost 0.5 GB for nothing
        self.embed_w = weights["model.embed_tokens.weight"].to(device)
        head = "model.embed_tokens.weight" if dims.tied_embeddings else "lm_head.weight"
        self.head = linear("head", [head if head in weights else "model.embed_tokens.weight"])
        self.norm_w = w("model.norm.weight")
        self.layers = []
        for i in range(dims.n_layers):
            p = f"model.layers.{i}."
            att = p + "self_attn."
            self.layers.append(
                {
                    "ln1": w(p + "input_layernorm.weight"),
                    "ln2": w(p + "post_attention_layernorm.weight"),
                    # [(nh+2nkv)*hd, H] with the q|k|v biases
                    "qkv": linear(
                        f"{i}.qkv", [att + f"{n}_proj.weight" for n in "qkv"], [att + f"{n}_proj.bias" for n in "qkv"]
                    ),
                    "o": linear(f"{i}.o", [att + "o_proj.weight"]),
                    "gate_up": linear(f"{i}.gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    "down": linear(f"{i}.down", [p + "mlp.down_proj.weight"]),
                }
            )
        hd = dims.head_dim
        self.inv_freq = rotary_inv_freq(dims.rope_theta, hd, torch.float64, device)  # table built in float64
        self._cos = self._sin = torch.empty(0, hd, device=device, dtype=dtype)
        self._grow_rope(4096)

    @staticmethod
    def expected_keys(dims: Qwen2Dims) -> set[str]:
        keys = {"model.embed_tokens.weight", "model.norm.weight"}
        for i in range(dims.n_layers):
            p = f"model.layers.{i}."
            keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
            keys |= {p + f"self_attn.{n}_proj.{k}" for n in "qkv" for k in ("weight", "bias")}
            keys |= {p + "self_attn.o_proj.weight"} | {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        return keys

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto", quantization: str = "none"
    ) -> Qwen2LM:
        """From a directory with `config.json` + `model.safetensors` as written by `assistant.weights.convert`;
        `quantization` as in `quant.make_linear`. A quantized model's matrices are cached beside the weights
        (`quantized-<mode>-v<QUANT_FORMAT>.safetensors`, written at the first load): reading them back is far cheaper
        than quantizing again. The file goes when `prepare` rebuilds the directory."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, "qwen2")
        weights = load_file(str(model_dir / "model.safetensors"))
        quant = resolve_quantization(quantization, dev)
        dims = Qwen2Dims.from_json(model_dir / "config.json")
        cached = model_dir / f"quantized-{quant}-v{QUANT_FORMAT}.safetensors"
        stored = load_file(str(cached)) if quant != "none" and cached.is_file() else None
        lm = cls(dims, weights, dev, dt, quant, stored)
        if quant != "none" and stored is None:
            _save_quantized(lm.quantized, cached)
        return lm

    # ------------------------------------------------------------------ DecoderLM

    def new_cache(self) -> KVCache:
        d = self.dims
        return KVCache(d.n_layers, d.n_kv_heads, d.head_dim, self.dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.device), self.embed_w).to(self.dtype)

    def rope_alpha_for(self, total_len: int) -> float:
        return 1.0  # Qwen2.5 uses plain rotary positions at these lengths

    def _grow_rope(self, n_positions: int) -> None:
        if n_positions <= self._cos.shape[0]:
            return
        n = max(n_positions, 2 * self._cos.shape[0])
        cos, sin = rotary_cos_sin(torch.arange(n, device=self.device), self.inv_freq)  # [n, hd] float64
        self._cos, self._sin = cos.to(self.dtype), sin.to(self.dtype)

    def _rotary(self, positions: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, hd] in the model dtype for absolute `positions` [N] (plain rotary: alpha is always 1)."""
        self._grow_rope(int(positions.max()) + 1)
        return self._cos[positions][:, None, :], self._sin[positions][:, None, :]

    def _blocks(self, x: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], attend) -> torch.Tensor:
        """x [N, hidden] through every block; q and k are rotated in the model dtype."""
        d = self.dims
        cos, sin = terms
        h = x.to(self.dtype)
        for li, lw in enumerate(self.layers):
            qkv = lw["qkv"](rms_norm(h, lw["ln1"], d.rms_norm_eps))  # [N, (nh+2nkv)*hd]
            q, k, v = split_qkv(qkv, d.n_heads, d.n_kv_heads, d.head_dim)  # [N, nh, hd], [N, nkv, hd] x2
            h = h + lw["o"](attend(li, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))
            gate, up = lw["gate_up"](rms_norm(h, lw["ln2"], d.rms_norm_eps)).chunk(2, dim=-1)
            h = h + lw["down"](swiglu(gate, up))
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(h, self.norm_w, self.dims.rms_norm_eps)).float()
