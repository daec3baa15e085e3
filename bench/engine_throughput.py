"""Engine benchmark on the embedded model (`python -m bench.engine_throughput`); prints one table per measurement.

1. Time to first token at turns 1..N of one conversation, through the engine with KV-cache reuse and without it
   (every turn prefills its whole prompt), and through transformers' `generate()` on the same prompt ids.
2. Aggregate decode tokens/s at 1, 2, 4, 8 concurrent sessions through the engine (continuous batching), and the
   same prompts and output lengths through `generate()`: one call per session in turn, and one left-padded batch.

Text turns are used (no Whisper) so the numbers are about the LLM. Greedy decoding throughout. The machine is
shared and noisy: compare ratios from the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from assistant.engine.fresh_thread import run_in_fresh_thread_sync as fresh

from assistant.backends.base import Utterance
from assistant.config import load_config
from assistant.engine.api import ResponseOptions
from assistant.engine.engine import Engine

QUESTIONS = [
    "What is the capital of France?",
    "And how many people live there?",
    "Name one famous museum in that city.",
    "What can you see inside it?",
    "Who painted the most famous picture there?",
    "When was he born?",
    "What else did he invent or design?",
    "Thanks. What should I visit next?",
    "Is it far from the first place?",
    "How do I get there by train?",
]
LONG_QUESTIONS = [
    "Tell me a long story about a dragon who learns to cook.",
    "Describe the water cycle in detail.",
    "Explain how a bicycle works, part by part.",
    "Write a poem about the sea at night.",
    "Explain why the sky is blue to a ten year old.",
    "Describe a walk through a busy market.",
    "Tell me about the history of the printing press.",
    "Explain how to bake bread step by step.",
]


async def _turn(engine: Engine, session: str, key: str, text: str, max_new_tokens: int):
    await engine.add_user_turn(session, Utterance(key=key, text=text))
    stream = engine.respond(session, ResponseOptions(max_new_tokens=max_new_tokens, greedy=True))
    return await stream.wait_done()


async def ttft_by_turn(backend, cfg, turns: int, max_new_tokens: int, reuse: bool) -> list:
    engine = Engine(backend, cfg.engine, cfg.generation, reuse_cache=reuse)
    await engine.start()
    try:
        engine.open_session("bench")
        dones = []
        for i in range(turns):
            dones.append(await _turn(engine, "bench", f"t{i}", QUESTIONS[i % len(QUESTIONS)], max_new_tokens))
        return dones
    finally:
        await engine.stop()


async def concurrent_decode(backend, cfg, n_sessions: int, max_new_tokens: int) -> tuple[float, list]:
    ecfg = dataclasses.replace(cfg.engine, max_active=max(n_sessions, cfg.engine.max_active))
    engine = Engine(backend, ecfg, cfg.generation)
    await engine.start()
    try:
        for i in range(n_sessions):
            engine.open_session(f"s{i}")
        t0 = time.monotonic()
        dones = await asyncio.gather(
            *(
                _turn(engine, f"s{i}", f"q{i}", LONG_QUESTIONS[i % len(LONG_QUESTIONS)], max_new_tokens)
                for i in range(n_sessions)
            )
        )
        return time.monotonic() - t0, list(dones)
    finally:
        await engine.stop()


def decode_rate(dones: list) -> float:
    """Tokens after each response's first / the longest decode phase (the batch decodes them together)."""
    tokens = sum(max(0, d.output_tokens - 1) for d in dones)
    return tokens / max(1e-9, max(d.timings_ms.get("decode", 0.0) for d in dones) / 1000.0)


