"""Stalls under concurrent spoken turns: `python -m bench.stalls [--levels 1,4,8,16,32] [--modes ...]`.

Drives the engine directly (the embedded backend, loaded on the engine's worker as the server does) with N sessions
that each ask one espeak-ng spoken question (the set of `bench/embedded_latency.py`), arriving `--stagger-s` apart
as server-VAD turns would: the turn's audio is submitted (`add_user_turn`, the moment the VAD commits) and answered
(`respond`). Measured on the event loop's clock, per level:
- `first_text_ms` p50/p90: from the turn's submission to the answer's first text delta (queue + Whisper + prefill);
- `stall_ms`: the longest gap between two deltas of one running answer (max and p90 over the answers): how long
  the worker left a streaming answer waiting (audio work of other turns, prefills);
- the worker's prepare chunks, decode steps and largest decode batch.
Two modes on the same engine and weights, alternating which goes first per level (the machine's load drifts):
`bounded_steps` (the engine as it is) and `one_batch`, which emulates the engine before bounded steps (every queued
turn in one prepare call, all its Whisper work in one go).

Writes bench/results/stalls-<YYYYMMDD><tag>.json (`bench/results.py`): date, git commit, machine (CPU model, cores,
torch version and threads), load (os.getloadavg before/after), parameters and the results per level and mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from assistant.backends.base import Utterance
from assistant.config import load_config
from assistant.engine.api import ResponseDone, ResponseOptions, TextDelta
from assistant.engine.engine import Engine
from bench.results import Record
from bench.spoken_set import QUESTIONS, synthesize


class OneBatch:
    """The backend as the engine saw it before bounded steps: no `prepare_steps`, every queued turn in one call."""

    prepare_batch = 1024

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prepare(self, utterances, audio_numbers):
        return self._backend.prepare(utterances, audio_numbers)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 1)


async def one_session(engine: Engine, sid: str, audio: np.ndarray, delay_s: float, opts: ResponseOptions) -> dict:
    await asyncio.sleep(delay_s)
    engine.open_session(sid)
    t0 = time.monotonic()
    await engine.add_user_turn(sid, Utterance(key=f"{sid}_q", audio=audio))
    stream = engine.respond(sid, opts)
    deltas: list[float] = []
    done: ResponseDone | None = None
    async for ev in stream:
        if isinstance(ev, TextDelta):
            deltas.append(time.monotonic())
        else:
            done = ev
    engine.close_session(sid)
    gaps = [(b - a) * 1000 for a, b in zip(deltas, deltas[1:], strict=False)]
    return {
        "first_text_ms": (deltas[0] - t0) * 1000 if deltas else None,
        "stall_ms": max(gaps, default=0.0),
        "deltas": len(deltas),
        "status": done.status if done else None,
    }


async def run_level(engine: Engine, n: int, clips: list[np.ndarray], stagger_s: float, opts: ResponseOptions) -> dict:
    worker = engine._worker
    chunks, steps = worker.turns.chunks, worker.steps
    worker.max_batch = 0
    worker.turns.longest_step_s = 0.0
    t0 = time.monotonic()
    rows = await asyncio.gather(
        *(one_session(engine, f"n{n}s{i}", clips[i % len(clips)], i * stagger_s, opts) for i in range(n))
    )
    first = [r["first_text_ms"] for r in rows if r["first_text_ms"] is not None]
    stalls = [r["stall_ms"] for r in rows]
    return {
        "sessions": n,
        "first_text_ms_p50": percentile(first, 50),
        "first_text_ms_p90": percentile(first, 90),
        "stall_ms_max": round(max(stalls), 1),
        "stall_ms_p90": percentile(stalls, 90),
        "stall_ms_p50": percentile(stalls, 50),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "prepare_chunks": worker.turns.chunks - chunks,
        "longest_prepare_step_ms": round(worker.turns.longest_step_s * 1000, 1),
        "decode_steps": worker.steps - steps,
        "max_decode_batch": worker.max_batch,
        "wall_s": round(time.monotonic() - t0, 1),
    }


def set_mode(engine: Engine, backend, mode: str) -> None:
    """On the worker, between steps (via `engine.call`): which backend and chunk size its turn queue uses."""
    turns = engine._worker.turns
    turns.backend = OneBatch(backend) if mode == "one_batch" else backend
    turns.batch = OneBatch.prepare_batch if mode == "one_batch" else backend.prepare_batch


async def main(args: argparse.Namespace) -> None:
    from assistant.backends import load_backend

    record = Record("stalls", vars(args), tag=args.tag)  # the commit and load when the run starts
    levels = [int(x) for x in args.levels.split(",")]
    overrides = {"engine.max_active": args.max_active, "engine.max_queued": max(levels)}
    cfg = load_config(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        clips = [synthesize(q, Path(tmp) / f"q{i}.wav") for i, (q, _) in enumerate(QUESTIONS[: args.questions])]
    clips = [(np.round(c * 32768.0).clip(-32768, 32767) / 32768.0).astype(np.float32) for c in clips]

    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    backend = engine.backend
    modes = args.modes.split(",")
    opts = ResponseOptions(greedy=True, max_new_tokens=args.max_new_tokens)
    results = []
    try:
        await run_level(engine, 1, clips, 0.0, opts)  # warm-up (first calls, the system-prompt snapshot)
        for i, n in enumerate(levels):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                await engine.call(lambda _b, mode=mode: set_mode(engine, backend, mode))
                row = {"mode": mode, **await run_level(engine, n, clips, args.stagger_s, opts)}
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        await engine.stop()
    prepare_batch = {"bounded_steps": backend.prepare_batch, "one_batch": OneBatch.prepare_batch}
    record.write({"runs": results, "prepare_batch": prepare_batch}, torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,8,16,32", help="concurrent sessions per run, comma separated")
    ap.add_argument("--stagger-s", type=float, default=0.25, help="time between two sessions' turns")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-active", type=int, default=8, help="engine.max_active")
    ap.add_argument("--questions", type=int, default=8, help="distinct spoken questions (cycled over sessions)")
    ap.add_argument("--tag", default="", help="appended to the result file's name (a second run the same day)")
    ap.add_argument("--modes", default="bounded_steps,one_batch", help="bounded_steps and/or one_batch (before)")
    asyncio.run(main(ap.parse_args()))
