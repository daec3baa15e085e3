"""The embedded LLM against its peers (`python -m bench.peers [--with-llama-cpp]`), LLM side; ASR peers are
`bench/asr_peers.py`.

The model everywhere: Qwen2.5-Coder-0.5B-Instruct from the same GGUF (Q4_K_M): the project's engine on the
converted weights in its model dtype (`lm_dtype` in the result) with `[embedded] quantization` none, int8 and int4;
transformers' Qwen2ForCausalLM in bf16 on the same converted weights (`generate()`, a padded batch for several
streams); llama-cpp-python on the GGUF itself (`bench/llama_peer.py`: its own venv, built from source only with
`--with-llama-cpp`; C API, one batch of sequences for several streams).

1. Speed, one interleaved run: each round runs every runtime at 1 and at 4 streams, the same prompt (the same chat
   prompt ids everywhere), greedy, `--tokens` new tokens, `--threads` threads; medians over `--repeats` rounds.
   Per runtime and stream count: time to first token (prefill included; the mean over streams) and decode tok/s
   excluding the prefill (peers: tokens after each stream's first / first token -> last; the engine: rows / time in
   its decode steps, see `engine_speed`; aggregate over streams). The
   engine runs its real worker (`Engine`, one session per stream, text turns) and stops at a stop id; the peers make
   exactly `--tokens` (token counts are in the result).
2. Answers (unless `--skip-spoken`): the spoken question set (`bench/spoken_set.py`) transcribed once by Whisper
   base, then answered greedily (at most ANSWER_TOKENS) from the same prompt ids by every engine variant and by
   llama-cpp-python; correct counts.

All torch work runs on an engine worker thread (one OpenMP team in the process, as in `bench/engine_throughput.py`);
llama.cpp runs in its own process, idle while the others run. The result goes to `bench/results/peers-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from assistant.backends.base import PreparedTurn, Utterance
from assistant.config import load_config
from bench.engine_throughput import concurrent, running_engine
from bench.hf_baseline import load_qwen2, timed_generate
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS, correct, greedy_answer, synthesize

PEER_SYSTEM = "You are a helpful assistant."
PEER_QUESTION = "Tell me a long story about a dragon who learns to cook."  # answers run past 128 tokens


def text_backend(cfg, quantization: str):
    """The embedded backend's LLM with `quantization` and its tokenizer, no Whisper (text turns only)."""
    from assistant.backends.embedded import DEFAULT_WINDOW_TOKENS, EmbeddedBackend, qwen2_tokenizer
    from assistant.models.qwen2_lm import Qwen2LM
    from assistant.weights.cache import ensure_prepared

    llm_dir = ensure_prepared(cfg).llm_dir
    lm = Qwen2LM.load(llm_dir, cfg.model.device, cfg.model.dtype, quantization)
    return EmbeddedBackend(lm, qwen2_tokenizer(llm_dir), None, cfg.embedded.system_prompt, DEFAULT_WINDOW_TOKENS)


def prompt_ids(backend, system: str, question: str) -> list[int]:
    turn = PreparedTurn(key="q", user_text=question)
    return backend.build_prompt(system, [], turn, backend.max_window_tokens).ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds (medians reported)")
    ap.add_argument("--quantizations", default="none,int8,int4")
    ap.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--with-llama-cpp", action="store_true", help="build (once, ~15-20 min) and run llama-cpp-python")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-spoken", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="only the spoken set's answers")
    ap.add_argument("--tag", default="", help="appended to the result file's name (e.g. -spoken)")
    ap.add_argument("--notes", default="")
    args = ap.parse_args(argv)
    record = Record("peers", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)  # the engine worker threads started below take this setting
    asyncio.run(run(args, record))
    return 0


