"""Shared system-prompt KV snapshots: a new session's first answer prefills only what follows the system message.

Every session's prompt starts with the same rendered system block (chatml `<|im_start|>system\\n...<|im_end|>\\n`
for both backends), so its keys/values are identical across sessions with the same instructions. `PrefixSnapshots`
keeps, per distinct prefix, a read-only `KVCache` holding exactly those leading positions; the worker copies one
into a session's empty cache (`KVCache.copy_prefix_from`) and prefills only the rest.

Decisions written down here because callers rely on them:
- The prefix boundary is derived, not hard-coded: the backend renders the same system text with two different
  one-line user turns and no history, and the longest token prefix the two prompts share is the prefix (it covers
  the system block and the chatml header of the user message). A prompt uses a snapshot only if it really starts
  with the snapshot's tokens and no audio span begins inside them, so a boundary that a tokenizer merge moved
  costs a miss, never a wrong answer.
- Key = (prefix token ids, rope alpha). Qwen-Audio's dynamic NTK picks the rotary alpha from the first prefill's
  length and the cached keys are post-rotary, so a snapshot serves only prompts whose alpha is the same; different
  instructions render different ids and so never share a snapshot.
- Snapshots are harvested, not computed: after a session prefilled a whole prompt from an empty cache, its first
  `n` positions are copied out (no extra model work). At most `MAX_SNAPSHOTS` are kept, least recently used dropped.
- Their tokens count in the engine's cache budget (`tokens`); the worker evicts idle sessions first and drops
  snapshots only when busy sessions alone fill the budget.
"""

from __future__ import annotations

from collections import OrderedDict

from assistant.backends.base import Backend, PreparedTurn, Prompt
from assistant.models.kv_cache import KVCache

MAX_SNAPSHOTS = 8  # distinct instructions x NTK alphas; each is only ~tens of tokens of K/V
_MAX_BOUNDARIES = 64  # system text -> boundary memo (a few ints each)
# Two user turns that differ in their very first character: their prompts share exactly the part before the turn.
_PROBES = ("A", "?")


class PrefixSnapshots:
    """LRU of read-only system-prefix KV snapshots (worker thread only, like every cache)."""

    def __init__(self, backend: Backend, window_tokens: int, max_snapshots: int = MAX_SNAPSHOTS):
        self.backend, self.window_tokens, self.max_snapshots = backend, window_tokens, max_snapshots
        self._snapshots: OrderedDict[tuple[tuple[int, ...], float], KVCache] = OrderedDict()
        self._boundaries: OrderedDict[str, int] = OrderedDict()

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self._snapshots.values())

    def __len__(self) -> int:
        return len(self._snapshots)

    def boundary(self, system: str) -> int:
        """Length of the token prefix every prompt with this system text shares (0 if the probes share nothing)."""
        n = self._boundaries.get(system)
        if n is None:
            a, b = (
                self.backend.build_prompt(system, [], PreparedTurn(key=f"prefix-probe-{i}", user_text=t), 1 << 30).ids
                for i, t in enumerate(_PROBES)
            )
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            self._boundaries[system] = n
            while len(self._boundaries) > _MAX_BOUNDARIES:
                self._boundaries.popitem(last=False)
        self._boundaries.move_to_end(system)
        return n

    def _key(self, system: str, prompt: Prompt, rope_alpha: float) -> tuple[tuple[int, ...], float] | None:
        """The snapshot key `prompt` would use, or None when it has no usable shared prefix."""
        n = self.boundary(system)
        # keep at least one position to prefill: its logits choose the first token
        if n <= 0 or n >= len(prompt.ids) or any(span.start < n for span in prompt.audio):
            return None
        return tuple(prompt.ids[:n]), float(rope_alpha)

    def restore(self, system: str, prompt: Prompt, rope_alpha: float, cache: KVCache) -> int:
        """Fill the empty `cache` from a matching snapshot; returns the positions restored (0 = no snapshot)."""
        if cache.length:
            raise RuntimeError(f"PrefixSnapshots.restore expects an empty session cache, got {cache.length} positions")
        key = self._key(system, prompt, rope_alpha)
        snap = self._snapshots.get(key) if key else None
        if snap is None:
            return 0
        self._snapshots.move_to_end(key)
        cache.copy_prefix_from(snap, snap.length)
        return snap.length

    def store(self, system: str, prompt: Prompt, rope_alpha: float, cache: KVCache) -> bool:
        """After `cache` was prefilled with the whole `prompt` from empty: keep its shared prefix if new."""
        key = self._key(system, prompt, rope_alpha)
        if key is None or key in self._snapshots or cache.rope_alpha != key[1]:
            return False
        n = len(key[0])
        if cache.length < n or cache.token_ids[:n] != list(key[0]):
            return False
        snap = KVCache(cache.n_layers, cache.n_kv_heads, cache.head_dim, cache.dtype, cache.device, capacity=n)
        snap.copy_prefix_from(cache, n)
        self._snapshots[key] = snap
        while len(self._snapshots) > self.max_snapshots:
            self._snapshots.popitem(last=False)
        return True

    def drop_oldest(self) -> bool:
        """Forget the least recently used snapshot (cache budget pressure); False if there was none."""
        if not self._snapshots:
            return False
        self._snapshots.popitem(last=False)
        return True
