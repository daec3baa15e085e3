"""Reads a CTranslate2 Whisper `model.bin` and renames it into transformers' Whisper layout (what whisper.py loads).

Layout facts (../shared/MODELS.md): self-attention q|k|v fused in `linear_0` (rows in that order, k bias zero),
cross-attention k|v fused in `attention/linear_1`, LayerNorm gamma/beta, the output projection tied to the decoder
embedding. Raises ValueError on a file that is not a CTranslate2 Whisper model; `weights.convert` reports it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch


def read_ctranslate2(path: Path) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 `model.bin` by name (layout in ../shared/MODELS.md)."""
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    data = memoryview(path.read_bytes())
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        pos += n
        if pos > len(data):
            raise ValueError(f"truncated CTranslate2 file (needed {pos} bytes, has {len(data)})")
        return data[pos - n : pos]

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def string() -> str:
        n = struct.unpack("<H", take(2))[0]
        return bytes(take(n))[:-1].decode()

    version = u32()
    if version < 4:
        raise ValueError(f"CTranslate2 format version {version}, expected >= 4 (re-export the model)")
    spec, _revision = string(), u32()
    if spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, got {spec!r}")
    variables: dict[str, np.ndarray] = {}
    for _ in range(u32()):
        name = string()
        rank = take(1)[0]
        dims = struct.unpack(f"<{rank}I", take(4 * rank))
        dtype_code = take(1)[0]
        raw = take(u32())
        if dtype_code not in dtypes:
            raise ValueError(f"variable {name} has unsupported dtype code {dtype_code}")
        variables[name] = np.frombuffer(raw, dtype=dtypes[dtype_code]).reshape(dims)
    # Aliases follow (e.g. decoder/projection/weight -> decoder/embeddings/weight): the converter ties those itself.
    return variables


def ctranslate2_to_transformers(v: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """CTranslate2 Whisper variables -> (float16 tensors under transformers' Whisper names, proj_out left tied to
    the token embedding; the dimensions for `WhisperDims`)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, arr: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float16))  # writable contiguous copy

    def linear(dst: str, src: str, rows: slice | None = None, bias: bool = True) -> None:
        w = v[f"{src}/weight"]
        put(f"{dst}.weight", w if rows is None else w[rows])
        if bias:
            b = v[f"{src}/bias"]
            put(f"{dst}.bias", b if rows is None else b[rows])

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", v[f"{src}/gamma"])
        put(f"{dst}.bias", v[f"{src}/beta"])

    d = v["encoder/conv1/weight"].shape[0]
    qs, ks, vs = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
    n_enc = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    n_dec = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight"))
    for i in range(2):
        linear(f"model.encoder.conv{i + 1}", f"encoder/conv{i + 1}")
    put("model.encoder.embed_positions.weight", v["encoder/position_encodings/encodings"])
    put("model.decoder.embed_positions.weight", v["decoder/position_encodings/encodings"])
    put("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            sa = f"{src}/self_attention"
            linear(f"{dst}.self_attn.q_proj", f"{sa}/linear_0", qs)
            linear(f"{dst}.self_attn.k_proj", f"{sa}/linear_0", ks, bias=False)  # its bias is zero by design
            linear(f"{dst}.self_attn.v_proj", f"{sa}/linear_0", vs)
            linear(f"{dst}.self_attn.out_proj", f"{sa}/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{sa}/layer_norm")
            if side == "decoder":
                ca = f"{src}/attention"
                linear(f"{dst}.encoder_attn.q_proj", f"{ca}/linear_0")
                linear(f"{dst}.encoder_attn.k_proj", f"{ca}/linear_1", slice(0, d), bias=False)
                linear(f"{dst}.encoder_attn.v_proj", f"{ca}/linear_1", slice(d, 2 * d))
                linear(f"{dst}.encoder_attn.out_proj", f"{ca}/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{ca}/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "d_model": int(d),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_heads": int(v["encoder/num_heads"].reshape(-1)[0]),
        "decoder_heads": int(v["decoder/num_heads"].reshape(-1)[0]),
        "ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "vocab_size": int(v["decoder/embeddings/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
    }
    return out, dims
