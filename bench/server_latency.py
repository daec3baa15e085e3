"""Voice latency through the real server (owner: engineer D): `python -m bench.server_latency [--questions N]`.

Starts the server on port 0 with the embedded default, then for each spoken question (espeak-ng, the same set as
`bench/embedded_latency.py`) streams the speech over one WebSocket session as binary 16 kHz frames, followed by
silence paced in real time (20 ms frames every 20 ms), as a microphone would. Server VAD ends the turn. Measured per
turn on the client's clock, from the moment the last speech frame was sent:
- `committed_ms`: the server's `input_audio_buffer.committed` (includes the `silence_duration_ms` wait),
- `first_text_ms`: the first `response.output_text.delta`,
- `done_ms`: `response.done`;
and whether the answer contains the expected keyword. Prints one JSON line per turn and a summary (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

from assistant.config import load_config
from assistant.server.app import running_server
from bench.embedded_latency import QUESTIONS, synthesize

FRAME_MS = 20
TAIL_SILENCE_MS = 1500
TIMEOUT_S = 300.0


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


async def main(n_questions: int) -> None:
    cfg = load_config(overrides={"server.port": 0, "generation.greedy": True, "generation.max_new_tokens": 64})
    from assistant.backends import load_backend

    backend = await asyncio.to_thread(load_backend, cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with running_server(cfg, backend=backend) as srv:
            for i, (question, keywords) in enumerate(QUESTIONS[:n_questions]):
                audio = synthesize(question, Path(tmp) / f"q{i}.wav")
                pcm = np.round(audio * 32768.0).clip(-32768, 32767).astype("<i2")
                async with websockets.connect(srv.ws_url) as ws:  # a fresh conversation per question
                    await ws.recv()
                    await ws.send(json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000}}))
                    await ws.recv()
                    row = await one_turn(ws, pcm)
                row.update(question=question, correct=any(k in row["answer"].lower() for k in keywords))
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {k: round(statistics.median(r[k] for r in rows), 1) for k in ("committed_ms", "first_text_ms", "done_ms")}
    summary["correct"] = f"{sum(r['correct'] for r in rows)}/{len(rows)}"
    summary["silence_duration_ms"] = cfg.vad.silence_duration_ms
    print("median", json.dumps(summary))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    asyncio.run(main(ap.parse_args().questions))
