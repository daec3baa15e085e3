"""The QWen decoder LLM of Qwen-Audio(-Chat) over an explicit `KVCache` (implements backends.base.DecoderLM).

Facts (QWEN_AUDIO.md §4): pre-RMSNorm blocks (norm in float32), fused q|k|v with bias, no other biases, SwiGLU MLP
`c_proj(w1(z) * silu(w2(z)))`, rotate-half rotary over the whole head in float32, dynamic NTK (alpha chosen once at
the first prefill from its length, kept in `cache.rope_alpha` for the whole conversation), logn query scaling past
`seq_length`, untied `lm_head`. Parameter names follow the official state dict (`transformer.h.{i}.attn.c_attn`...).
The forward passes and the attention over the cache are `layers.CachedDecoder`'s, shared with Qwen2; this file
supplies the blocks and the QWen rotary (float32, NTK alpha per conversation, logn).

    lm = QWenLM(QWenConfig.from_json(config_dict))       # usually on the meta device, then checkpoint.load_weights
    cache = lm.new_cache()
    logits = lm.prefill(lm.embed(ids), cache)             # [1, vocab] float32 for the last position
    logits = lm.decode(lm.embed(next_ids), [cache, ...])  # [B, vocab]: one new token per conversation, batched
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from assistant.models.kv_cache import KVCache
from assistant.models.layers import (
    CachedDecoder,
    RMSNorm,
    apply_rotary,
    rotary_cos_sin,
    rotary_inv_freq,
    split_qkv,
    swiglu,
)

MAX_POSITIONS = 32767  # hard context limit of the reference (its logn table)


@dataclass(frozen=True)
class QWenConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    head_dim: int
    mlp_width: int  # intermediate_size // 2
    seq_length: int
    norm_eps: float
    rotary_base: float
    rotary_pct: float
    use_dynamic_ntk: bool
    use_logn_attn: bool

    @classmethod
    def from_json(cls, c: dict) -> QWenConfig:
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels"]
        need += ["intermediate_size", "seq_length", "layer_norm_epsilon"]
        missing = [k for k in need if k not in c]
        if missing:
            raise ValueError(f"config.json: expected the QWen keys {missing}; is this a Qwen-Audio checkpoint?")
        if c.get("rotary_pct", 1.0) != 1.0:
            raise ValueError(f"config.json: rotary_pct {c['rotary_pct']} is not supported (official value 1.0)")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            head_dim=c["kv_channels"],
            mlp_width=c["intermediate_size"] // 2,
            seq_length=c["seq_length"],
            norm_eps=float(c["layer_norm_epsilon"]),
            rotary_base=float(c.get("rotary_emb_base", 10000)),
            rotary_pct=float(c.get("rotary_pct", 1.0)),
            use_dynamic_ntk=bool(c.get("use_dynamic_ntk", True)),
            use_logn_attn=bool(c.get("use_logn_attn", True)),
        )


class Attention(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.n_heads * cfg.head_dim, bias=True)
        self.c_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=False)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=False)  # the gate
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.c_proj(swiglu(self.w2(z), self.w1(z)))


class Block(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)


class QWenLM(CachedDecoder, nn.Module):
    """`transformer.{wte,h,ln_f}` + `lm_head`; the forward passes `prefill` and `decode` are CachedDecoder's."""

    kv_group = 1  # every query head has its own K/V head

    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.hidden_size
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.transformer.ln_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # logn factors in float64 like the reference's math.log table, used as float32 multipliers.
        # Explicit CPU: the model is usually built under `torch.device("meta")` and this table is not a weight.
        p1 = torch.arange(1, MAX_POSITIONS + 1, dtype=torch.float64, device="cpu")
        self._logn = torch.where(p1 > cfg.seq_length, p1.log() / math.log(cfg.seq_length), 1.0).float()
        self._inv_freq: dict[float, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, capacity: int = 256) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_heads, c.head_dim, self.dtype, self.device, capacity=capacity)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(ids.to(self.device))

    def rope_alpha_for(self, total_len: int) -> float:
        """Dynamic NTK: 1 up to seq_length, then 3, 7, 15 ... as the length doubles (QWEN_AUDIO.md §4)."""
        if not self.cfg.use_dynamic_ntk:
            return 1.0
        context_value = math.log(total_len / self.cfg.seq_length, 2) + 1
        return float(max(2 ** math.ceil(context_value) - 1, 1))

    # -- the CachedDecoder hooks -----------------------------------------------------------------------------
    def _inv_freq_for(self, alpha: float) -> torch.Tensor:
        if alpha not in self._inv_freq:
            d = self.cfg.head_dim
            base = self.cfg.rotary_base * alpha ** (d / (d - 2))  # dynamic NTK
            self._inv_freq[alpha] = rotary_inv_freq(base, d, torch.float32, self.device)
        return self._inv_freq[alpha]

    def _cos_sin(self, positions: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] float32 for absolute `positions` [N] with NTK `alpha`."""
        return rotary_cos_sin(positions, self._inv_freq_for(alpha))

    def _rotary(
        self, positions: torch.Tensor, alphas: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cos, sin [N, 1, D] and the logn factor [N, 1, 1] (None when off) for `positions` [N]: one alpha for all
        rows (prefill, or a decode batch that agrees) or one per row. Computed once per pass, shared by every layer."""
        if len(set(alphas)) == 1:
            cos, sin = self._cos_sin(positions, alphas[0])
        else:
            parts = [self._cos_sin(positions[i : i + 1], a) for i, a in enumerate(alphas)]
            cos, sin = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        logn = None
        if self.cfg.use_logn_attn:
            last = int(positions.max())
            if last >= MAX_POSITIONS:
                raise ValueError(
                    f"position {last} is past the QWen context limit {MAX_POSITIONS}: start a new conversation"
                )
            if self._logn.device != self.device:
                self._logn = self._logn.to(self.device)
            logn = self._logn[positions][:, None, None]
        return cos[:, None], sin[:, None], logn

    def _blocks(self, x: torch.Tensor, terms, attend) -> torch.Tensor:
        """x [N, hidden] through every block. q and k are rotated in float32 (rotate-half), q then scaled by logn,
        both back in the model dtype before attention."""
        c = self.cfg
        cos, sin, logn = terms
        h = x.to(self.dtype)
        for li, block in enumerate(self.transformer.h):
            q, k, v = split_qkv(block.attn.c_attn(block.ln_1(h)), c.n_heads, c.n_heads, c.head_dim)  # [N, H, D]
            q = apply_rotary(q.float(), cos, sin).to(q.dtype)
            k = apply_rotary(k.float(), cos, sin).to(k.dtype)
            if logn is not None:
                q = q * logn.to(q.dtype)
            h = h + block.attn.c_proj(attend(li, q, k, v))
            h = h + block.mlp(block.ln_2(h))
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(h)).float()
