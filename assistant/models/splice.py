"""Audio splicing: the audio encoder's embedding rows written over their placeholder runs in a prompt's token
embeddings (QWEN_AUDIO.md §3), for a whole prompt or for the part of it after a cached prefix.

    x = lm.embed(ids[reuse:])                           # [T_new, hidden]; row 0 is prompt position `reuse`
    written = splice_audio(x, prompt.audio, reuse)      # [(start, end, key)] of the spans written into x
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch


class Span(Protocol):
    """What a span needs (backends.base.AudioSpan): its first prompt position, rows [span, hidden], its audio key."""

    start: int
    embeds: torch.Tensor
    key: str


def splice_audio(x: torch.Tensor, spans: Iterable[Span], offset: int = 0) -> list[tuple[int, int, str]]:
    """Write each span's rows over x in place, where x [T, hidden] holds prompt positions offset .. offset+T-1.

    Spans that end at or before `offset` are skipped (their positions are already in the cache); a span past the
    prompt's end is a ValueError; a span that `offset` cuts is a RuntimeError (a cache prefix must never end inside
    an audio span). Returns (start, end, key) in prompt positions of the spans written."""
    written = []
    for span in spans:
        end = span.start + int(span.embeds.shape[0])
        if span.start < 0 or end > offset + x.shape[0]:
            where = f"[{span.start}, {end})"
            raise ValueError(f"audio span {span.key!r} at {where} lies outside the {offset + x.shape[0]}-id prompt")
        if end <= offset:
            continue
        if span.start < offset:
            raise RuntimeError(f"cache prefix {offset} ends inside audio span {span.start}..{end} ({span.key})")
        x[span.start - offset : end - offset] = span.embeds.to(device=x.device, dtype=x.dtype)
        written.append((span.start, end, span.key))
    return written