# ---- transformers baseline ----------------------------------------------------------------------------------------
def load_hf_model(llm_dir: Path, dtype: torch.dtype):
    """transformers' Qwen2ForCausalLM on the same converted weights the embedded backend loads."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = json.loads((llm_dir / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["n_layers"],
        num_attention_heads=dims["n_heads"],
        num_key_value_heads=dims["n_kv_heads"],
        rope_theta=dims["rope_theta"],
        rms_norm_eps=dims["rms_norm_eps"],
        max_position_embeddings=dims["context_length"],
        tie_word_embeddings=dims["tied_embeddings"],
        eos_token_id=dims["eos_token_id"],
        pad_token_id=dims["eos_token_id"],
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    state = load_file(str(llm_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"transformers baseline: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: list[int], batched: bool) -> float:
    """Wall seconds to generate `new_tokens[i]` greedy tokens after `prompts[i]` (EOS ignored: same work)."""
    pad = model.config.pad_token_id
    t0 = time.monotonic()
    if not batched:
        for ids, n in zip(prompts, new_tokens, strict=True):
            x = torch.tensor([ids])
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.monotonic() - t0
    width = max(len(p) for p in prompts)
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    n = max(new_tokens)
    model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.monotonic() - t0


@torch.inference_mode()
def hf_ttft(model, prompt: list[int]) -> float:
    t0 = time.monotonic()
    x = torch.tensor([prompt])
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
    return (time.monotonic() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--turn-tokens", type=int, default=24, help="max new tokens per conversation turn")
    ap.add_argument("--decode-tokens", type=int, default=48, help="max new tokens per concurrent response")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="conversations per TTFT variant (median reported)")
    ap.add_argument("--skip-ttft", action="store_true", help="only the throughput table")
    ap.add_argument("--skip-hf", action="store_true", help="engine only (no transformers baseline)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from assistant.backends import load_backend
    from assistant.weights.cache import ensure_prepared

    cfg = load_config(overrides={"generation.greedy": True})
    t0 = time.monotonic()
    # Every torch call outside the engine worker runs on a thread that then ends (see engine/fresh_thread.py).
    backend = fresh(load_backend, cfg)
    print(f"embedded backend loaded in {time.monotonic() - t0:.1f} s (dtype {backend.lm.dtype})")
    hf = None if args.skip_hf else fresh(load_hf_model, ensure_prepared(cfg).llm_dir, backend.lm.dtype)

    asyncio.run(ttft_by_turn(backend, cfg, 1, 2, True))  # warm-up (allocations, kernels)
    if hf is not None:
        fresh(hf_generate, hf, [[151644, 872, 198, 9707]], [2], False)
    if not args.skip_ttft:
        ttft_table(backend, cfg, hf, args)
    throughput_table(backend, cfg, hf, args)
    return 0


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def ttft_table(backend, cfg, hf, args) -> None:
    """Median over `repeats` conversations; reuse and no-reuse runs alternate so load changes hit both alike."""
    print(f"\n## Time to first token by turn (median of {args.repeats} conversations, ms)")
    reuse_runs, fresh_runs, hf_runs = [], [], []
    for _ in range(args.repeats):
        reuse_runs.append(asyncio.run(ttft_by_turn(backend, cfg, args.turns, args.turn_tokens, True)))
        fresh_runs.append(asyncio.run(ttft_by_turn(backend, cfg, args.turns, args.turn_tokens, False)))
        if hf is not None:
            hf_runs.append([fresh(hf_ttft, hf, d.prompt_ids) for d in reuse_runs[-1]])
    print("| turn | prompt tokens | from cache | engine, cache reuse | engine, no reuse | transformers generate() |")
    print("|---|---|---|---|---|---|")
    rows = []
    for i in range(args.turns):
        a = _median([r[i].timings_ms["first_token"] for r in reuse_runs])
        b = _median([r[i].timings_ms["first_token"] for r in fresh_runs])
        c = _median([r[i] for r in hf_runs]) if hf_runs else float("nan")
        d = reuse_runs[0][i]
        rows.append((a, b, c))
        print(f"| {i + 1} | {d.input_tokens} | {d.cached_tokens} | {a:.0f} | {b:.0f} | {c:.0f} |")
    (r1, f1, h1), (rn, fn, hn) = rows[0], rows[-1]
    print(
        f"turn {args.turns} / turn 1 TTFT: engine with reuse {rn / r1:.2f}x, engine without {fn / f1:.2f}x, "
        f"generate() {hn / h1:.2f}x"
    )


def throughput_table(backend, cfg, hf, args) -> None:
    sessions = [int(s) for s in args.sessions.split(",")]
    print(f"\n## Aggregate decode throughput (greedy, up to {args.decode_tokens} new tokens per session)")
    print(
        "| sessions | engine tok/s (decode phase) | engine tok/s (wall) | engine speed-up vs 1 | "
        "generate() one by one tok/s | generate() padded batch tok/s |"
    )
    print("|---|---|---|---|---|---|")
    one_by_one: list[tuple[int, float]] = []  # (tokens, seconds) per prompt, in session order
    base = None
    for n in sessions:
        wall_s, dones = asyncio.run(concurrent_decode(backend, cfg, n, args.decode_tokens))
        rate = decode_rate(dones)
        total = sum(d.output_tokens for d in dones)
        base = base or rate
        seq = bat = "-"
        if hf is not None:
            lens = [max(1, d.output_tokens) for d in dones]
            # one by one is n independent single runs: time each prompt once and add them up
            for d, k in list(zip(dones, lens, strict=True))[len(one_by_one) :]:
                one_by_one.append((k, fresh(hf_generate, hf, [d.prompt_ids], [k], False)))
            toks, secs = map(sum, zip(*one_by_one[:n], strict=True))
            seq = f"{toks / secs:.1f}"
            bat = f"{n * max(lens) / fresh(hf_generate, hf, [d.prompt_ids for d in dones], lens, True):.1f}"
        print(f"| {n} | {rate:.1f} | {total / wall_s:.1f} | {rate / base:.2f}x | {seq} | {bat} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
