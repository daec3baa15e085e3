"""The one device and dtype policy of every network: config values (`model.device`, `model.dtype`) -> torch values.

`resolve_device`: "auto" (or None) is CUDA when torch sees a CUDA device, else the CPU; "cuda" without CUDA is a
`DeviceUnavailable` naming the config key and the fix. `resolve_dtype`: an explicit name or torch dtype is used as
given; "auto" follows `AUTO_DTYPES`, the per-network rule written once here:

    dev = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, dev, "qwen-audio")      # or "qwen2", "whisper"
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16 = "bfloat16-if-native"  # bfloat16 where the CPU has native bf16 matmuls, else float32

# network -> {device kind: dtype name}; a device kind is "cuda" or "cpu" (any device that is not CUDA).
AUTO_DTYPES: dict[str, dict[str, str]] = {
    "qwen-audio": {"cpu": "float32", "cuda": "bfloat16"},  # CPU float32: the golden numbers are float32
    "qwen2": {"cpu": NATIVE_BF16, "cuda": "bfloat16"},  # emulated bf16 is slower than float32
    "whisper": {"cpu": "float32", "cuda": "float16"},  # small; bf16 changed transcripts of the test questions
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceUnavailable(ValueError):
    """`model.device = "cuda"` was asked for but this torch build or machine has no usable CUDA device."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto"/None: CUDA when present, else CPU; anything else as named (CUDA must then be usable)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"config key 'model.device' is '{device}', but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'no'}); install a CUDA build of torch into .venv (README, "
            "'GPU users') or set model.device = \"auto\""
        )
    return dev


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower
    than float32."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, network: str) -> torch.dtype:
    """The dtype `network` (a key of AUTO_DTYPES) runs in on `device`: "auto"/None by the network's rule."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dtype = AUTO_DTYPES[network]["cuda" if device.type == "cuda" else "cpu"]
        if dtype == NATIVE_BF16:
            dtype = "bfloat16" if cpu_supports_bf16() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
