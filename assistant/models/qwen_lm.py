"""The QWen decoder LLM of Qwen-Audio(-Chat) over an explicit `KVCache` (implements backends.base.DecoderLM).

Facts (QWEN_AUDIO.md §4): pre-RMSNorm blocks (norm in float32), fused q|k|v with bias, no other biases, SwiGLU MLP
`c_proj(w1(z) * silu(w2(z)))`, rotate-half rotary over the whole head in float32, dynamic NTK (alpha chosen once at
the first prefill from its length, kept in `cache.rope_alpha` for the whole conversation), logn query scaling past
`seq_length`, untied `lm_head`. Parameter names follow the official state dict (`transformer.h.{i}.attn.c_attn`...).

    lm = QWenLM(QWenConfig.from_json(config_dict))       # usually on the meta device, then checkpoint.load_weights
    cache = lm.new_cache()
    logits = lm.prefill(lm.embed(ids), cache)             # [1, vocab] float32 for the last position
    logits = lm.decode(lm.embed(next_ids), [cache, ...])  # [B, vocab]: one new token per conversation, batched
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from assistant.models.kv_cache import KVCache

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the model dtype (bf16 sums of squares lose too much), then back, then weight.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.n_heads * cfg.head_dim, bias=True)
        self.c_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> q, k, v each [n_heads, N, head_dim]."""
        n = x.shape[0]
        q, k, v = self.c_attn(x).split(self.n_heads * self.head_dim, dim=-1)
        # [N, H*D] -> [N, H, D] -> [H, N, D]
        return tuple(t.view(n, self.n_heads, self.head_dim).transpose(0, 1) for t in (q, k, v))  # type: ignore


class MLP(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=False)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=False)  # the gate
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(z) * F.silu(self.w2(z)))


class Block(nn.Module):
    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)


class QWenLM(nn.Module):
    """`transformer.{wte,h,ln_f}` + `lm_head`; the forward passes are `prefill` and `decode`."""

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

    # -- rotary and logn ---------------------------------------------------------------------------------------
    def _rotary(self, positions: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] float32 for absolute `positions` [N] with NTK `alpha`."""
        if alpha not in self._inv_freq:
            d = self.cfg.head_dim
            base = self.cfg.rotary_base * alpha ** (d / (d - 2))
            inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.device) / d))
            self._inv_freq[alpha] = inv
        freqs = torch.outer(positions.to(torch.float32), self._inv_freq[alpha])  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos(), emb.sin()

    def _position_terms(
        self, positions: torch.Tensor, alphas: list[float] | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cos, sin [N, D] and the logn factor [N] (None when off) for `positions` [N]: one alpha for all rows
        (prefill) or one per row (batched decode). Computed once per forward pass, shared by every layer."""
        if isinstance(alphas, float):
            cos, sin = self._rotary(positions, alphas)
        else:
            parts = [self._rotary(positions[i : i + 1], a) for i, a in enumerate(alphas)]
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
            logn = self._logn[positions]
        return cos, sin, logn

    @staticmethod
    def _rope_q_k(
        q: torch.Tensor, k: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k [H, N, D] in float32 (rotate-half), then scale q by logn; back in the input dtype."""
        cos, sin, logn = terms
        qf, kf = q.float(), k.float()
        qf = qf * cos + rotate_half(qf) * sin
        kf = kf * cos + rotate_half(kf) * sin
        q, k = qf.to(q.dtype), kf.to(k.dtype)
        if logn is not None:
            q = q * logn.to(q.dtype)[None, :, None]
        return q, k

    # -- forward passes --------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append x [T, hidden] to one conversation; float32 logits [T or 1, vocab]."""
        t = x.shape[0]
        if cache.length == 0:
            cache.rope_alpha = self.rope_alpha_for(t)
        past = cache.length
        cache.reserve(t)
        positions = torch.arange(past, past + t, device=self.device)
        # New token i (absolute past+i) sees keys 0..past+i: [T, past+T] boolean, True = attend.
        mask = torch.ones(t, past + t, dtype=torch.bool, device=self.device).tril(diagonal=past)
        terms = self._position_terms(positions, float(cache.rope_alpha))
        h = x.to(self.dtype)
        for li, block in enumerate(self.transformer.h):
            q, k, v = block.attn.qkv(block.ln_1(h))
            q, k = self._rope_q_k(q, k, terms)
            keys, values = cache.write(li, k, v)  # [H, past+T, D]
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [H, T, D]
            h = h + block.attn.c_proj(a.transpose(0, 1).reshape(t, -1))
            h = h + block.mlp(block.ln_2(h))
        cache.commit(t)
        if not all_logits:
            h = h[-1:]
        return self.lm_head(self.transformer.ln_f(h)).float()

    def decode(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One token per conversation: x [B, hidden] -> float32 logits [B, vocab]. Caches may differ in length and
        rope alpha: rotary uses each row's own alpha and position, attention reads each row's own cache, so each
        row equals its unbatched pass."""
        b = x.shape[0]
        if b != len(caches):
            raise ValueError(f"decode: expected one cache per row, got {b} rows and {len(caches)} caches")
        for c in caches:
            c.reserve(1)
        lengths = [c.length for c in caches]
        positions = torch.tensor(lengths, device=self.device)
        alphas = [float(c.rope_alpha) for c in caches]
        terms = self._position_terms(positions, alphas[0] if len(set(alphas)) == 1 else alphas)
        h = x.to(self.dtype)
        for li, block in enumerate(self.transformer.h):
            q, k, v = block.attn.qkv(block.ln_1(h))  # [H, B, D]
            q, k = self._rope_q_k(q, k, terms)
            # Attention row by row straight from each cache (no pad-stacked copy of all keys per layer and step:
            # that copy costs B x context x width of memory traffic and dominated the step at long contexts).
            # The projections and the MLP, where the FLOPs are, stay batched.
            rows = []
            for i, c in enumerate(caches):
                keys, values = c.write(li, k[:, i : i + 1], v[:, i : i + 1])  # [H, len_i + 1, D]
                rows.append(F.scaled_dot_product_attention(q[:, i : i + 1], keys, values))  # [H, 1, D]
            a = torch.cat(rows, dim=1).transpose(0, 1)  # [H, B, D] -> [B, H, D]
            h = h + block.attn.c_proj(a.reshape(b, -1))
            h = h + block.mlp(block.ln_2(h))
        for c in caches:
            c.commit(1)
        return self.lm_head(self.transformer.ln_f(h)).float()
