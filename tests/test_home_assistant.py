"""A real Home Assistant on our Wyoming port: `homeassistant` 2025.1.4 from PyPI with its test harness
(`pytest-homeassistant-custom-component` 0.13.205) in its own venv on Python 3.12, built once and cached. Our server
(real embedded weights, real voice) runs here on port 0; `tests/home_assistant/ha_pipeline.py`, run by Home
Assistant's Python, adds the Wyoming integration by host and port, builds an Assist pipeline from our speech-to-text,
conversation agent and text-to-speech, and runs it from an espeak-ng question to the spoken answer. Checked here:
what Home Assistant heard, the answer text, and the answer audio it delivers, transcribed back by our recogniser.

The venv: `~/.cache/qwen-voice-assistant-test/ha-venv` (or under `$XDG_CACHE_HOME`), from the pinned
`tests/home_assistant/requirements.txt` (`--no-deps`: no resolver run). Built under a lock file; its stamp (the
requirements' hash) is written last, so a half-built venv is never used: it is rebuilt. Python 3.12 is
`$HA_TEST_PYTHON`, else pyenv's 3.12.1, else `python3.12` on PATH. Needs the `ffmpeg` program (Home Assistant
converts the spoken answer with it): `make system-deps`.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server_util import wav_pcm16
from tests.wyoming_util import transcribe, words, wy_cfg

log = logging.getLogger("tests.home_assistant")

HA_DIR = Path(__file__).resolve().parent / "home_assistant"
REQUIREMENTS = HA_DIR / "requirements.txt"
PYENV_PYTHON = Path.home() / ".pyenv" / "versions" / "3.12.1" / "bin" / "python"
INSTALL_TIMEOUT_S = 3600.0  # ~6 min measured cold (downloads), on a shared machine
RUN_TIMEOUT_S = 900.0  # Home Assistant's side: set-up, then one spoken turn through our server


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-voice-assistant-test"


def base_python() -> str:
    for candidate in (os.environ.get("HA_TEST_PYTHON"), str(PYENV_PYTHON), shutil.which("python3.12")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(
        "Home Assistant 2025.1.4 needs Python 3.12: set HA_TEST_PYTHON, or install it "
        f"(pyenv install 3.12.1 gives {PYENV_PYTHON})"
    )


def ha_python() -> Path:
    """The cached venv's python, built now if it is missing, half-built or from other requirements."""
    venv = cache_dir() / "ha-venv"
    python, stamp = venv / "bin" / "python", venv / ".installed"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "ha-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run building it: wait for it
        if stamp.is_file() and stamp.read_text() == want and python.is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(REQUIREMENTS)]
        subprocess.run(pip, check=True, timeout=INSTALL_TIMEOUT_S)
        stamp.write_text(want)
        log.warning("built Home Assistant's venv %s in %.0f s", venv, time.monotonic() - t0)
    return python


@pytest.fixture(scope="session")
def home_assistant_python() -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is missing: Home Assistant converts the spoken answer with it (make system-deps)")
    return ha_python()


@pytest.mark.slow
async def test_home_assistant_runs_an_assist_pipeline_on_our_wyoming_port(
    home_assistant_python, embedded_backend, speech_pool, question_wav, tmp_path
):
    from assistant.transport.server import running_server

    question = tmp_path / "question.pcm"
    question.write_bytes(wav_pcm16(question_wav).astype("<i2").tobytes())  # what a satellite streams: 16 kHz mono
    result, answer_wav = tmp_path / "result.json", tmp_path / "answer.wav"
    async with running_server(wy_cfg(), backend=embedded_backend, speech=speech_pool) as srv:
        ours = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")  # Home Assistant's Python sees only its own venv
        env = {
            **{k: v for k, v in os.environ.items() if k not in ours},
            "WYOMING_HOST": "127.0.0.1",
            "WYOMING_PORT": str(srv.wyoming.port),
            "QUESTION_PCM": str(question),
            "RESULT_JSON": str(result),
            "ANSWER_AUDIO": str(answer_wav),
        }
        cmd = [str(home_assistant_python), "-m", "pytest", "-c", str(HA_DIR / "pytest.ini"), "-p", "no:cacheprovider"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, "-q", str(HA_DIR / "ha_pipeline.py"), env=env, cwd=HA_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)  # our server serves it meanwhile
        report = out.decode(errors="replace")
        assert proc.returncode == 0, f"Home Assistant's pipeline test failed:\n{report[-6000:]}"
        got = json.loads(result.read_text())
        sys.stderr.write(f"Home Assistant: {got}\n")
        heard, answer = words(got["heard"]), words(got["answer"])
        assert "capital" in heard and "france" in heard, got
        assert "paris" in answer, got
        assert got["stages"][-1] == "run-end" and "tts-end" in got["stages"], got
        spoken = wav_pcm16(answer_wav)  # as Home Assistant delivers it (converted by its ffmpeg)
        assert "paris" in words(await transcribe(srv.wyoming.port, spoken.astype("<i2").tobytes(), 16000))
