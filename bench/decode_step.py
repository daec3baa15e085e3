"""Where a batched decode step of the embedded LLM spends its time (`python -m bench.decode_step [--batches 1,4,8]
[--quantizations none,int8,int4] [--context 64] [--steps 16]`).

The model alone (no engine, no sampling): `--batches` conversations, each prefilled with `--context` + a few
row-dependent tokens (different lengths, as in the engine), then `--steps` decode steps of all of them at once,
timed, and one more under torch's profiler. Per quantization and batch size: median step time, aggregate tok/s
(batch / step) and its ratio to batch 1, and the profiler's self CPU time per op kind (matmuls, attention, the
padded K/V copy, the rest) for the profiled step. Variants run interleaved (every batch size of one variant, then
the next) in one process; the result goes to `bench/results/decode_step-YYYYMMDD<tag>.json`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from assistant.config import load_config
from bench.results import Record

OP_KINDS = {  # profiler op name -> kind (anything else: "other")
    "aten::_weight_int4pack_mm_for_cpu": "matmul",
    "aten::_weight_int8pack_mm": "matmul",
    "aten::addmm": "matmul",
    "aten::mm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_attention_math": "attention",
    "aten::bmm": "attention",
    "aten::baddbmm": "attention",
    "aten::_softmax": "attention",
    "aten::copy_": "copy",
    "aten::index_put_": "copy",
}


def decode_profile(lm, batch: int, context: int, steps: int) -> dict:
    caches = []
    for i in range(batch):
        c = lm.new_cache()
        ids = torch.arange(context + 3 * i) % 1000 + 100
        lm.prefill(lm.embed(ids), c)
        caches.append(c)
    tokens = torch.full((batch,), 300)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        lm.decode(lm.embed(tokens), caches)
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.decode(lm.embed(tokens), caches)
    kinds: dict[str, float] = {}
    for ev in prof.key_averages():
        kind = OP_KINDS.get(ev.key, "other")
        kinds[kind] = kinds.get(kind, 0.0) + ev.self_cpu_time_total / 1000.0
    step_s = statistics.median(times)
    return {
        "batch": batch,
        "step_ms": round(step_s * 1000, 2),
        "step_ms_runs": [round(t * 1000, 2) for t in times],
        "tok_s": round(batch / step_s, 2),
        "profiled_self_ms": {k: round(v, 2) for k, v in sorted(kinds.items())},
        "top_ops": [
            (ev.key, round(ev.self_cpu_time_total / 1000.0, 2), ev.count)
            for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--quantizations", default="none,int8,int4")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args(argv)
    record = Record("decode_step", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)
    from assistant.models.qwen2_lm import Qwen2LM
    from assistant.weights.cache import ensure_prepared

    cfg = load_config()
    llm_dir = ensure_prepared(cfg).llm_dir
    rows = []
    with torch.inference_mode():
        for q in args.quantizations.split(","):
            lm = Qwen2LM.load(llm_dir, cfg.model.device, cfg.model.dtype, q)
            decode_profile(lm, 1, args.context, 2)  # warm-up: allocations, kernels
            base = None
            for b in (int(x) for x in args.batches.split(",")):
                row = {"quantization": q, "lm_dtype": str(lm.dtype).removeprefix("torch.")}
                row |= decode_profile(lm, b, args.context, args.steps)
                base = base or row["tok_s"]
                row["tok_s_over_batch_1"] = round(row["tok_s"] / base, 2)
                rows.append(row)
                print(
                    f"{q:5} batch {b}: step {row['step_ms']:.1f} ms, {row['tok_s']:.1f} tok/s "
                    f"({row['tok_s_over_batch_1']:.2f}x), profiled {row['profiled_self_ms']}",
                    flush=True,
                )
            del lm
            gc.collect()
    print(record.write({"rows": rows}, torch_threads=args.threads, notes=args.notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
