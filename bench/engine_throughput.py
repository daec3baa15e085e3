"""Engine benchmark on the embedded model (`python -m bench.engine_throughput`): drives the real `Engine`.

The embedded LLM is Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF, converted to bf16 by `prepare`), its matmuls
quantized as `--quantization` says (default: the config's "auto"); `generate()` runs the unquantized weights in the
model dtype. The engine loads it on its own worker thread (`Engine.loading`), and every transformers baseline runs on
that same worker thread through `engine.call`, with the same weights and the same torch threads: one OpenMP thread
team in the process.

1. Time to first token at turns 1..N of one conversation, through the engine with KV-cache reuse and without it
   (every turn prefills its whole prompt), and through transformers' `generate()` on the same prompt ids.
2. Aggregate decode tokens/s at 1, 2, 4, 8 concurrent sessions through the engine (continuous batching), and the
   same prompts and output lengths through `generate()`: one call per session in turn, and one left-padded batch.
   Decode speeds exclude the prefill on both sides: the engine's are tokens after each response's first / the
   longest first-token -> done span (`timings_ms["decode"]`), which still holds the later sessions' prefills (the
   engine admits them while the first ones decode), and, without those, rows decoded / seconds in decode steps
   (`Engine.decode_totals`); `generate()`'s are timed with a streamer from its first token to its last (one padded
   prefill first).

Text turns are used (no Whisper) so the numbers are about the LLM. Greedy decoding throughout. Only one engine
(one worker thread) is alive at a time. The result goes to `bench/results/engine_throughput-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import time

import torch

from assistant.backends.base import Utterance
from assistant.config import load_config
from assistant.engine.api import ResponseOptions
from assistant.engine.engine import Engine
from bench.hf_baseline import load_qwen2, timed_generate
from bench.results import Record

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


@contextlib.asynccontextmanager
async def running_engine(cfg, max_active: int, backend=None, load=None, reuse: bool = True):
    ecfg = dataclasses.replace(cfg.engine, max_active=max(max_active, cfg.engine.max_active))
    engine = Engine(backend, ecfg, cfg.generation, reuse_cache=reuse, load=load)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _turn(engine: Engine, session: str, key: str, text: str, max_new_tokens: int):
    await engine.add_user_turn(session, Utterance(key=key, text=text))
    stream = engine.respond(session, ResponseOptions(max_new_tokens=max_new_tokens, greedy=True))
    return await stream.wait_done()


async def conversation(engine: Engine, session: str, turns: int, max_new_tokens: int) -> list:
    engine.open_session(session)
    try:
        return [
            await _turn(engine, session, f"{session}-t{i}", QUESTIONS[i % len(QUESTIONS)], max_new_tokens)
            for i in range(turns)
        ]
    finally:
        engine.close_session(session)


async def concurrent(
    engine: Engine,
    tag: str,
    n_sessions: int,
    max_new_tokens: int,
    questions: list[str] | None = None,
    instructions: str | None = None,
) -> tuple[float, list]:
    """One question per session (LONG_QUESTIONS by default), all submitted at once; (wall seconds, the dones)."""
    ids = [f"{tag}-s{i}" for i in range(n_sessions)]
    for s in ids:
        engine.open_session(s, instructions)
    try:
        t0 = time.monotonic()
        questions = questions or [LONG_QUESTIONS[i % len(LONG_QUESTIONS)] for i in range(n_sessions)]
        dones = await asyncio.gather(
            *(_turn(engine, s, f"{s}-q", q, max_new_tokens) for s, q in zip(ids, questions, strict=True))
        )
        return time.monotonic() - t0, list(dones)
    finally:
        for s in ids:
            engine.close_session(s)


def engine_decode_rate(dones: list) -> float:
    """Tokens after each response's first / the longest decode phase (the batch decodes them together)."""
    tokens = sum(max(0, d.output_tokens - 1) for d in dones)
    return tokens / max(1e-9, max(d.timings_ms.get("decode", 0.0) for d in dones) / 1000.0)


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
    ap.add_argument("--skip-one-by-one", action="store_true", help="no generate() one session at a time")
    ap.add_argument("--quantization", default="auto", help="[embedded] quantization of the engine's LLM")
    ap.add_argument("--notes", default="", help="written into the result file (e.g. why the settings are short)")
    ap.add_argument("--tag", default="", help="appended to the result file's name (e.g. -int4)")
    args = ap.parse_args(argv)
    record = Record("engine_throughput", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)  # the worker threads started below take this setting
    numbers = asyncio.run(run(args))
    record.write(numbers, torch_threads=numbers.pop("worker_torch_threads"), notes=args.notes)
    return 0


