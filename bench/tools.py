"""Tool calling through the real server, spoken: `python -m bench.tools [--config KEY=VALUE ...] [--tag T]`.

Loads the configured backend (embedded default) on an engine worker, starts the real server on port 0 around it and,
for each request of the set below, opens one WebSocket session as an OpenAI Realtime client would: `session.update`
(text output, push-to-talk, 16 kHz input, the four functions of `TOOLS`, `tool_choice: auto`), the request spoken by
espeak-ng (voices and speeds vary by request) as `input_audio_buffer.append` + `commit`, then `response.create`.
- Requests that need a tool: right function (name), right arguments (the expected values, compared loosely: case,
  numbers as numbers, the expected word inside the given one) and, after the client returns a result with one
  distinctive fact (`function_call_output` + `response.create`), whether the answer says that fact.
- Requests that need none: a false call is any `function_call`.
The result (`bench/results/tools-YYYYMMDD<tag>.json`, `bench/results.py` Record) has every request's transcript,
call, arguments, answer and seconds, and the rates; it is rewritten after every request (`"complete": false` until
the last), so a run cut short still leaves its rows. Requests alternate between needing a tool and not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from bench.quality import parse_override
from bench.quality_set import espeak_version
from bench.spoken_set import synthesize

TIMEOUT_S = 900.0  # one server event; only catches a hang (a shared 2-core machine took over 300 s once)


def _fn(name: str, description: str, arg: str, kind: str) -> dict[str, Any]:
    params = {"type": "object", "properties": {arg: {"type": kind}}, "required": [arg]}
    return {"type": "function", "name": name, "description": description, "parameters": params}


TOOLS = [
    _fn("get_weather", "Get the current weather in a city", "city", "string"),
    _fn("set_timer", "Set a timer for a number of minutes", "minutes", "number"),
    _fn("turn_on_light", "Turn on the light in a room", "room", "string"),
    _fn("play_music", "Play music by an artist", "artist", "string"),
]
# The client's result for each function, with one fact the answer should say (checked as a substring).
RESULTS = {
    "get_weather": ({"temperature_c": 23, "sky": "cloudy"}, ("23", "cloudy")),
    "set_timer": ({"status": "set", "ends_at": "10:45"}, ("10:45",)),
    "turn_on_light": ({"status": "on", "brightness_percent": 80}, ("80",)),
    "play_music": ({"now_playing": "Yellow Submarine"}, ("yellow submarine",)),
}
# (spoken request, expected function or None, expected arguments)
REQUESTS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("What's the weather like in Paris?", "get_weather", {"city": "Paris"}),
    ("Is it raining in London right now?", "get_weather", {"city": "London"}),
    ("How cold is it in Berlin today?", "get_weather", {"city": "Berlin"}),
    ("Set a timer for ten minutes.", "set_timer", {"minutes": 10}),
    ("Start a five minute timer please.", "set_timer", {"minutes": 5}),
    ("Remind me in twenty minutes with a timer.", "set_timer", {"minutes": 20}),
    ("Turn on the light in the kitchen.", "turn_on_light", {"room": "kitchen"}),
    ("Switch on the bedroom lights.", "turn_on_light", {"room": "bedroom"}),
    ("Can you put the lights on in the living room?", "turn_on_light", {"room": "living room"}),
    ("Play some music by the Beatles.", "play_music", {"artist": "Beatles"}),
    ("I want to hear Taylor Swift.", "play_music", {"artist": "Taylor Swift"}),
    ("Put on a song by Queen.", "play_music", {"artist": "Queen"}),
    ("What is the capital of France?", None, {}),
    ("Tell me a joke.", None, {}),
    ("How many legs does a spider have?", None, {}),
    ("Who wrote Romeo and Juliet?", None, {}),
    ("What is two plus two?", None, {}),
    ("Say hello to my friend Anna.", None, {}),
    ("What is the weather usually like on Mars?", None, {}),
    ("How long is a minute in seconds?", None, {}),
    ("Why is the sky blue?", None, {}),
    ("Thank you, that is all.", None, {}),
    ("What do you call a baby cat?", None, {}),
    ("Spell the word light.", None, {}),
]
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp+f2")
WPMS = (150, 170)


def arguments_match(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    for key, want in expected.items():
        have = got.get(key)
        if isinstance(want, int | float):
            try:
                if float(have) != float(want):
                    return False
            except (TypeError, ValueError):
                return False
        elif not isinstance(have, str) or want.lower() not in have.lower():
            return False
    return True


async def _until(ws, etype: str, log: list[dict]) -> dict:
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        log.append(event)
        if event["type"] == etype:
            return event


async def run_request(url: str, text: str, audio: np.ndarray) -> dict[str, Any]:
    """One session: the spoken request, the answer (a call or words) and, after a call, the answer to its result."""
    log: list[dict] = []
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:  # a loaded CPU answers late
        await _until(ws, "session.created", log)
        session = {"type": "realtime", "output_modalities": ["text"], "input_sample_rate": 16000, "tools": TOOLS,
                   "tool_choice": "auto", "audio": {"input": {"turn_detection": None}}}  # fmt: skip
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await _until(ws, "session.updated", log)
        pcm = np.round(audio * 32768.0).clip(-32768, 32767).astype("<i2").tobytes()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "response.create"}))
        done = await _until(ws, "response.done", log)
        row: dict[str, Any] = {"request": text, "seconds": round(time.perf_counter() - t0, 2)}
        heard = [e["transcript"] for e in log if e["type"].endswith("input_audio_transcription.completed")]
        row["transcript"] = heard[0] if heard else None
        out = done["response"]["output"][0] if done["response"]["output"] else {}
        row["status"] = done["response"]["status"]
        if out.get("type") != "function_call":
            row.update(call=None, answer=(out.get("content") or [{}])[0].get("text"))
        else:
            row.update(call=out["name"], arguments=out["arguments"], call_status=out["status"])
            if out["status"] == "completed":
                result, facts = RESULTS[out["name"]]
                item = {"type": "function_call_output", "call_id": out["call_id"], "output": json.dumps(result)}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                t1 = time.perf_counter()
                await ws.send(json.dumps({"type": "response.create"}))
                after = await _until(ws, "response.done", log)
                answer = after["response"]["output"][0]
                text_out = (answer.get("content") or [{}])[0].get("text", "") if answer["type"] == "message" else ""
                row.update(answer=text_out, answer_seconds=round(time.perf_counter() - t1, 2))
                row["answer_uses_result"] = any(f in text_out.lower() for f in facts)
        row["errors"] = [e["error"]["message"] for e in log if e["type"] == "error"]
    return row


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    need = [r for r in rows if r["expected_call"] is not None]
    none = [r for r in rows if r["expected_call"] is None]
    right_fn = [r for r in need if r["call"] == r["expected_call"]]
    right_args = [r for r in right_fn if r["arguments_ok"]]
    used = [r for r in right_fn if r.get("answer_uses_result")]
    false_calls = [r for r in none if r["call"] is not None]
    return {
        "tool_requests": len(need),
        "right_function": len(right_fn),
        "right_function_and_arguments": len(right_args),
        "answer_uses_result_after_right_call": len(used),
        "no_tool_requests": len(none),
        "false_calls": len(false_calls),
        "requests_with_error_events": sum(1 for r in rows if r["errors"]),
        "median_seconds_to_response_done": float(np.median([r["seconds"] for r in rows])),
    }


def interleaved(requests: list) -> list[tuple[int, tuple]]:
    """(index, request) alternating tool and no-tool requests, so a partial run is balanced."""
    need = [(i, r) for i, r in enumerate(requests) if r[1] is not None]
    none = [(i, r) for i, r in enumerate(requests) if r[1] is None]
    return [x for pair in zip(need, none, strict=True) for x in pair]


async def main(args: argparse.Namespace, overrides: dict[str, Any], record: Any) -> dict[str, Any]:
    import torch

    from assistant.backends import load_backend
    from assistant.config import load_config
    from assistant.engine.engine import Engine
    from assistant.transport.server import running_server

    cfg = load_config(overrides={"server.port": 0, "logging.level": "warning", **overrides})
    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    threads = await engine.call(lambda b: torch.get_num_threads())
    rows = []
    try:
        async with running_server(cfg, engine=engine) as srv:
            with tempfile.TemporaryDirectory() as tmp:
                for i, (text, fn, expected) in interleaved(REQUESTS)[args.start :]:
                    voice, wpm = VOICES[i % len(VOICES)], WPMS[i % len(WPMS)]
                    audio = synthesize("[[_:]] " + text, Path(tmp) / f"r{i}.wav", voice, wpm)
                    row = await run_request(srv.ws_url, text, audio)
                    args_ok = False
                    if row["call"] is not None and row["call"] == fn and row.get("call_status") == "completed":
                        args_ok = arguments_match(expected, json.loads(row["arguments"]))
                    row.update(voice=voice, wpm=wpm, expected_call=fn, expected_arguments=expected)
                    row["arguments_ok"] = args_ok
                    print(json.dumps(row, ensure_ascii=False), flush=True)
                    rows.append(row)
                    # written after every request (the same file), so a run cut short still leaves its rows
                    partial = {
                        **numbers(rows, threads, cfg, overrides),
                        "complete": len(rows) == len(REQUESTS) - args.start,
                    }
                    record.write(partial, torch_threads=threads, notes=args.notes)
    finally:
        await engine.stop()
    print(json.dumps(score(rows)))
    return {**numbers(rows, threads, cfg, overrides), "complete": len(rows) == len(REQUESTS) - args.start}


def numbers(rows: list[dict[str, Any]], threads: int, cfg: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    summary = score(rows)
    return {
        "worker_torch_threads": threads,
        "model.backend": cfg.model.backend,
        "overrides": overrides,
        "espeak_ng": espeak_version(),
        "tools": TOOLS,
        "totals": summary,
        "requests": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", type=parse_override, action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    ap.add_argument("--tag", default="", help="result file name suffix: tools-DATE-TAG.json")
    ap.add_argument("--start", type=int, default=0, help="skip the first N requests (of the alternating order)")
    ap.add_argument("--notes", default="", help="written into the result file")
    return ap


if __name__ == "__main__":
    from bench.results import Record

    args = build_parser().parse_args()
    overrides = dict(args.config)
    record = Record("tools", {"config": overrides, "start": args.start}, tag=f"-{args.tag}" if args.tag else "")
    result = asyncio.run(main(args, overrides, record))
    record.write(result, torch_threads=result["worker_torch_threads"], notes=args.notes)
