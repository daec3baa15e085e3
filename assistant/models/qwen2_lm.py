"""Qwen2 decoder-only LM (Qwen2.5-0.5B-Instruct of the embedded backend), implementing `DecoderLM` over `KVCache`.

Owns the network: token embedding, N blocks of (RMSNorm -> grouped-query attention with q/k/v biases and rotary
positions -> residual, RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head (tied to the embedding when the
checkpoint has no separate head). Weights come from the safetensors `assistant/weights/convert.py` writes (transformers'
Qwen2 names); q/k/v and gate/up are fused at load so a decode step runs few, large matmuls.

Grouped-query attention without copying K/V: the `group = n_heads / n_kv_heads` query heads that share a KV head
are laid out as extra query rows of that KV head ([n_kv, group*T, hd]), so SDPA sees K/V exactly as cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from assistant.models.device import resolve_device, resolve_dtype
from assistant.models.kv_cache import KVCache


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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32: bf16 sums over 896 channels lose the small-variance rows.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the split-halves layout: x [..., T, hd], cos/sin [T, hd] (broadcast)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Qwen2LM:
    """Weights + forward passes. Not an nn.Module: there is no training here, and plain tensors keep it light."""

    def __init__(self, dims: Qwen2Dims, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.dims, self.device, self.dtype = dims, device, dtype
        self.vocab_size, self.hidden_size = dims.vocab_size, dims.hidden_size
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        expected = self.expected_keys(dims)
        missing, unexpected = sorted(expected - set(w)), sorted(set(w) - expected - {"lm_head.weight"})
        if missing or unexpected:
            raise ValueError(f"Qwen2 checkpoint: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        self.embed_w = w["model.embed_tokens.weight"]  # [V, H]
        self.head_w = self.embed_w if dims.tied_embeddings else w.get("lm_head.weight", self.embed_w)
        self.norm_w = w["model.norm.weight"]
        self.layers = []
        for i in range(dims.n_layers):
            p = f"model.layers.{i}."
            att = p + "self_attn."
            self.layers.append(
                {
                    "ln1": w[p + "input_layernorm.weight"],
                    "ln2": w[p + "post_attention_layernorm.weight"],
                    "qkv_w": torch.cat([w[att + f"{n}_proj.weight"] for n in "qkv"]),  # [(nh+2nkv)*hd, H]
                    "qkv_b": torch.cat([w[att + f"{n}_proj.bias"] for n in "qkv"]),
                    "o_w": w[att + "o_proj.weight"],
                    "gate_up_w": torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),  # [2I, H]
                    "down_w": w[p + "mlp.down_proj.weight"],
                }
            )
        hd = dims.head_dim
        self.inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
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
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> Qwen2LM:
        """From a directory with `config.json` + `model.safetensors` as written by `assistant.weights.convert`."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, "qwen2")
        weights = load_file(str(model_dir / "model.safetensors"))
        return cls(Qwen2Dims.from_json(model_dir / "config.json"), weights, dev, dt)

    # ------------------------------------------------------------------ DecoderLM

    def new_cache(self) -> KVCache:
        d = self.dims
        return KVCache(d.n_layers, d.n_kv_heads, d.head_dim, self.dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.device), self.embed_w)

    def rope_alpha_for(self, total_len: int) -> float:
        return 1.0  # Qwen2.5 uses plain rotary positions at these lengths

    def _grow_rope(self, n_positions: int) -> None:
        if n_positions <= self._cos.shape[0]:
            return
        n = max(n_positions, 2 * self._cos.shape[0])
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=self.device), self.inv_freq)  # [n, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [n, hd]: the same frequency on both halves
        self._cos, self._sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        d = self.dims
        n_new, start = x.shape[0], cache.length
        end = start + n_new
        group = d.n_heads // d.n_kv_heads
        cache.reserve(n_new)
        self._grow_rope(end)
        cos, sin = self._cos[start:end], self._sin[start:end]  # [T, hd]
        # Causal mask over [group*T query rows, end keys]; query row r is token r % T (see module docstring).
        rows = torch.arange(start, end, device=self.device).repeat(group)
        mask = torch.arange(end, device=self.device)[None, :] <= rows[:, None]
        h = x.to(self.dtype)
        for li, lw in enumerate(self.layers):
            a = _rms_norm(h, lw["ln1"], d.rms_norm_eps)
            qkv = F.linear(a, lw["qkv_w"], lw["qkv_b"])  # [T, (nh+2nkv)*hd]
            q, k, v = qkv.split([d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.n_kv_heads * d.head_dim], -1)
            q = _rotate(q.view(n_new, d.n_heads, d.head_dim).transpose(0, 1), cos, sin)  # [nh, T, hd]
            k = _rotate(k.view(n_new, d.n_kv_heads, d.head_dim).transpose(0, 1), cos, sin)  # [nkv, T, hd]
            v = v.view(n_new, d.n_kv_heads, d.head_dim).transpose(0, 1)
            keys, values = cache.write(li, k, v)  # [nkv, end, hd]
            q = q.reshape(d.n_kv_heads, group * n_new, d.head_dim)  # head h = kv*group + g -> row g*T + t
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [nkv, group*T, hd]
            o = o.reshape(d.n_heads, n_new, d.head_dim).transpose(0, 1).reshape(n_new, d.hidden_size)
            h = h + F.linear(o, lw["o_w"])
            h = h + self._mlp(_rms_norm(h, lw["ln2"], d.rms_norm_eps), lw)
        cache.commit(n_new)
        h = h if all_logits else h[-1:]
        return F.linear(_rms_norm(h, self.norm_w, d.rms_norm_eps), self.head_w).float()

    @torch.inference_mode()
    def decode(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One token for each of B conversations. Matmuls run batched; attention runs per conversation on its own
        cache view, which is exact for caches of different lengths and avoids copying K/V into a padded batch."""
        d = self.dims
        b = x.shape[0]
        group = d.n_heads // d.n_kv_heads
        pos = [c.length for c in caches]
        for c in caches:
            c.reserve(1)
        self._grow_rope(max(pos) + 1)
        pos_t = torch.tensor(pos, device=self.device)
        cos, sin = self._cos[pos_t][:, None, :], self._sin[pos_t][:, None, :]  # [B, 1, hd]
        h = x.to(self.dtype)
        for li, lw in enumerate(self.layers):
            a = _rms_norm(h, lw["ln1"], d.rms_norm_eps)
            qkv = F.linear(a, lw["qkv_w"], lw["qkv_b"])  # [B, (nh+2nkv)*hd]
            q, k, v = qkv.split([d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.n_kv_heads * d.head_dim], -1)
            q = _rotate(q.view(b, d.n_heads, d.head_dim), cos, sin)  # [B, nh, hd]
            k = _rotate(k.view(b, d.n_kv_heads, d.head_dim), cos, sin)  # [B, nkv, hd]
            v = v.view(b, d.n_kv_heads, d.head_dim)
            outs = []
            for i, c in enumerate(caches):
                keys, values = c.write(li, k[i, :, None], v[i, :, None])  # [nkv, len+1, hd]
                qi = q[i].view(d.n_kv_heads, group, d.head_dim)  # the group's query heads share one KV head
                outs.append(F.scaled_dot_product_attention(qi, keys, values))  # [nkv, group, hd]
            o = torch.stack(outs).reshape(b, d.hidden_size)
            h = h + F.linear(o, lw["o_w"])
            h = h + self._mlp(_rms_norm(h, lw["ln2"], d.rms_norm_eps), lw)
        for c in caches:
            c.commit(1)
        return F.linear(_rms_norm(h, self.norm_w, d.rms_norm_eps), self.head_w).float()

    def _mlp(self, a: torch.Tensor, lw: dict[str, torch.Tensor]) -> torch.Tensor:
        gate, up = F.linear(a, lw["gate_up_w"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw["down_w"])
