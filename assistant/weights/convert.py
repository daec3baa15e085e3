"""Converts the assembled weight files into what the embedded backend loads (no cache or package logic here).

Owns the two conversions: GGUF (Qwen2.5) -> bf16 `model.safetensors` in transformers' Qwen2 names + `config.json` +
`qwen2.tiktoken` ranks; CTranslate2 Whisper -> float16 `model.safetensors` in transformers' Whisper layout +
`dims.json`. Called by `weights.cache` on a temporary directory; errors are `PrepareError`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from assistant.weights.sources import PrepareError, reporting_full_disk


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

    from assistant.weights.ctranslate2 import ctranslate2_to_transformers, read_ctranslate2

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
