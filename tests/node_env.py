"""npm packages for the Node client tests, installed once into a cached folder, and running `node` with them.

`tests/node/package.json` pins every package and `tests/node/package-lock.json` pins the whole tree with integrity
hashes (no registry URLs). `npm_packages()` returns a folder whose `node_modules/` holds exactly that tree:
`~/.cache/qwen-voice-assistant-test/npm/<hash of both files>/`. It is built by `npm ci` (which checks every
package's hash; install scripts are not run) in a temporary folder, stamped, and renamed into place only then, under a
file lock: a half-installed folder is never used, two test processes never install at once, and an edited lock
makes a new folder. Scripts in tests/node/ are CommonJS (`.cjs`) and find the packages through NODE_PATH, which
`run_node` sets (ESM `import` ignores NODE_PATH).

To add a package (e.g. `@openai/agents-realtime`): pin it in tests/node/package.json, run
`npm install --package-lock-only --no-audit --no-fund --omit-lockfile-registry-resolved` in tests/node, commit both.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
MIN_NODE_MAJOR = 20  # Debian's nodejs
INSTALL_FORMAT = 1  # bump when the install command changes: older folders are then not reused
STAMP = ".installed"
NPM_TIMEOUT_S = 900.0  # a first install on a slow, shared machine; later runs reuse the folder


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen-voice-assistant-test" / "npm"


def require_node() -> str:
    """The `node` program (Node >= 20) and `npm`, or a test failure saying how to install them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are missing: install Debian's nodejs and npm packages (make system-deps)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    major = int(version.strip().lstrip("v").split(".")[0])
    if major < MIN_NODE_MAJOR:
        pytest.fail(f"node {version.strip()} is too old: the tests need Node >= {MIN_NODE_MAJOR}")
    return node


def npm_packages(project: Path = NODE_DIR) -> Path:
    """The folder (with `node_modules/`) holding `project`'s locked packages, installed on first use."""
    require_node()
    files = [project / "package.json", project / "package-lock.json"]
    digest = hashlib.sha256(str(INSTALL_FORMAT).encode())
    for f in files:
        digest.update(f.read_bytes())
    root = cache_root()
    final = root / digest.hexdigest()[:16]
    if (final / STAMP).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / STAMP).exists():  # another process installed it while we waited
            return final
        for leftover in root.glob(".tmp-*"):  # an interrupted install: never used, removed
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a folder without its stamp is incomplete
        tmp = root / f".tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            for f in files:
                shutil.copyfile(f, tmp / f.name)
            cmd = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
            if r.returncode != 0:
                pytest.fail(f"`npm ci` in {tmp} for {project} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            (tmp / STAMP).write_text("")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_node(
    script: Path, args: list[str], env: dict[str, str], timeout_s: float, project: Path = NODE_DIR
) -> subprocess.CompletedProcess[str]:
    """`node script args...` with `project`'s packages on NODE_PATH and `env` added to this process's environment."""
    node = require_node()
    modules = npm_packages(project) / "node_modules"
    full_env = {**os.environ, "NODE_PATH": str(modules), **env}
    return subprocess.run([node, str(script), *args], env=full_env, capture_output=True, text=True, timeout=timeout_s)
