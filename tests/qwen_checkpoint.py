"""Tiny Qwen-Audio-Chat checkpoints in the official layout, written from the golden README's "Weight recipe".

numpy + the standard library only (the safetensors file is written byte by byte), so the fixture does not depend on
the code under test. `write_checkpoint(out_dir, case="tiny")` gives the bit-exact golden checkpoint (its sha256 is
checked in a test); `overrides` / `shards` build variants for loading-error tests.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from assistant.models.tokenizer import find_tiktoken_file

TINY_SHA256 = "190d1eef53e75d5ea2a572ca7b6808feb694d4aecc873e9041b229cb9ba180ac"

BASE_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0,
    "bf16": False,
    "fp16": False,
    "fp32": True,
    "emb_dropout_prob": 0.0,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "kv_channels": 16,
    "layer_norm_epsilon": 1e-6,
    "max_position_embeddings": 2048,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_dynamic_ntk": True,
    "use_flash_attn": False,
    "use_logn_attn": True,
    "vocab_size": 155947,
    "audio": {
        "n_mels": 80,
        "n_ctx": 1500,
        "n_state": 32,
        "n_head": 4,
        "n_layer": 2,
        "output_dim": 32,
        "avg_pool": True,
        "add_audio_bos_eos_token": True,
        "audio_start_id": 155163,
    },
}
CASE_SEQ_LENGTH = {"tiny": 2048, "tiny-ntk": 64}
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.5,
}
NORM_SUFFIXES = (".ln_1.weight", ".ln_2.weight", "transformer.ln_f.weight", ".attn_ln.weight", ".mlp_ln.weight")
NORM_SUFFIXES += (".ln_post.weight",)
POS_EMB = "transformer.audio.positional_embedding"


def shapes_for(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    a = cfg["audio"]
    s, m, c, d = a["n_state"], a["n_mels"], a["n_ctx"], a["output_dim"]
    out = {"transformer.wte.weight": (v, h), "lm_head.weight": (v, h), "transformer.ln_f.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        out |= {p + "ln_1.weight": (h,), p + "attn.c_attn.weight": (3 * h, h), p + "attn.c_attn.bias": (3 * h,)}
        out |= {p + "attn.c_proj.weight": (h, h), p + "ln_2.weight": (h,), p + "mlp.w1.weight": (f, h)}
        out |= {p + "mlp.w2.weight": (f, h), p + "mlp.c_proj.weight": (h, f)}
    p = "transformer.audio."
    out |= {POS_EMB: (c, s), p + "conv1.weight": (s, m, 3), p + "conv1.bias": (s,), p + "conv2.weight": (s, s, 3)}
    out |= {p + "conv2.bias": (s,), p + "ln_post.weight": (s,), p + "ln_post.bias": (s,), p + "proj.weight": (d, s)}
    out |= {p + "proj.bias": (d,), p + "audio_bos_eos_token.weight": (2, d)}
    for j in range(a["n_layer"]):
        b = f"{p}blocks.{j}."
        for n in ("query", "value", "out"):
            out |= {b + f"attn.{n}.weight": (s, s), b + f"attn.{n}.bias": (s,)}
        out |= {b + "attn.key.weight": (s, s), b + "attn_ln.weight": (s,), b + "attn_ln.bias": (s,)}
        out |= {b + "mlp.0.weight": (4 * s, s), b + "mlp.0.bias": (4 * s,), b + "mlp.2.weight": (s, 4 * s)}
        out |= {b + "mlp.2.bias": (s,), b + "mlp_ln.weight": (s,), b + "mlp_ln.bias": (s,)}
    return out


def whisper_sinusoids(n_pos: int, channels: int) -> np.ndarray:
    half = channels // 2
    inv = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half, dtype=np.float64))
    t = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 (nearest) -> bfloat16 bits, round to nearest with ties to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make_weights(cfg: dict, seed: int = 20231130, std: float = 0.4, norm_std: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in sorted(shapes_for(cfg).items()):
        if name == POS_EMB:
            val = whisper_sinusoids(*shape)
        elif name.endswith(NORM_SUFFIXES):
            val = 1.0 + norm_std * rng.standard_normal(shape)
        else:
            val = std * rng.standard_normal(shape)
        out[name] = bf16_bits(val).reshape(shape)
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        n = tensors[name].size * 2
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<u2").tobytes())


def config_for(case: str = "tiny", overrides: dict | None = None) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["seq_length"] = CASE_SEQ_LENGTH[case]
    for k, v in (overrides or {}).items():
        if k == "audio":
            cfg["audio"].update(v)
        else:
            cfg[k] = v
    return cfg


def write_checkpoint(
    out_dir: str | Path,
    case: str = "tiny",
    overrides: dict | None = None,
    shards: int = 1,
    weights: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a checkpoint dir; `shards > 1` splits the tensors round-robin over indexed shard files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(case, overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    shutil.copyfile(find_tiktoken_file(None), out / "qwen.tiktoken")
    w = weights if weights is not None else make_weights(cfg)
    if shards == 1:
        write_safetensors(out / "model.safetensors", w)
        return out
    names = sorted(w)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: w[n] for n in names[s::shards]}
        write_safetensors(out / fname, part)
        weight_map |= dict.fromkeys(part, fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
