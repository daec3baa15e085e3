"""Token ids -> streamed text, and the two decoding paths that must agree.

- `StreamDecoder(tokenizer).push(id) -> str`, `.finish() -> str`: incremental detokenizer; never splits a UTF-8
  character, special tokens written as their text.
- `response_text(tokenizer, ids)`: QWEN_AUDIO.md §6: ids up to the first stop id, specials kept, invalid UTF-8
  replaced, whitespace stripped.
- `TokenStream`: what the engine's batched decode loop holds per response. Its deltas concatenate exactly to the
  text that enters the history: leading whitespace is dropped and trailing whitespace held back until more text
  follows, and an incomplete UTF-8 sequence is never split.
- `prefill_prompt(lm, cache, prompt, reuse)`: the engine's prefill of the part of a prompt its cache lacks.
- `generate_stream(backend, prompt, params, max_new_tokens)`: the slow single-sequence reference (fresh cache, whole
  prompt, one id at a time) that the engine's batched path is checked against, and what `ask` runs; stops at the
  first stop id (not yielded) or after max_new_tokens; a last `Step(None, text)` carries incomplete UTF-8 as U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from assistant.backends.base import Backend, DecoderLM, Prompt, SamplingParams, Tokenizer
from assistant.engine.sampling import Sampler
from assistant.models.kv_cache import KVCache
from assistant.models.splice import splice_audio


class StreamDecoder:
    """Token ids -> text deltas that never split a UTF-8 character (invalid bytes become U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def finish(self) -> str:
        """Whatever incomplete bytes remain, as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def until_stop(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in tokenizer.stop_ids:
            return ids[:i]
    return list(ids)


def response_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode_bytes(until_stop(tokenizer, ids)).decode("utf-8", errors="replace").strip()


def prompt_embeddings(lm: DecoderLM, prompt: Prompt) -> torch.Tensor:
    """[T, hidden]: embeddings of prompt.ids with every audio span's rows written over its placeholder run."""
    x = lm.embed(torch.tensor(prompt.ids, dtype=torch.long, device=lm.device))
    splice_audio(x, prompt.audio)
    return x


@dataclass(frozen=True)
class Step:
    token_id: int | None  # None only for the final flush of incomplete UTF-8
    text: str  # the text this id releases (may be empty: part of a multi-byte character)


@torch.inference_mode()
def generate_stream(
    backend: Backend, prompt: Prompt, params: SamplingParams | None = None, max_new_tokens: int = 512
) -> Iterator[Step]:
    """Plain single-sequence generation: prefill the whole prompt on a fresh cache, then decode one id at a time."""
    lm, tok = backend.lm, backend.tokenizer
    sampler = Sampler(params or SamplingParams(), tok.n_valid, prompt.ids)
    decoder = StreamDecoder(tok)
    cache = lm.new_cache()
    logits = lm.prefill(prompt_embeddings(lm, prompt), cache)[0]
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = sampler.pick(logits, out)
        if next_id in tok.stop_ids:
            break
        out.append(next_id)
        yield Step(next_id, decoder.push(next_id))
        if len(out) == max_new_tokens:
            break
        logits = lm.decode(lm.embed(torch.tensor([next_id], device=lm.device)), [cache])[0]
    tail = decoder.finish()
    if tail:
        yield Step(None, tail)


class TokenStream:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, max_new_tokens: int, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(params, n_valid=tokenizer.n_valid, prompt_ids=prompt_ids)
        self.output_ids: list[int] = []
        self._detok = StreamDecoder(tokenizer)
        self._emitted: list[str] = []  # deltas handed out, concatenated = the stripped text so far
        self._held = ""  # trailing whitespace not yet emitted

    def pick(self, logits_row: torch.Tensor) -> int:
        return self.sampler.pick(logits_row, self.output_ids)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.tokenizer.stop_ids

    def append(self, token_id: int) -> str:
        """Record an output id and return the text that can be streamed now (may be empty)."""
        self.output_ids.append(token_id)
        return self._release(self._detok.push(token_id))

    def _release(self, piece: str) -> str:
        text = self._held + piece
        if not self._emitted:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            self._emitted.append(body)
        return body

    def flush(self) -> str:
        """At the end: the last incomplete UTF-8 bytes (as U+FFFD); held-back trailing whitespace is dropped."""
        text = self._held + self._detok.finish()
        self._held = ""
        body = (text if self._emitted else text.lstrip()).rstrip()
        if body:
            self._emitted.append(body)
        return body

    def text(self) -> str:
        return "".join(self._emitted)


def prefill_prompt(lm: DecoderLM, cache: KVCache, prompt: Prompt, reuse: int) -> torch.Tensor:
    """Prefill `prompt.ids[reuse:]` onto `cache` (which holds exactly the first `reuse` positions), with the audio
    embeddings spliced over their placeholder runs; returns the last position's logits [1, vocab]."""
    new_ids = prompt.ids[reuse:]
    x = lm.embed(torch.tensor(new_ids, dtype=torch.long, device=lm.device))  # [T_new, hidden]
    spans = splice_audio(x, prompt.audio, reuse)
    logits = lm.prefill(x, cache)
    cache.token_ids[reuse:] = new_ids
    cache.segment_keys.extend(spans)
    return logits
