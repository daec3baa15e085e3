"""Weight-only quantized linear layers for CPU decoding (the `[embedded] quantization` key): "none", "int8", "int4".

Owns how a float weight [out, in] becomes what a decode step multiplies by, and that product:

    lin = make_linear(weight, bias, "int4")     # quantized once, at load; the float weight is not kept
    y = lin(x)                                  # x [N, in] in the model dtype -> [N, out] in the model dtype

- "none": `F.linear` on the weight in the model dtype (what ran before this module).
- "int8": symmetric per output row, int8 values, `torch.ops.aten._weight_int8pack_mm`.
- "int4": asymmetric per group of `INT4_GROUP` inputs (a scale and a minimum per group), packed by
  `_convert_weight_to_int4pack_for_cpu` and multiplied by `_weight_int4pack_mm_for_cpu`.

Quantized from the converted bf16 weights at load (the source GGUF is not kept after `prepare`). That GGUF
("Q4_K_M") stores this model mostly as Q5_0 (5-bit, blocks of 32), half the MLP down projections as Q4_K, the rest
as Q6_K, and the LM head as Q8_0; int4 groups of 32 follow its blocks. A Q4_K matrix loses less to int4 than a 5-bit
one (relative error 3.2% against 7-9% on the matrices measured while writing this) but not nothing: its blocks need
not span all 16 levels, and the bf16 cache rounded them.

Why the kernels get bfloat16 activations: on CPUs without native bf16 (AVX2) torch's int8/int4 kernels are fast only
for bf16 inputs; with float32 inputs they were several times slower than the dense float32 product when measured
while writing this (`bench/quant_kernels.py` measures both). Their scales are stored in bf16 too (the kernels take
them in the activation dtype), and the result is cast back to the model dtype, so norms, rotary, attention and
residuals keep the model's precision.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4")
# "auto" by device kind, chosen by measurement: on the spoken set (bench/results/quant_accuracy-20261203.json) int8
# answered the same 13 of 16 questions as float32 (15 of 16 answers word for word the same) and int4 12 (11 the
# same); int8 decodes faster than float32 (bench/results/peers-20261203.json). CUDA has no kernels here.
AUTO_QUANTIZATION = {"cpu": "int8", "cuda": "none"}
INT4_GROUP = 32  # inputs per int4 scale/minimum pair (both hidden sizes, 896 and 4864, are multiples)
KERNEL_DTYPE = torch.bfloat16  # activation and scale dtype the quantized kernels run in (see the module docstring)
QUANT_FORMAT = 1  # version of `quantize`'s stored form and of the grids: bump when either changes
ROWS_PER_BLOCK = 8192  # output rows quantized at a time (bounds the float32 temporaries at load)


class Linear(Protocol):
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear:
    """The float weight as given (quantization "none")."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def int8_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row: (q int8 [out, in] in -127..127, scale [out] in KERNEL_DTYPE), w ~= q * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(KERNEL_DTYPE)


