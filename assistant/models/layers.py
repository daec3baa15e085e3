"""Building blocks shared by the networks. The decoder LLMs (`qwen_lm.QWenLM` of Qwen-Audio, `qwen2_lm.Qwen2LM` of
the embedded backend) share RMSNorm, rotate-half rotary, SwiGLU, the fused q|k|v split, attention over `KVCache`s
(one prefill, one batched decode step over conversations of different lengths) and `CachedDecoder`, their forward
passes. The
Whisper-style encoders and decoder (`whisper.py`, `qwen_audio_encoder.py`) share `multi_head_attention`.

Numerics stay each model's own: the functions compute in the dtype they are given (`rms_norm` alone always takes
its statistics in float32), so QWen rotates float32 copies of q and k while Qwen2 rotates in the model dtype.

Layouts: `N` = new positions (the prompt chunk at prefill, one row per conversation at decode), `H` query heads,
`Hkv` key/value heads (`H` = `group * Hkv`; QWen has group 1), `D` head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from assistant.models.kv_cache import BatchedKV, KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in float32 whatever the model dtype (bf16 sums of squares lose the small-variance rows), then
    back to x's dtype, then times weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


class RMSNorm(nn.Module):
    """`rms_norm` with its weight as a parameter (nn.Module models: the state dict names it `<name>.weight`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a | b] -> [-b | a] over the last dimension (the NeoX / split-halves rotary layout)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary_inv_freq(base: float, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[head_dim / 2] rotary frequencies base ** (-2i / head_dim), computed in `dtype`."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for absolute `positions` [N], in inv_freq's dtype (the same frequency on both halves)."""
    angles = torch.outer(positions.to(inv_freq.dtype), inv_freq)  # [N, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: x [..., D] with cos/sin broadcastable to it (the same frequency on both halves)."""
    return x * cos + rotate_half(x) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP's inner activation: silu(gate) * up (before the down projection)."""
    return F.silu(gate) * up


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention without a cache (the Whisper-style encoders and decoder): q [B, Tq, S], k/v [B, Tk, S] ->
    [B, Tq, S]; mask broadcastable to [B, heads, Tq, Tk] (True = attend); scale None = 1/sqrt(head_dim)."""
    b, tq, s = q.shape
    hd = s // heads
    q = q.view(b, tq, heads, hd).transpose(1, 2)  # [B, H, Tq, hd]
    k = k.view(b, k.shape[1], heads, hd).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, H, Tq, hd]
    return o.transpose(1, 2).reshape(b, tq, s)


def split_qkv(
    qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection [N, (H + 2*Hkv) * D] (q | k | v, each head contiguous) -> q [N, H, D], k and v [N, Hkv, D]."""
    n = qkv.shape[0]
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return q.view(n, n_heads, head_dim), k.view(n, n_kv_heads, head_dim), v.view(n, n_kv_heads, head_dim)


def causal_mask(past: int, n_new: int, group: int, device: torch.device) -> torch.Tensor:
    """[group * N, past + N] boolean, True = attend: query row r is new token r % N (absolute past + r % N) and
    sees keys 0 .. past + r % N. Built once per prefill, shared by every layer."""
    rows = torch.arange(past, past + n_new, device=device).repeat(group)
    return torch.arange(past + n_new, device=device)[None, :] <= rows[:, None]


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, mask: torch.Tensor
) -> torch.Tensor:
    """Causal attention of N new positions over one conversation: stores k, v [N, Hkv, D] (post-rotary) in `cache`
    at `layer` after its committed positions, attends q [N, H, D] over everything stored; returns [N, H * D].

    Grouped-query attention without copying K/V: the `group` query heads that share a KV head are laid out as extra
    query rows of that KV head ([Hkv, group * N, D]), so SDPA sees K/V exactly as cached (`mask` from causal_mask)."""
    n, h, d = q.shape
    hkv = k.shape[1]
    keys, values = cache.write(layer, k.transpose(0, 1), v.transpose(0, 1))  # [Hkv, past + N, D]
    q = q.transpose(0, 1).reshape(hkv, (h // hkv) * n, d)  # head h = kv * group + g -> row g * N + t
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [Hkv, group * N, D]
    return o.reshape(h, n, d).transpose(0, 1).reshape(n, h * d)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    caches: list[KVCache],
    layer: int,
    batch: BatchedKV | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new position for each of B conversations: row i's k, v [Hkv, D] go into caches[i] at `layer`, and its q
    [H, D] attends over that conversation's keys alone; q [B, H, D], k and v [B, Hkv, D] -> [B, H * D].

    One conversation attends straight from its cache. A batch (B > 1) attends in one call over `batch`, the padded
    copy of its caches (`BatchedKV`, which takes the new k, v too), with `mask` (`batch.attend_mask()`) hiding each
    row's padding: exact for caches of different lengths. Grouped-query attention as in prefill: the `group` query
    heads of a KV head are its query rows."""
    b, h, d = q.shape
    hkv = k.shape[1]
    for i, c in enumerate(caches):
        keys, values = c.write(layer, k[i, :, None], v[i, :, None])  # the session keeps them; [Hkv, len_i + 1, D]
    if batch is None:
        if b != 1:
            raise ValueError(f"decode_attention: {b} rows need a BatchedKV")
        return F.scaled_dot_product_attention(q[0].view(hkv, h // hkv, d), keys, values).reshape(1, h * d)
    keys, values = batch.write(layer, k, v)  # [B, Hkv, longest + 1, D]
    o = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, d), keys, values, attn_mask=mask)
    return o.reshape(b, h * d)


class CachedDecoder:
    """The `DecoderLM` forward passes over `KVCache`s, the same for every decoder LLM here; a model supplies its
    network through four hooks:

        kv_group                                   query heads per KV head (n_heads // n_kv_heads)
        _rotary(positions [N], alphas) -> terms    its rotary terms for absolute positions, one NTK alpha per row
        _blocks(x [N, hidden], terms, attend) -> h every block; `attend(layer, q, k, v)` is the attention over
                                                   the cache(s) (prefill_attention or decode_attention)
        _logits(h [N, hidden]) -> [N, vocab]       final norm, LM head, float32
    plus `device`, `dtype` and `rope_alpha_for` of the DecoderLM protocol."""

    kv_group: int
    device: torch.device

    def rope_alpha_for(self, total_len: int) -> float:
        raise NotImplementedError

    def _rotary(self, positions: torch.Tensor, alphas: list[float]):
        raise NotImplementedError

    def _blocks(self, x: torch.Tensor, terms, attend) -> torch.Tensor:
        raise NotImplementedError

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append x [N, hidden] to one conversation; float32 logits [N or 1, vocab]. The rope alpha (dynamic NTK)
        is chosen at the conversation's first prefill and kept in the cache."""
        n = x.shape[0]
        if cache.length == 0:
            cache.rope_alpha = self.rope_alpha_for(n)
        past = cache.length
        cache.reserve(n)
        terms = self._rotary(torch.arange(past, past + n, device=self.device), [float(cache.rope_alpha)])
        mask = causal_mask(past, n, self.kv_group, self.device)
        h = self._blocks(x, terms, lambda li, q, k, v: prefill_attention(q, k, v, cache, li, mask))
        cache.commit(n)
        return self._logits(h if all_logits else h[-1:])

    def decode(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One token per conversation: x [B, hidden] -> float32 logits [B, vocab]. Caches may differ in length and
        rope alpha: each row uses its own position and alpha and attends over its own keys, so each row equals its
        unbatched pass. A batch keeps its padded K/V copy (`BatchedKV`) from step to step while its caches are the
        same; it is dropped when a single conversation decodes."""
        b = x.shape[0]
        if b != len(caches):
            raise ValueError(f"decode: expected one cache per row, got {b} rows and {len(caches)} caches")
        for c in caches:
            c.reserve(1)
        batch = None
        if b > 1:
            batch = getattr(self, "_decode_batch", None)
            if batch is None or not batch.serves(caches):
                batch = BatchedKV(caches)
        self._decode_batch = batch
        mask = batch.attend_mask() if batch is not None else None
        positions = torch.tensor([c.length for c in caches], device=self.device)
        terms = self._rotary(positions, [float(c.rope_alpha) for c in caches])
        h = self._blocks(x, terms, lambda li, q, k, v: decode_attention(q, k, v, caches, li, batch, mask))
        for c in caches:
            c.commit(1)
        if batch is not None:
            batch.advance()
        return self._logits(h)
