"""One result file per benchmark run: `bench/results/<name>-YYYYMMDD.json` (a second run the same day overwrites it).

Every file holds what is needed to judge the numbers: when, which commit (and any uncommitted change to bench/ or
assistant/ when the run started), the machine (CPU model, cores, torch version and threads), the load
(`os.getloadavg()` when the run started and when it ended, and the share of CPU time the hypervisor gave to other
machines during the run: `steal`, from /proc/stat; this shared machine's speed moves with it), the parameters the
script ran with and the numbers.

    record = Record("engine_throughput", vars(args))   # at the start: takes the load before
    ...
    record.write(numbers, torch_threads=n)             # at the end: takes the load after, writes, returns the path
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False, timeout=30)
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat's first line: user nice system idle iowait irq softirq steal)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the CPU time between two readings that the hypervisor gave to other machines."""
    if before is None or after is None:
        return None
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return round(delta[7] / sum(delta), 3) if sum(delta) > 0 else None


class Record:
    def __init__(self, name: str, params: dict[str, Any], tag: str = ""):
        self.name = name
        self.tag = tag  # appended to the file name (a second run the same day)
        self.params = dict(params)
        self.started = dt.datetime.now(dt.UTC)
        self.load_before = load_average()
        self.cpu_before = cpu_times()
        self.commit = _git("rev-parse", "HEAD")
        # only the code that runs counts (tests or README edited meanwhile do not change the numbers)
        self.dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "bench", "assistant")

    def write(self, numbers: dict[str, Any], torch_threads: int, notes: str = "") -> Path:
        import torch

        result = {
            "benchmark": f"bench/{self.name}.py",
            "date": self.started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": self.commit,
            "git_dirty_code": self.dirty.splitlines(),  # uncommitted changes under bench/ and assistant/ at the start
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch_threads,
                "python": platform.python_version(),
            },
            "load": {
                "before": self.load_before,
                "after": load_average(),
                "steal": steal_share(self.cpu_before, cpu_times()),
            },
            "params": self.params,
            "notes": notes,
            "results": numbers,
        }
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{self.name}-{self.started:%Y%m%d}{self.tag}.json"
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"result written to {path.relative_to(REPO)}", flush=True)
        return path