def int4_grid(weight: torch.Tensor, group: int = INT4_GROUP, refine_steps: int = 3):
    """Asymmetric per group of `group` inputs: (q int32 [out, in] in 0..15, scale and zero [out, in / group] in
    KERNEL_DTYPE), w ~= (q - 8) * scale + zero (the int4 kernel's form; zero = the group's minimum + 8 * scale).

    Starts from the group's min..max range, then alternates a least-squares fit of scale and minimum to the chosen
    q with re-rounding (`refine_steps` times; each step can only lower the group's squared error): on four of this
    model's matrices, measured while writing this, that took the relative error from 7.9-10% to 7.1-8.9%. Rows go
    in blocks of ROWS_PER_BLOCK so the float32 temporaries of the 151936-row LM head stay small."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"int4: input width {in_f} is not a multiple of the group size {group}")
    if out_f > ROWS_PER_BLOCK:
        parts = [int4_grid(block, group, refine_steps) for block in weight.split(ROWS_PER_BLOCK)]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    w = weight.float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    scale = ((hi - lo) / 15.0).clamp(min=tiny)
    q = torch.round((w - lo) / scale).clamp(0, 15)
    for _ in range(refine_steps):
        q_mean, w_mean = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
        var = (q - q_mean).pow(2).sum(-1, keepdim=True)
        cov = ((q - q_mean) * (w - w_mean)).sum(-1, keepdim=True)
        scale = torch.where(var > 0, cov / var.clamp(min=tiny), scale).clamp(min=tiny)
        lo = w_mean - scale * q_mean
        q = torch.round((w - lo) / scale).clamp(0, 15)
    scale, zero = scale.to(KERNEL_DTYPE), (lo + 8.0 * scale).to(KERNEL_DTYPE)
    return q.to(torch.int32).reshape(out_f, in_f), scale.squeeze(-1), zero.squeeze(-1)


def dequantized(weight: torch.Tensor, quantization: str) -> torch.Tensor:
    """The float32 weight a `quantization` layer made from `weight` multiplies by: the slow reference the tests
    check the kernels against (a model built on these weights unquantized must give the same logits)."""
    if quantization == "none":
        return weight.float()
    if quantization == "int8":
        q, scale = int8_grid(weight)
        return q.float() * scale.float()[:, None]
    if quantization == "int4":
        q, scale, zero = int4_grid(weight)
        g = q.reshape(q.shape[0], scale.shape[1], -1).float()
        return ((g - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(q.shape)
    raise ValueError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")


def quantize(weight: torch.Tensor, quantization: str) -> dict[str, torch.Tensor]:
    """The stored form of a quantized weight (what `Qwen2LM` caches on disk, so a load does not quantize again):
    int8 {"q", "scale"}; int4 {"q4": two 4-bit values per uint8, "scale", "zero"}."""
    if quantization == "int8":
        q, scale = int8_grid(weight)
        return {"q": q, "scale": scale}
    if quantization == "int4":
        q, scale, zero = int4_grid(weight)
        q = q.to(torch.uint8)
        return {"q4": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), "scale": scale, "zero": zero}
    raise ValueError(f"quantize: expected int8 or int4, got {quantization!r}")


class Int8Linear:
    """`int8_grid` weights, `_weight_int8pack_mm`."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None):
        self.q, self.scale = stored["q"], stored["scale"]
        self.bias, self.out_features = bias, self.q.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.q, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear:
    """`int4_grid` weights packed for `_weight_int4pack_mm_for_cpu` (scales_and_zeros: [in / group, out, 2]). The
    kernel's packed layout is its own (it may differ between torch builds), so only `quantize`'s form is stored."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None):
        q4, scale, zero = stored["q4"], stored["scale"], stored["zero"]
        q = torch.stack([q4 & 0xF, q4 >> 4], dim=-1).reshape(q4.shape[0], -1).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.group = q.shape[1] // scale.shape[1]
        self.bias, self.out_features = bias, q.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(KERNEL_DTYPE), self.packed, self.group, self.scales_and_zeros
        ).to(x.dtype)
        return y if self.bias is None else y + self.bias


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """The `[embedded] quantization` value to apply on `device`: "auto" by AUTO_QUANTIZATION, others as given."""
    if quantization == "auto":
        return AUTO_QUANTIZATION["cuda" if device.type == "cuda" else "cpu"]
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected auto or one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    return quantization


def make_linear(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    quantization: str,
    stored: dict[str, torch.Tensor] | None = None,
) -> Linear:
    """The linear layer `quantization` names: from `weight` [out, in] in the model dtype, or (quantized modes) from
    its `quantize` form when `stored` is given; `bias` [out] in the model dtype."""
    if quantization == "none":
        return DenseLinear(weight, bias)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    device = (weight if stored is None else next(iter(stored.values()))).device
    if device.type != "cpu":
        raise ValueError(
            f"quantization {quantization!r} runs on the CPU only (torch's weight-only CPU kernels); the model is on "
            f'{device}: set [embedded] quantization = "none" or "auto" there'
        )
    stored = stored if stored is not None else quantize(weight, quantization)
    return Int8Linear(stored, bias) if quantization == "int8" else Int4Linear(stored, bias)
