"""Soak run: `python -m bench.soak [--minutes 5] [--websocket 12] [--devices 4] [--broker-restarts 2]`.

Starts a real Mosquitto broker and the real server as a separate process (`python -m assistant serve`, the embedded
default, MQTT bridge on), then drives it as a household would for `--minutes`: WebSocket sessions and MQTT devices
each ask spoken questions (espeak-ng, `bench/spoken_set.py`) in a loop at real-time pace with server VAD, and every
few turns each also sends hostile input first (invalid JSON, wrong types, a 5,000-digit integer, nesting 5,000 deep,
NaN, an odd-length PCM chunk, an oversized message). The broker is killed and restarted `--broker-restarts` times.

Counted per client and in total: turns sent (a turn's speech was sent completely), turns committed (the server said
`input_audio_buffer.committed`), answered (`response.done` completed/incomplete), told (the turn ended in an `error`
event or a cancelled/failed `response.done`, e.g. a device whose broker went away mid-turn), lost (committed but
neither answered nor told: must be 0), crashed sessions (a WebSocket closed by the server, or a device that stopped
getting events: must be 0), errors by code, and the server's peak RSS (VmHWM). Writes bench/results/soak-DATE.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import numpy as np
import websockets

from bench.results import Record
from bench.spoken_set import QUESTIONS, synthesize

FRAME_MS = 20
TAIL_SILENCE_MS = 1200
TURN_TIMEOUT_S = 180.0  # a turn not answered by then counts as lost
HOSTILE = [
    "{not json",
    '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": 5}}',
    '{"type": "session.update", "session": {"temperature": ' + "9" * 5000 + "}}",
    '{"type": "session.update", "session": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"type": "session.update", "session": {"temperature": NaN}}',
    '{"type": "nonsense"}',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tally:
    sent: int = 0
    committed: int = 0
    answered: int = 0
    told: int = 0
    lost: int = 0
    crashed: int = 0
    errors: Counter = field(default_factory=Counter)


class TurnWatch:
    """Follows one client's server events: which committed turns were answered or ended with word to the client."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.open: dict[str, float] = {}  # committed item id -> when
        self.responding = False
        self.event = asyncio.Event()

    def feed(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "input_audio_buffer.committed":
            self.tally.committed += 1
            self.open[ev["item_id"]] = time.monotonic()
        elif kind == "error":
            self.tally.errors[ev["error"]["code"]] += 1
            if ev["error"]["code"] in ("turn_failed", "turn_too_long") and self.open:
                self._close_oldest(answered=False)
            elif ev["error"]["code"] == "turn_interrupted":  # a device's uncommitted turn dropped by a broker loss
                self.tally.told += 1
        elif kind == "response.done":
            status = ev["response"]["status"]
            if self.open:
                self._close_oldest(answered=status in ("completed", "incomplete"))
        self.event.set()

    def _close_oldest(self, answered: bool) -> None:
        key = min(self.open, key=self.open.get)
        del self.open[key]
        if answered:
            self.tally.answered += 1
        else:
            self.tally.told += 1

    def expire(self) -> None:
        now = time.monotonic()
        for key, t0 in list(self.open.items()):
            if now - t0 > TURN_TIMEOUT_S:
                del self.open[key]
                self.tally.lost += 1


def frames(pcm: np.ndarray) -> list[bytes]:
    n = 16000 * FRAME_MS // 1000
    out = [pcm[i : i + n].tobytes() for i in range(0, len(pcm), n)]
    return out + [np.zeros(n, dtype=np.int16).tobytes()] * (TAIL_SILENCE_MS // FRAME_MS)


async def paced(send, chunks: list[bytes]) -> None:
    t0 = time.monotonic()
    for k, chunk in enumerate(chunks):
        await asyncio.sleep(max(0.0, t0 + k * FRAME_MS / 1000 - time.monotonic()))
        await send(chunk)


async def wait_answered(watch: TurnWatch, deadline_s: float, alive=lambda: True) -> None:
    """Until the client's committed turns are answered (or told), the deadline passes, or its connection died."""
    while watch.open and time.monotonic() < deadline_s and alive():
        watch.event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.event.wait(), 1.0)
        watch.expire()


async def websocket_client(url: str, speech: list[np.ndarray], stop_at: float, tally: Tally, rng: random.Random):
    watch = TurnWatch(tally)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000}}))

        async def reader() -> None:
            async for msg in ws:
                watch.feed(json.loads(msg))

        task = asyncio.create_task(reader())
        try:
            turn = 0
            while time.monotonic() < stop_at and not task.done():
                if turn % 3 == 2:
                    for frame in rng.sample(HOSTILE, 2) + [b"\x01\x02\x03"]:
                        await ws.send(frame)
                await paced(ws.send, frames(speech[rng.randrange(len(speech))]))
                tally.sent += 1
                turn += 1
                await wait_answered(watch, time.monotonic() + TURN_TIMEOUT_S)
            if task.done():  # the server closed us: a crash from the client's point of view
                tally.crashed += 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await task
    watch.expire()
    tally.lost += len(watch.open)