async def run(args) -> dict:
    from assistant.backends import load_backend
    from assistant.weights.cache import ensure_prepared

    cfg = load_config(overrides={"generation.greedy": True, "embedded.quantization": args.quantization})
    sessions = [int(s) for s in args.sessions.split(",")]
    t0 = time.monotonic()
    async with running_engine(cfg, max(sessions), load=lambda: load_backend(cfg)) as engine:
        backend = engine.backend
        print(f"embedded backend loaded on the engine's worker in {time.monotonic() - t0:.1f} s ({backend.lm.dtype})")
        threads = await engine.call(lambda b: torch.get_num_threads())
        hf = None
        if not args.skip_hf:
            llm_dir = ensure_prepared(cfg).llm_dir
            hf = await engine.call(lambda b: load_qwen2(llm_dir, b.lm.dtype))
            await engine.call(lambda b: timed_generate(hf, [[151644, 872, 198, 9707]], 2, b.tokenizer.im_end_id))
        await conversation(engine, "warm-up", 1, 2)  # allocations, kernels
    numbers: dict = {
        "worker_torch_threads": threads,
        "lm_dtype": str(backend.lm.dtype).removeprefix("torch."),
        "quantization": backend.lm.quantization,
    }
    if not args.skip_ttft:
        numbers["ttft_by_turn"] = await ttft_table(backend, cfg, hf, args)
    numbers["decode_throughput"] = await throughput_table(backend, cfg, hf, args, sessions)
    return numbers


async def ttft_table(backend, cfg, hf, args) -> dict:
    """Median over `repeats` conversations; reuse and no-reuse runs alternate so load changes hit both alike."""
    print(f"\n## Time to first token by turn (median of {args.repeats} conversations, ms)", flush=True)
    pad = backend.tokenizer.im_end_id
    reuse_runs, fresh_runs, hf_runs = [], [], []
    for r in range(args.repeats):
        async with running_engine(cfg, 1, backend=backend) as engine:
            reuse_runs.append(await conversation(engine, f"reuse{r}", args.turns, args.turn_tokens))
            if hf is not None:
                prompts = [d.prompt_ids for d in reuse_runs[-1]]
                gens = [await engine.call(lambda b, p=p: timed_generate(hf, [p], 1, pad)) for p in prompts]
                hf_runs.append([g.first_token_s * 1000.0 for g in gens])
        async with running_engine(cfg, 1, backend=backend, reuse=False) as engine:
            fresh_runs.append(await conversation(engine, f"fresh{r}", args.turns, args.turn_tokens))
    print("| turn | prompt tokens | from cache | engine, cache reuse | engine, no reuse | transformers generate() |")
    print("|---|---|---|---|---|---|")
    rows = []
    for i in range(args.turns):
        d = reuse_runs[0][i]
        row = {
            "turn": i + 1,
            "prompt_tokens": d.input_tokens,
            "cached_tokens": d.cached_tokens,
            "engine_reuse_ms": statistics.median(r[i].timings_ms["first_token"] for r in reuse_runs),
            "engine_no_reuse_ms": statistics.median(r[i].timings_ms["first_token"] for r in fresh_runs),
            "generate_ms": statistics.median(r[i] for r in hf_runs) if hf_runs else None,
        }
        rows.append(row)
        gen = f"{row['generate_ms']:.0f}" if hf_runs else "-"
        print(
            f"| {i + 1} | {d.input_tokens} | {d.cached_tokens} | {row['engine_reuse_ms']:.0f} | "
            f"{row['engine_no_reuse_ms']:.0f} | {gen} |"
        )
    first, last = rows[0], rows[-1]
    ratios = {
        k: round(last[k] / first[k], 2) for k in ("engine_reuse_ms", "engine_no_reuse_ms", "generate_ms") if first[k]
    }
    print(f"turn {args.turns} / turn 1 TTFT: {ratios}")
    return {"rows": rows, "last_over_first_turn": ratios}


