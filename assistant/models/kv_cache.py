"""KV cache of one conversation, shared by every decoder LM in `assistant/models/`.

The engine owns one `KVCache` per session and keeps it between turns, so a new turn prefills only its new tokens.
Storage per layer is `[n_kv_heads, capacity, head_dim]` (keys post-rotary); capacity grows by doubling so appends
are amortised O(1). `token_ids` mirrors what is stored (audio placeholders included) and `segment_keys` names the
audio whose embeddings fill placeholder runs, so the engine can find the longest reusable prefix of a new prompt.

`BatchedKV` is the padded copy a batched decode step attends over (one tensor per layer for the whole batch, so
attention is one call instead of one per conversation); `KVCache.revision` tells it when a cache changed under it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 256,
    ):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = max(1, capacity)
        self.k = [self._empty(self.capacity) for _ in range(n_layers)]
        self.v = [self._empty(self.capacity) for _ in range(n_layers)]
        self.length = 0  # tokens whose K/V are stored and committed
        self.token_ids: list[int] = []  # the ids at positions 0..length-1 (engine bookkeeping)
        self.segment_keys: list[tuple[int, int, str]] = []  # (start, end, key) of spliced audio spans
        self.rope_alpha: float = 1.0  # dynamic-NTK alpha fixed at the first prefill (QWen); 1.0 otherwise
        # bumped by every commit, truncate, copy and reset: a copy of the contents (BatchedKV) taken at one
        # revision is still exact while the revision is unchanged
        self.revision = 0

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.zeros(self.n_kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)

    def reserve(self, n_new: int) -> None:
        """Make room for `n_new` more positions (call once before a forward pass)."""
        need = self.length + n_new
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = self._empty(cap)
                new[:, : self.length] = old[:, : self.length]
                store[i] = new
        self.capacity = cap

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` [n_kv_heads, T, head_dim] at positions length..length+T-1 of `layer` (not yet committed)
        and return views of all keys/values [n_kv_heads, length+T, head_dim]."""
        t = k.shape[1]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KVCache.write past capacity ({end} > {self.capacity}); call reserve({t}) first")
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def commit(self, n_new: int) -> None:
        """Advance the length after all layers have written `n_new` positions."""
        self.length += n_new
        self.revision += 1

    def truncate(self, n: int) -> None:
        """Keep only the first `n` positions (stale data beyond stays allocated and is overwritten later)."""
        n = max(0, min(n, self.length))
        self.length = n
        self.revision += 1
        del self.token_ids[n:]
        self.segment_keys = [s for s in self.segment_keys if s[1] <= n]

    def copy_prefix_from(self, other: KVCache, n: int) -> None:
        """Replace this cache's contents with the first `n` positions of `other` (K/V, ids, audio spans, rope alpha);
        `other` is only read (shared system-prompt snapshots are copied into many sessions)."""
        dims = (self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)
        other_dims = (other.n_layers, other.n_kv_heads, other.head_dim, other.dtype)
        if dims != other_dims:
            raise ValueError(f"copy_prefix_from: cache shape {dims} differs from the source's {other_dims}")
        if not 0 <= n <= other.length:
            raise ValueError(f"copy_prefix_from: n={n} outside the source's 0..{other.length} stored positions")
        self.length = 0
        self.reserve(n)
        for mine, theirs in ((self.k, other.k), (self.v, other.v)):
            for layer in range(self.n_layers):
                mine[layer][:, :n] = theirs[layer][:, :n]
        self.length = n
        self.revision += 1
        self.token_ids = list(other.token_ids[:n])
        self.segment_keys = [s for s in other.segment_keys if s[1] <= n]
        self.rope_alpha = other.rope_alpha

    def reset(self) -> None:
        self.truncate(0)
        self.rope_alpha = 1.0

    def release(self) -> None:
        """Drop the storage (LRU eviction); the cache stays usable and regrows on the next prefill."""
        self.capacity = 1
        self.k = [self._empty(1) for _ in range(self.n_layers)]
        self.v = [self._empty(1) for _ in range(self.n_layers)]
        self.reset()

    @property
    def nbytes(self) -> int:
        per = self.n_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.capacity * per


class BatchedKV:
    """The K/V of one decode batch's caches, padded into one tensor per layer: [B, n_kv_heads, capacity, head_dim].

    A batched decode step writes each row's new position both into the row's own `KVCache` (which the session keeps
    between turns) and here, then attends over this copy in one call with a mask of each row's valid positions.
    The copy is taken once, when the batch's caches change (a response joins or ends, a cache was truncated or
    prefilled: `KVCache.revision`), or when a row outgrows `capacity`; between those, a step copies nothing.
    `capacity` is the longest cache plus `headroom` positions, so a copy serves many steps."""

    def __init__(self, caches: list[KVCache], headroom: int = 128):
        first = caches[0]
        self.caches = list(caches)
        self.lengths = torch.tensor([c.length for c in caches], device=first.device)
        self.longest = int(self.lengths.max())
        self.capacity = self.longest + 1 + headroom
        shape = (len(caches), first.n_kv_heads, self.capacity, first.head_dim)
        self.k, self.v = [], []
        for layer in range(first.n_layers):
            k = torch.zeros(shape, dtype=first.dtype, device=first.device)
            v = torch.zeros(shape, dtype=first.dtype, device=first.device)
            for i, c in enumerate(caches):
                k[i, :, : c.length] = c.k[layer][:, : c.length]
                v[i, :, : c.length] = c.v[layer][:, : c.length]
            self.k.append(k)
            self.v.append(v)
        self.revisions = [c.revision for c in caches]
        self._rows = torch.arange(len(caches), device=first.device)

    def serves(self, caches: list[KVCache]) -> bool:
        """True when this copy still equals `caches` (same caches, same order, unchanged since the last step) and
        has room for one more position in every row."""
        return (
            len(caches) == len(self.caches)
            and all(a is b for a, b in zip(caches, self.caches, strict=True))
            and [c.revision for c in caches] == self.revisions
            and self.longest + 1 <= self.capacity
        )

    def attend_mask(self) -> torch.Tensor:
        """[B, 1, 1, longest + 1] boolean, True = attend: each row's stored positions and the one being written."""
        width = self.longest + 1
        return (torch.arange(width, device=self.lengths.device)[None, :] <= self.lengths[:, None])[:, None, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's new k, v [B, n_kv_heads, head_dim] at position lengths[i] of `layer`; returns the keys and values
        [B, n_kv_heads, longest + 1, head_dim] (views, padded past each row's length)."""
        self.k[layer][self._rows, :, self.lengths] = k
        self.v[layer][self._rows, :, self.lengths] = v
        width = self.longest + 1
        return self.k[layer][:, :, :width], self.v[layer][:, :, :width]

    def advance(self) -> None:
        """After the step's caches committed their position: this copy follows them."""
        self.lengths += 1
        self.longest += 1
        self.revisions = [c.revision for c in self.caches]
