"""Voice latency through the real server (owner: engineer D): `python -m bench.server_latency [--questions N]`.

Starts the real server (`running_server`, port 0) with the embedded default, Whisper base (CTranslate2 weights) then
Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF, converted to bf16), loaded on the engine's worker thread
(`Engine.loading`). For each spoken question of `bench/spoken_set.py` (espeak-ng; scored by its `correct`, greedy,
`ANSWER_TOKENS` new tokens at most, as the test and `bench/embedded_latency.py` do) it streams the speech over one
WebSocket session as binary 16 kHz frames, followed by silence paced in real time (20 ms frames every 20 ms),
as a microphone would. Server VAD ends the turn. Measured per
turn on the client's clock, from the moment the last speech frame was sent:
- `committed_ms`: the server's `input_audio_buffer.committed` (includes the `silence_duration_ms` wait),
- `first_text_ms`: the first `response.output_text.delta`,
- `done_ms`: `response.done`;
and whether the answer is correct. Prints one JSON line per turn and a summary (medians); the result goes to
`bench/results/server_latency-YYYYMMDD.json`.

Speculation (`vad.early_prepare_ms`: the turn's audio work starts during the end-of-turn silence): by default both
modes run in the same process on one engine (one worker thread), one server each, alternating which goes first per
question, and the summary has one line per mode; `--no-speculation` / `--speculation-only` run one mode.
`speculative` in a row says whether the engine reused the speculative audio work for that turn; `prefix_hit` whether
its prefill started from the shared system-prompt snapshot (one warm-up turn, not reported, runs first; the two
servers share one engine and so one snapshot).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import websockets

from assistant.config import load_config
from assistant.engine import metrics
from assistant.engine.engine import Engine
from assistant.transport.server import running_server
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS, answered_correctly, correct, synthesize

FRAME_MS = 20
TAIL_SILENCE_MS = 1500
TIMEOUT_S = 300.0


def pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(audio * 32768.0).clip(-32768, 32767).astype("<i2")


async def one_turn(ws, pcm: np.ndarray) -> dict:
    frame = 16000 * FRAME_MS // 1000
    for i in range(0, len(pcm), frame):
        await ws.send(pcm[i : i + frame].tobytes())
    t_end = time.monotonic()

    async def pace_silence() -> None:
        zero = np.zeros(frame, dtype=np.int16).tobytes()
        for k in range(TAIL_SILENCE_MS // FRAME_MS):
            await asyncio.sleep(max(0.0, t_end + (k + 1) * FRAME_MS / 1000 - time.monotonic()))
            await ws.send(zero)

    pacer = asyncio.create_task(pace_silence())
    marks: dict[str, float] = {}
    answer = ""
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        now_ms = (time.monotonic() - t_end) * 1000
        if ev["type"] == "input_audio_buffer.committed":
            marks.setdefault("committed_ms", now_ms)
        elif ev["type"] == "response.output_text.delta":
            marks.setdefault("first_text_ms", now_ms)
        elif ev["type"] == "response.done":
            marks["done_ms"] = now_ms
            answer = ev["response"]["output"][0]["content"][0]["text"] if ev["response"]["output"] else ""
            marks["server_timings_ms"] = ev["response"].get("timings_ms", {})
            break
    await pacer
    return {**marks, "answer": answer}


def _confirmed() -> float:
    return metrics.SPECULATIONS.labels(outcome="confirmed")._value.get()


def _prefix_hits() -> float:
    return metrics.PREFIX_SNAPSHOTS.labels(outcome="hit")._value.get()


async def ask(srv, pcm: np.ndarray) -> dict:
    confirmed, prefix_hits = _confirmed(), _prefix_hits()
    async with websockets.connect(srv.ws_url) as ws:  # a fresh conversation per question
        await ws.recv()
        session = {"input_sample_rate": 16000, "output_modalities": ["text"]}  # text latency (voice: voice_latency)
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await ws.recv()
        row = await one_turn(ws, pcm)
    row["speculative"] = _confirmed() > confirmed
    row["prefix_hit"] = _prefix_hits() > prefix_hits
    return row


async def main(n_questions: int, modes: list[str]) -> dict:
    base = {"server.port": 0, "generation.greedy": True, "generation.max_new_tokens": ANSWER_TOKENS}
    cfgs = {
        "speculation": load_config(overrides=base),
        "no_speculation": load_config(overrides={**base, "vad.early_prepare_ms": 0}),
    }
    from assistant.backends import load_backend

    cfg = cfgs["speculation"]  # the modes differ only in the server's VAD settings: one engine serves both
    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    threads = await engine.call(lambda b: torch.get_num_threads())
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with contextlib.AsyncExitStack() as stack:
                servers = {m: await stack.enter_async_context(running_server(cfgs[m], engine=engine)) for m in modes}
                warm = synthesize("Hello there.", Path(tmp) / "warm.wav")  # kernels, first allocations, the snapshot
                await ask(servers[modes[0]], pcm16(warm))
                for i, (question, keywords) in enumerate(QUESTIONS[:n_questions]):
                    pcm = pcm16(synthesize(question, Path(tmp) / f"q{i}.wav"))
                    for mode in modes if i % 2 == 0 else modes[::-1]:  # alternate who goes first (warm caches)
                        row = await ask(servers[mode], pcm)
                        row.update(mode=mode, question=question, correct=correct(row["answer"], keywords))
                        rows[mode].append(row)
                        print(json.dumps(row), flush=True)
    finally:
        await engine.stop()
    summaries = {}
    for mode, mode_rows in rows.items():
        summary = {
            k: round(statistics.median(r[k] for r in mode_rows), 1)
            for k in ("committed_ms", "first_text_ms", "done_ms")
        }
        summary["correct"] = f"{sum(r['correct'] for r in mode_rows)}/{len(mode_rows)}"
        if len(mode_rows) == len(QUESTIONS):
            summary["correct_questions"] = answered_correctly([r["answer"] for r in mode_rows])
        summary["speculative_turns"] = f"{sum(r['speculative'] for r in mode_rows)}/{len(mode_rows)}"
        summary["prefix_hits"] = f"{sum(r['prefix_hit'] for r in mode_rows)}/{len(mode_rows)}"
        summary["silence_duration_ms"] = cfgs[mode].vad.silence_duration_ms
        summary["early_prepare_ms"] = cfgs[mode].vad.early_prepare_ms
        print("median", mode, json.dumps(summary))
        summaries[mode] = summary
    return {"worker_torch_threads": threads, "median": summaries, "turns": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--notes", default="", help="written into the result file")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--no-speculation", action="store_true", help="only vad.early_prepare_ms = 0")
    group.add_argument("--speculation-only", action="store_true", help="only the configured early_prepare_ms")
    args = ap.parse_args()
    record = Record("server_latency", vars(args))
    if args.no_speculation:
        chosen = ["no_speculation"]
    elif args.speculation_only:
        chosen = ["speculation"]
    else:
        chosen = ["speculation", "no_speculation"]
    numbers = asyncio.run(main(args.questions, chosen))
    record.write(numbers, torch_threads=numbers.pop("worker_torch_threads"), notes=args.notes)