async def throughput_table(backend, cfg, hf, args, sessions: list[int]) -> list[dict]:
    """Per repeat and session count: the engine, then `generate()` on the same prompts and output lengths right after
    it (one call per prompt, then one padded batch); medians over `repeats`, so load changes hit every column."""
    print(
        f"\n## Aggregate decode throughput (greedy, up to {args.decode_tokens} new tokens per session, "
        f"median of {args.repeats})",
        flush=True,
    )
    pad = backend.tokenizer.im_end_id
    runs: dict[int, list[dict]] = {n: [] for n in sessions}
    async with running_engine(cfg, max(sessions), backend=backend) as engine:
        for r in range(args.repeats):
            for n in sessions:
                rows0, decode0_s = engine.decode_totals()
                wall_s, dones = await concurrent(engine, f"r{r}n{n}", n, args.decode_tokens)
                rows1, decode1_s = engine.decode_totals()
                run = {
                    "output_tokens": [d.output_tokens for d in dones],
                    "engine_decode_tok_s": engine_decode_rate(dones),
                    "engine_step_tok_s": (rows1 - rows0) / max(1e-9, decode1_s - decode0_s),
                    "engine_wall_tok_s": sum(d.output_tokens for d in dones) / wall_s,
                }
                print(
                    f"repeat {r + 1}, {n} sessions: engine {run['engine_decode_tok_s']:.2f} tok/s, "
                    f"{run['engine_step_tok_s']:.2f} in decode steps",
                    flush=True,
                )
                if hf is not None:
                    lens = [max(2, d.output_tokens) for d in dones]  # same output lengths (2+: one decode step)
                    single = (
                        []
                        if args.skip_one_by_one
                        else [
                            await engine.call(lambda b, d=d, k=k: timed_generate(hf, [d.prompt_ids], k, pad))
                            for d, k in zip(dones, lens, strict=True)
                        ]
                    )
                    prompts, k = [d.prompt_ids for d in dones], max(lens)
                    batch = await engine.call(lambda b, p=prompts, k=k: timed_generate(hf, p, k, pad))
                    if single:
                        run["generate_one_by_one_decode_tok_s"] = sum(g.decode_steps for g in single) / sum(
                            g.decode_s for g in single
                        )
                    run["generate_padded_batch_decode_tok_s"] = n * batch.decode_steps / batch.decode_s
                    print(f"  generate() padded {run['generate_padded_batch_decode_tok_s']:.2f} tok/s", flush=True)
                runs[n].append(run)
    columns = [
        ("engine_decode_tok_s", "engine decode tok/s"),
        ("engine_step_tok_s", "engine tok/s in decode steps (other sessions' prefills excluded)"),
        ("engine_wall_tok_s", "engine tok/s (wall, prefill included)"),
        ("generate_one_by_one_decode_tok_s", "generate() one by one, decode tok/s"),
        ("generate_padded_batch_decode_tok_s", "generate() padded batch, decode tok/s"),
    ]
    columns = [(k, title) for k, title in columns if k in runs[sessions[0]][0]]
    print("| sessions | " + " | ".join(title for _, title in columns) + " |")
    print("|---|" + "---|" * len(columns))
    rows = []
    for n in sessions:
        row = {"sessions": n, "output_tokens": [run["output_tokens"] for run in runs[n]]}
        for key, _ in columns:
            row[key] = round(statistics.median(run[key] for run in runs[n]), 2)
            row[key + "_runs"] = [round(run[key], 2) for run in runs[n]]
        for key in ("engine_decode_tok_s", "engine_step_tok_s"):
            row[key.removesuffix("_tok_s") + "_speedup_vs_first"] = round(row[key] / rows[0][key], 2) if rows else 1.0
        rows.append(row)
        print(f"| {n} | " + " | ".join(f"{row[k]:.1f}" for k, _ in columns) + " |", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