async def run(args, record: Record) -> None:
    """Rounds; in each, every engine variant is loaded, measured at every stream count and dropped (the machine
    has room for one float32 model at a time next to other work); transformers runs on the last variant's worker.
    The spoken set is answered in the first round. The result file is written after every round (a run stopped
    early keeps what it measured; `rounds_done` says how many)."""
    from assistant.backends import load_backend

    cfg = load_config(overrides={"generation.greedy": True})
    args.stream_counts = [int(s) for s in args.streams.split(",")]
    quants = args.quantizations.split(",")
    llama = None
    if args.with_llama_cpp:
        from bench.llama_peer import LlamaCpp, ensure_gguf, ensure_venv

        llama = LlamaCpp(ensure_venv(), ensure_gguf(), args.threads, max(args.stream_counts))
        print(f"llama-cpp-python {llama.version} ready", flush=True)
    numbers: dict = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        "hf_dtype": None if args.skip_hf else args.hf_dtype,
        "llama_cpp": llama.version if llama else None,
    }
    runs: dict[tuple[str, int], list[dict]] = {}
    answers: dict[str, list[str]] = {}
    spoken_prompts: list[list[int]] | None = None
    try:
        for r in range(args.repeats):
            for q in quants:
                with_whisper = r == 0 and q == quants[0] and not args.skip_spoken
                if with_whisper:
                    load = lambda q=q: load_backend(cfg.replace(**{"embedded.quantization": q}))  # noqa: E731
                else:
                    load = lambda q=q: text_backend(cfg, q)  # noqa: E731
                t0 = time.monotonic()
                async with running_engine(cfg, max(args.stream_counts), load=load) as engine:
                    backend = engine.backend
                    print(f"round {r + 1}: engine {q} loaded in {time.monotonic() - t0:.1f} s", flush=True)
                    numbers["worker_torch_threads"] = await engine.call(lambda b: torch.get_num_threads())
                    numbers["lm_dtype"] = str(backend.lm.dtype).removeprefix("torch.")
                    if with_whisper:
                        spoken_prompts, numbers["spoken_transcripts"] = await transcribe_set(engine)
                        backend.recognisers = None  # free it: only the LLM is measured from here on
                    if r == 0 and spoken_prompts is not None:
                        answers[f"engine {q}"] = await engine.call(
                            lambda b, p=spoken_prompts: [greedy_answer(b, x).text for x in p]
                        )
                    if not args.skip_speed:
                        await engine_speed(engine, args, q, r, runs)
                    if q == quants[-1] and not args.skip_hf and not args.skip_speed:
                        await hf_phase(engine, args, r, runs)
                    tok, prompt = backend.tokenizer, prompt_ids(backend, PEER_SYSTEM, PEER_QUESTION)
                del engine, backend  # before the next variant loads: one model in memory at a time
                gc.collect()
            if llama is not None and not args.skip_speed:
                for n in args.stream_counts:
                    t = llama.timed(prompt, n, args.tokens)
                    note(
                        runs, "llama-cpp-python", n, r, t["first_token_s"], t["decode_s"], [len(x) for x in t["tokens"]]
                    )
            if llama is not None and r == 0 and spoken_prompts is not None:
                stop = sorted(tok.stop_ids)
                answers["llama-cpp-python"] = [_text(tok, llama.answer(p, ANSWER_TOKENS, stop)) for p in spoken_prompts]
            numbers["rounds_done"] = r + 1
            if runs:
                numbers["speed"] = speed_table(runs)
            if answers:
                numbers["spoken_set"] = spoken_table(answers)
            record.write(numbers, torch_threads=numbers["worker_torch_threads"], notes=args.notes)
    finally:
        if llama:
            llama.close()


def note(
    runs: dict, name: str, n: int, r: int, first_token_s: float, decode_s: float, tokens: list[int], rows: int = 0
) -> None:
    """One measurement of `name` at `n` streams in round `r`: decode tok/s = `rows` decoded (default: the tokens
    after each stream's first) / `decode_s`, aggregate over the streams."""
    after_first = rows or sum(max(0, t - 1) for t in tokens)
    x = {"first_token_s": first_token_s, "decode_tok_s": after_first / decode_s if decode_s > 0 else 0.0}
    x["output_tokens"] = tokens
    runs.setdefault((name, n), []).append(x)
    print(
        f"round {r + 1}, {n} streams, {name}: first token {first_token_s:.2f} s, decode {x['decode_tok_s']:.1f} tok/s",
        flush=True,
    )


