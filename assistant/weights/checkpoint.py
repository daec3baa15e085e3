"""Strict loading of a Hugging Face style checkpoint directory into modules built on the `meta` device.

Owns: reading `config.json` / `generation_config.json`, finding the safetensors shards (one `model.safetensors`, or
the shards named by `model.safetensors.index.json`), checking every key and shape against the model BEFORE any
weight is read, then loading shard by shard with `load_state_dict(assign=True)` so a model never exists twice in
memory (an 8 B checkpoint needs its own size in RAM, plus one tensor in flight for a dtype conversion).

    modules = {"": lm, "transformer.audio.": encoder}     # key prefix -> module; the longest prefix wins
    load_weights(checkpoint_dir, modules, dtype=torch.float32, device=torch.device("cpu"))

Errors name what was expected, what came, and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint directory does not match the model (the message lists every problem)."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: expected the file {path}, it does not exist; is this a checkpoint directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from None


def shard_files(checkpoint_dir: str | Path) -> dict[Path, list[str] | None]:
    """Shard path -> the keys the index assigns to it (None for a single unindexed file)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint: expected a directory, {root} is not one")
    index = root / INDEX_NAME
    if index.is_file():
        data = read_json(index, "checkpoint index")
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(
                f"checkpoint index {index}: expected a non-empty 'weight_map' {{tensor name: shard file}}, got "
                f"{type(wmap).__name__}; re-download the index file"
            )
        shards: dict[Path, list[str] | None] = {}
        for key, fname in wmap.items():
            shards.setdefault(root / fname, []).append(key)  # type: ignore[union-attr]
        missing = [str(p.name) for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {root}: the index names shard files that are missing: {', '.join(sorted(missing))}; "
                "download every shard listed in model.safetensors.index.json"
            )
        return shards
    single = root / SINGLE_NAME
    if single.is_file():
        return {single: None}
    found = sorted(p.name for p in root.glob("*.safetensors"))
    raise CheckpointError(
        f"checkpoint {root}: expected {SINGLE_NAME} or {INDEX_NAME} with its shards; found "
        f"{', '.join(found) if found else 'no .safetensors files'}"
    )


def _expected(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Checkpoint key -> (module prefix, local key, shape) for every parameter and persistent buffer."""
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for prefix, module in modules.items():
        for local, t in module.state_dict(keep_vars=True).items():
            full = prefix + local
            # A nested module registered under a longer prefix owns its keys (e.g. transformer.audio.*).
            if max((p for p in modules if full.startswith(p)), key=len) == prefix:
                out[full] = (prefix, local, tuple(t.shape))
    return out


def _list(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(
    checkpoint_dir: str | Path, modules: dict[str, nn.Module], dtype: torch.dtype, device: torch.device
) -> None:
    """Fill `modules` (built on any device, usually `meta`) from the checkpoint's safetensors, strictly."""
    expected = _expected(modules)
    shards = shard_files(checkpoint_dir)
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    wrong_index = []
    for path, listed in shards.items():
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for k in keys:
                found[k] = (path, tuple(f.get_slice(k).get_shape()))
            if listed is not None:
                wrong_index += [f"{k} (index says {path.name})" for k in set(listed) - set(keys)]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: checkpoint {list(found[k][1])}, model {list(expected[k][2])}"
        for k in sorted(set(expected) & set(found))
        if found[k][1] != expected[k][2]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_list(mismatched)}")
    if wrong_index:
        problems.append(f"keys the index lists but the shard lacks ({len(wrong_index)}): {_list(sorted(wrong_index))}")
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not match the model built from its config.json: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights and that every shard is complete."
        )
    for path in shards:
        per_module: dict[str, dict[str, torch.Tensor]] = {p: {} for p in modules}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                prefix, local, _ = expected[k]
                per_module[prefix][local] = f.get_tensor(k).to(device=device, dtype=dtype)
        for prefix, sd in per_module.items():
            if sd:
                modules[prefix].load_state_dict(sd, strict=False, assign=True)
        del per_module
    for prefix, module in modules.items():
        left = [prefix + n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: tensors never loaded: {_list(left)}")