async def mqtt_device(port: int, device: str, speech: list[np.ndarray], stop_at: float, tally: Tally, rng):
    """A device as a real one is configured: a persistent broker session (QoS 1 events queued while it is away) and
    a prompt reconnect when the broker goes away."""
    watch = TurnWatch(tally)
    prefix = f"assistant/{device}"
    turn = 0
    sent_since_connect = events_since_connect = 0
    waiting_since = time.monotonic()
    while time.monotonic() < stop_at:
        try:
            client = aiomqtt.Client("127.0.0.1", port, identifier=f"soak-{device}", clean_session=False, timeout=10)
            async with client:
                await client.subscribe(f"{prefix}/events", qos=1)
                sent_since_connect = events_since_connect = 0

                async def reader(client: aiomqtt.Client = client) -> None:
                    nonlocal events_since_connect
                    async for message in client.messages:
                        events_since_connect += 1
                        watch.feed(json.loads(message.payload))

                task = asyncio.create_task(reader())
                try:
                    while time.monotonic() < stop_at and not task.done():
                        if watch.open:  # a turn from before the broker went away: its answer may still come
                            await wait_answered(
                                watch, waiting_since + TURN_TIMEOUT_S, lambda task=task: not task.done()
                            )
                            continue
                        if turn % 3 == 2:
                            for frame in rng.sample(HOSTILE, 2):
                                await client.publish(f"{prefix}/control", frame.encode(), qos=1)
                        send = lambda c, client=client: client.publish(f"{prefix}/audio", c, qos=0)  # noqa: E731
                        await paced(send, frames(speech[turn % 4]))
                        tally.sent += 1
                        sent_since_connect += 1
                        turn += 1
                        waiting_since = time.monotonic()
                        await wait_answered(watch, waiting_since + TURN_TIMEOUT_S, lambda task=task: not task.done())
                    if task.done():
                        task.result()  # an MqttError: reconnect
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task
        except aiomqtt.MqttError:  # the broker is being restarted: try again at once, as devices do
            await asyncio.sleep(0.2)
    watch.expire()
    tally.lost += len(watch.open)
    if sent_since_connect and not events_since_connect:  # connected, speaking, and the server never answered
        tally.crashed += 1


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    speech = [(synthesize(q, tmp / f"q{i}.wav") * 32768).astype(np.int16) for i, (q, _) in enumerate(QUESTIONS[:8])]
    broker_port, http_port = free_port(), free_port()
    broker = subprocess.Popen(["mosquitto", "-p", str(broker_port)], stderr=subprocess.DEVNULL)
    cfg = tmp / "soak.toml"
    cfg.write_text(
        f"[server]\nport = {http_port}\nmax_sessions = {args.websocket + 2}\n"
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\nreconnect_max_s = 2.0\n'
        "[generation]\ngreedy = true\nmax_new_tokens = 24\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "assistant", "serve", "--config", str(cfg)], stderr=subprocess.PIPE
    )
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status == 200:
                    break
            await asyncio.sleep(0.5)
        rng = random.Random(1)
        stop_at = time.monotonic() + args.minutes * 60
        tallies = {f"ws{i}": Tally() for i in range(args.websocket)} | {f"dev{i}": Tally() for i in range(args.devices)}
        url = f"ws://127.0.0.1:{http_port}/v1/realtime"
        clients = [websocket_client(url, speech, stop_at, tallies[f"ws{i}"], rng) for i in range(args.websocket)]
        clients += [
            mqtt_device(broker_port, f"dev{i}", speech, stop_at, tallies[f"dev{i}"], rng) for i in range(args.devices)
        ]

        async def restarts() -> None:
            nonlocal broker
            for k in range(args.broker_restarts):
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()) / (args.broker_restarts - k + 1))
                broker.kill()
                broker.wait()
                await asyncio.sleep(3.0)
                broker = subprocess.Popen(["mosquitto", "-p", str(broker_port)], stderr=subprocess.DEVNULL)

        outcomes = await asyncio.gather(*clients, restarts(), return_exceptions=True)
        failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        rss = peak_rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(60)
        broker.kill()
    total = Tally()
    for t in tallies.values():
        for name in ("sent", "committed", "answered", "told", "lost", "crashed"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        total.errors.update(t.errors)
    as_dict = lambda t: {**{k: v for k, v in vars(t).items() if k != "errors"}, "errors": dict(t.errors)}  # noqa: E731
    return {
        "total": as_dict(total),
        "per_client": {name: as_dict(t) for name, t in tallies.items()},
        "client_failures": failures,
        "server_alive_at_end": alive,
        "server_exit_code": server.returncode,
        "server_peak_rss_mb": rss,
        "broker_restarts": args.broker_restarts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--websocket", type=int, default=12)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--broker-restarts", type=int, default=2)
    args = p.parse_args()
    record = Record("soak", vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        numbers = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(numbers["total"], indent=1))
    record.write(numbers, torch_threads=os.cpu_count() or 1, notes="server in its own process; torch threads there")


if __name__ == "__main__":
    main()