async def engine_speed(engine, args, q: str, r: int, runs: dict) -> None:
    """The engine at each stream count: one session per stream, the same question, all submitted at once. Its
    decode speed is rows decoded / seconds in decode steps (`Engine.decode_totals`): the engine prefills the later
    streams between the first ones' decode steps, and those prefills are not decoding (the peers prefill every
    stream before their first decode step, outside their decode span)."""
    for n in args.stream_counts:
        rows0, s0 = engine.decode_totals()
        _, dones = await concurrent(engine, f"r{r}{q}{n}", n, args.tokens, [PEER_QUESTION] * n, PEER_SYSTEM)
        rows1, s1 = engine.decode_totals()
        first = statistics.mean(d.timings_ms["first_token"] for d in dones) / 1000.0
        note(runs, f"engine {q}", n, r, first, s1 - s0, [d.output_tokens for d in dones], rows1 - rows0)


async def hf_phase(engine, args, r: int, runs: dict) -> None:
    """transformers on the converted weights, on this engine's worker thread; loaded, measured, dropped."""
    from assistant.weights.cache import ensure_prepared

    llm_dir = ensure_prepared(load_config()).llm_dir
    tok = engine.backend.tokenizer
    hf = await engine.call(lambda b: load_qwen2(llm_dir, getattr(torch, args.hf_dtype)))
    name = f"transformers {args.hf_dtype}"
    prompt = prompt_ids(engine.backend, PEER_SYSTEM, PEER_QUESTION)
    for n in args.stream_counts:
        g = await engine.call(lambda b, n=n: timed_generate(hf, [prompt] * n, args.tokens, tok.im_end_id))
        note(runs, name, n, r, g.first_token_s, g.decode_s, [g.decode_steps + 1] * n)


async def transcribe_set(engine) -> tuple[list[list[int]], list[str]]:
    """The spoken set through the backend's Whisper once: (prompt ids per question, transcripts)."""
    backend = engine.backend
    with tempfile.TemporaryDirectory() as tmp:
        audios = [synthesize(q, Path(tmp) / f"q{i}.wav") for i, (q, _) in enumerate(QUESTIONS)]
    utterances = [Utterance(key=f"q{i}", audio=a) for i, a in enumerate(audios)]
    turns = await engine.call(lambda b: b.prepare(utterances, list(range(1, len(utterances) + 1))))
    prompts = [backend.build_prompt(backend.default_system_prompt, [], t, backend.max_window_tokens).ids for t in turns]
    return prompts, [t.transcript for t in turns]


def speed_table(runs: dict) -> list[dict]:
    rows = []
    for (name, n), rs in runs.items():
        rows.append(
            {
                "runtime": name,
                "streams": n,
                "first_token_s": round(statistics.median(x["first_token_s"] for x in rs), 3),
                "decode_tok_s": round(statistics.median(x["decode_tok_s"] for x in rs), 2),
                "first_token_s_runs": [round(x["first_token_s"], 3) for x in rs],
                "decode_tok_s_runs": [round(x["decode_tok_s"], 2) for x in rs],
                "output_tokens": [x["output_tokens"] for x in rs],
            }
        )
    rows.sort(key=lambda x: (x["streams"], x["runtime"]))
    print("\n| runtime | streams | first token (s) | decode tok/s (aggregate) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['runtime']} | {row['streams']} | {row['first_token_s']:.2f} | {row['decode_tok_s']:.1f} |")
    return rows


def spoken_table(answers: dict[str, list[str]]) -> dict:
    print("\n## Spoken set: correct answers (same transcripts and prompt ids for every runtime)")
    result = {}
    for name, texts in answers.items():
        ok = [correct(a, kw) for a, (_, kw) in zip(texts, QUESTIONS, strict=True)]
        result[name] = {"correct": sum(ok), "of": len(ok), "correct_each": ok, "answers": texts}
        print(f"{name}: {sum(ok)}/{len(ok)}", flush=True)
    return result


def _text(tok, ids: list[int]) -> str:
    stop = next((i for i, t in enumerate(ids) if t in tok.stop_ids), len(ids))
    return tok.decode(ids[:stop]).strip()


if __name__ == "__main__":
    raise SystemExit(main())
