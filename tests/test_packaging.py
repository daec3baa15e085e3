"""The installed package is complete: a wheel built from the checkout carries `assistant/default.toml` (the
documented defaults), and that installed copy, run from a directory outside the checkout, loads its configuration."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_wheel_ships_the_defaults_and_runs_outside_the_checkout(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("qwen_voice_assistant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "assistant/default.toml" in names and "clients/browser/index.html" in names
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import assistant, assistant.config as c; cfg = c.load_config(); "
        "print(assistant.__file__); print(cfg.server.port, cfg.vad.silence_duration_ms, cfg.embedded.whisper)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    where, values = run.stdout.split("\n")[:2]
    assert where.startswith(str(target)), f"imported {where}, not the installed wheel"
    assert values == "8765 600 base"
