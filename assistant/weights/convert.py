"""Converts the assembled weight files into what the models load (no cache or package logic here).

Owns the two conversions: GGUF (Qwen2.5) -> bf16 `model.safetensors` in transformers' Qwen2 names + `config.json` +
`qwen2.tiktoken` ranks; CTranslate2 Whisper -> float16 `model.safetensors` in transformers' Whisper layout +
`dims.json`, including the reader of CTranslate2's `model.bin` and the renaming. Layout facts of that file
(../shared/MODELS.md): self-attention q|k|v fused in `linear_0` (rows in that order, k bias zero), cross-attention
k|v fused in `attention/linear_1`, LayerNorm gamma/beta, the output projection tied to the decoder embedding.
Called by `weights.cache` on a temporary directory; errors are `PrepareError` (the reader raises ValueError on a
file that is not a CTranslate2 Whisper model, and `convert_ctranslate2_whisper` reports it as one).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from assistant.weights.sources import PrepareError, reporting_full_disk

if TYPE_CHECKING:
    import torch


def _byte_decoder() -> dict[str, int]:
    """GGUF/GPT-2 byte-level BPE writes each byte as a printable unicode char; this maps the chars back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF (Qwen2) -> model.safetensors (bf16, transformers Qwen2 names), config.json, qwen2.tiktoken."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = GGUFReader(str(gguf_path))

    def field(name: str):
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "qwen2":
        raise PrepareError(f"{gguf_path}: expected a qwen2 GGUF, got architecture {arch!r}")
    n_layers = int(field("qwen2.block_count"))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
    }
    for proj in ("q", "k", "v"):
        for kind in ("weight", "bias"):
            per_layer[f"attn_{proj}.{kind}"] = f"self_attn.{proj}_proj.{kind}"
    for i in range(n_layers):
        names.update({f"blk.{i}.{k}": f"model.layers.{i}.{v}" for k, v in per_layer.items()})
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing Qwen2.5 GGUF", unit="tensor", leave=False):
        if t.name not in names:
            raise PrepareError(f"{gguf_path}: unexpected tensor {t.name}; expected only Qwen2 tensors")
        # dequantize gives numpy in row-major [out, in] order (ggml lists dims reversed); Qwen2 GGUFs keep
        # Q/K rows in the HF order (no llama.cpp rotary permutation): the logits test checks this.
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # writable copy
        tensors[names[t.name]] = torch.from_numpy(arr).to(torch.bfloat16)
    missing = sorted(set(names.values()) - set(tensors) - {"lm_head.weight"})
    if missing:
        raise PrepareError(f"{gguf_path}: tensors missing after conversion: {missing[:5]}")
    _save(save_file, tensors, out_dir / "model.safetensors")

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    n_ranked = next(i for i, ty in enumerate(types) if ty != 1)  # type 1 = normal; specials follow the ranks
    dec = _byte_decoder()
    lines = [base64.b64encode(bytes(dec[c] for c in tokens[i])).decode() + f" {i}" for i in range(n_ranked)]
    specials = [tokens[i] for i in range(n_ranked, len(tokens)) if types[i] in (3, 4)]  # control, user-defined
    write_text(out_dir / "qwen2.tiktoken", "\n".join(lines) + "\n")
    config = {
        "n_layers": n_layers,
        "hidden_size": int(field("qwen2.embedding_length")),
        "intermediate_size": int(field("qwen2.feed_forward_length")),
        "n_heads": int(field("qwen2.attention.head_count")),
        "n_kv_heads": int(field("qwen2.attention.head_count_kv")),
        "rope_theta": float(field("qwen2.rope.freq_base")),
        "rms_norm_eps": float(field("qwen2.attention.layer_norm_rms_epsilon")),
        "vocab_size": len(tokens),
        "context_length": int(field("qwen2.context_length")),
        "tied_embeddings": "lm_head.weight" not in tensors,
        "n_ranked": n_ranked,
        "specials": specials,
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "source_name": str(field("general.name")),
    }
    write_text(out_dir / "config.json", json.dumps(config, indent=1, ensure_ascii=False))


def convert_ctranslate2_whisper(model_bin: Path, out_dir: Path) -> None:
    """CTranslate2 Whisper -> model.safetensors (float16, transformers' Whisper names; proj_out tied) + dims.json."""
    from safetensors.torch import save_file

    try:
        tensors, dims = ctranslate2_to_transformers(read_ctranslate2(model_bin))
    except ValueError as e:
        raise PrepareError(f"{model_bin}: {e}") from None
    _save(save_file, tensors, out_dir / "model.safetensors")
    write_text(out_dir / "dims.json", json.dumps(dims, indent=1))


def _save(save_file, tensors: dict, path: Path) -> None:
    with reporting_full_disk(path):
        save_file(tensors, str(path))


def write_text(path: Path, text: str) -> None:
    """UTF-8 text; a full disk is a PrepareError."""
    with reporting_full_disk(path):
        path.write_text(text, encoding="utf-8")


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
    import torch

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
