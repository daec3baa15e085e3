"""The quantized matmuls of `assistant/models/quant.py` alone (`python -m bench.quant_kernels`): why the kernels get
bf16 activations, and what each quantization costs per matrix of the embedded LLM (Qwen2.5-Coder-0.5B-Instruct).

For each matrix shape of the model (fused q|k|v, o, fused gate|up, down, LM head) and 1, 4 and 8 rows: the dense
float32 product, int8 and int4 with bf16 activations (what the model runs) and with float32 activations; interleaved,
median of `--repeats`, ms. Random weights of the model's shapes (the kernels' time does not depend on the values).
The result goes to `bench/results/quant_kernels-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from assistant.models.quant import KERNEL_DTYPE, DenseLinear, Int8Linear, make_linear
from bench.results import Record

SHAPES = {  # name: (out, in) of Qwen2.5-0.5B
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (151936, 896),
}


class _Float32Activations:
    """A quantized layer called with float32 inputs and scales (the kernels' slow path on CPUs without bf16)."""

    def __init__(self, layer):
        self.layer = layer
        if isinstance(layer, Int8Linear):
            self.call = lambda x: torch.ops.aten._weight_int8pack_mm(x, layer.q, layer.scale.float())
        else:
            sz = layer.scales_and_zeros.float()
            self.call = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, layer.group, sz)

    def __call__(self, x):
        return self.call(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--notes", default="")
    args = ap.parse_args(argv)
    record = Record("quant_kernels", vars(args))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out = []
    print(f"| matrix | rows | dense fp32 | int8 | int4 | int8, fp32 act. | int4, fp32 act. | (ms; {KERNEL_DTYPE})")
    print("|---|---|---|---|---|---|---|")
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f) * 0.02
        i8, i4 = make_linear(w, None, "int8"), make_linear(w, None, "int4")
        layers = {
            "dense_fp32": DenseLinear(w, None),
            "int8": i8,
            "int4": i4,
            "int8_fp32_act": _Float32Activations(i8),
            "int4_fp32_act": _Float32Activations(i4),
        }
        for n in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(n, in_f)
            times: dict[str, list[float]] = {k: [] for k in layers}
            with torch.inference_mode():
                for layer in layers.values():
                    layer(x)  # warm-up
                for _ in range(args.repeats):
                    for k, layer in layers.items():
                        t0 = time.perf_counter()
                        layer(x)
                        times[k].append((time.perf_counter() - t0) * 1000.0)
            row = {"matrix": name, "shape": [out_f, in_f], "rows": n}
            row |= {k: round(statistics.median(v), 3) for k, v in times.items()}
            rows_out.append(row)
            print(f"| {name} | {n} | " + " | ".join(f"{row[k]:.2f}" for k in layers) + " |", flush=True)
        del w, layers, i8, i4
    record.write({"median_ms": rows_out}, torch_threads=torch.get_num_threads(), notes=args.notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
