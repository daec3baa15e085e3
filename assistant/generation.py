"""Backend-agnostic generation pieces: sampling, stop ids, UTF-8-safe streaming text, and the slow reference loop.

Public signatures (the engine imports these; keep them stable):

    SamplingParams(greedy=False, temperature=1.0, top_p=0.5, top_k=0, repetition_penalty=1.0, seed=-1)
        defaults = the Qwen-Audio-Chat generation config; `SamplingParams.from_generation_config(dict)` reads a
        checkpoint's generation_config.json.
    Sampler(params, n_valid, prompt_ids=None).pick(logits_row [vocab] float, output_ids) -> int
        repetition penalty over prompt + output ids, temperature, top-k, top-p, then a draw from a torch.Generator
        seeded per response (seed < 0: a fresh random seed); never returns an id >= n_valid.
    params_for(gen_cfg, checkpoint_default=None) -> SamplingParams
        the `[generation]` config; a backend's checkpoint defaults win while the sampling keys are untouched.
    StreamDecoder(tokenizer).push(id) -> str ; .finish() -> str
        incremental detokenizer: never splits a UTF-8 character, special tokens written as their text.
    response_text(tokenizer, ids) -> str
        QWEN_AUDIO.md §6: ids up to the first stop id, specials kept, invalid UTF-8 replaced, whitespace stripped.
    prompt_embeddings(lm, prompt) -> [T, hidden]
        token embeddings with each AudioSpan's rows spliced over its `<audio> ... </audio>` run.
    generate_stream(backend, prompt, params=None, max_new_tokens=512) -> Iterator[Step(token_id, text)]
        single-sequence prefill + decode loop (the slow reference the engine's batched path is checked against);
        stops at the first stop id (not yielded) or after max_new_tokens; a last Step(None, text) carries any
        incomplete UTF-8 bytes left at the end (as U+FFFD).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from assistant.backends.base import Backend, DecoderLM, Prompt, Tokenizer
from assistant.models.splice import splice_audio

CHAT_DEFAULTS = {"do_sample": True, "top_p": 0.5, "top_k": 0, "temperature": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.5
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = -1

    @classmethod
    def from_generation_config(cls, gc: dict, seed: int = -1) -> SamplingParams:
        """A checkpoint's generation_config.json (missing keys: the Qwen-Audio-Chat values)."""
        g = {**CHAT_DEFAULTS, **{k: v for k, v in gc.items() if k in CHAT_DEFAULTS and v is not None}}
        return cls(
            greedy=not g["do_sample"],
            temperature=float(g["temperature"]),
            top_p=float(g["top_p"]),
            top_k=int(g["top_k"]),
            repetition_penalty=float(g["repetition_penalty"]),
            seed=seed,
        )


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def params_for(gen_cfg, checkpoint_default: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from the `[generation]` config section. When the backend has its own chat defaults
    (qwen-audio: generation_config.json) and the user left the sampling keys at their shipped values, the
    checkpoint's values win (the chat generation config is the default); greedy and seed always come from config."""
    from assistant.config import GenerationConfig

    shipped = GenerationConfig()
    untouched = all(getattr(gen_cfg, f) == getattr(shipped, f) for f in _SAMPLING_FIELDS)
    if checkpoint_default is not None and untouched:
        base = {f: getattr(checkpoint_default, f) for f in _SAMPLING_FIELDS}
    else:
        base = {f: getattr(gen_cfg, f) for f in _SAMPLING_FIELDS}
    return SamplingParams(greedy=gen_cfg.greedy, seed=gen_cfg.seed, **base)


class Sampler:
    """Chooses the next id from one row of logits; one instance per response (it owns the random generator)."""

    def __init__(self, params: SamplingParams, n_valid: int, prompt_ids: list[int] | None = None):
        self.params = params
        self.n_valid = n_valid
        self.prompt_ids = list(prompt_ids or [])
        self.generator = torch.Generator(device="cpu")
        if params.seed >= 0:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()  # a fresh non-deterministic seed per response

    def pick(self, logits_row: torch.Tensor, output_ids: list[int]) -> int:
        p = self.params
        # Padding rows (ids >= n_valid) are untrained: cut them off before anything else.
        logits = logits_row[: self.n_valid].detach().to("cpu", torch.float32)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(output_ids)), dtype=torch.long)
            seen = seen[seen < self.n_valid]
            if len(seen):
                logits = logits.clone()
                s = logits[seen]
                logits[seen] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        if p.greedy or p.temperature <= 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest head whose mass reaches top_p: a token stays if the mass BEFORE it is < top_p.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            drop[0] = False
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


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
