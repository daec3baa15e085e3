"""Desktop client: `python -m clients.desktop [--url ws://...] [--token T] [--wav FILE] [--push-to-talk]`.

Owns the WebSocket conversation of one desktop user: captures the microphone with sounddevice (16 kHz mono PCM16 in
small blocks) or streams a WAV file at real-time speed, sends it as binary frames (our protocol extension), prints
the user's transcript and the answer as it streams (`clients.common.TurnView`), and reconnects with exponential
backoff when the server goes away. With `--wav` it exits after the answer to the file's last turn (exit code 0).
The audio sources are in `clients.audio_source`, the conversation loops in `clients.common`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from clients.audio_source import DEFAULT_BLOCK_MS, INPUT_RATE_HZ, Microphone, NoMicrophone, load_wav_pcm16
from clients.common import (
    Backoff,
    NoAnswer,
    TurnView,
    WavOptions,
    mic_conversation,
    session_update,
    stdin_lines,
    wav_conversation,
)


async def _receive(ws: ClientConnection, view: TurnView) -> None:
    async for message in ws:
        if isinstance(message, str):
            view.handle(json.loads(message))


async def _converse(ws: ClientConnection, view: TurnView, args: argparse.Namespace, source: Any) -> None:
    """One connection: receive and send run together; whichever ends first cancels the other."""

    async def send_event(event: dict[str, Any]) -> None:
        await ws.send(json.dumps(event))

    view.new_connection()
    rate_hz = source.rate_hz if isinstance(source, Microphone) else INPUT_RATE_HZ
    await send_event(session_update(rate_hz, push_to_talk=args.push_to_talk))
    receiver = asyncio.create_task(_receive(ws, view), name="receive")
    if isinstance(source, Microphone):
        talk = mic_conversation(ws.send, send_event, view, source, args.ptt_lines)
    else:
        opts = WavOptions(args.push_to_talk, args.block_ms, args.speed, args.tail_ms, args.wait_s)
        talk = wav_conversation(ws.send, send_event, view, source, opts)
    sender = asyncio.create_task(talk, name="send")
    try:
        done, _ = await asyncio.wait([receiver, sender], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiver, sender):
            task.cancel()
        for task in (receiver, sender):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for task in done:
        task.result()  # re-raise ConnectionClosed etc. for the reconnect loop
    if receiver in done:  # the server closed the connection cleanly: reconnect like after any loss
        raise ConnectionClosed(None, None)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def run(args: argparse.Namespace) -> int:
    view = TurnView(show_state=not args.quiet)
    source: Any
    if args.wav:
        source = load_wav_pcm16(args.wav)
    else:
        source = Microphone(args.device, args.block_ms)
        try:
            source.open(asyncio.get_running_loop())
        except NoMicrophone as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        args.ptt_lines = stdin_lines(asyncio.get_running_loop()) if args.push_to_talk else None
    backoff = Backoff(initial_s=args.reconnect_initial_s, max_s=args.reconnect_max_s)
    failures = 0
    try:
        while True:
            try:
                async with connect(args.url, additional_headers=_headers(args.token), max_size=2**24) as ws:
                    backoff.reset()
                    failures = 0
                    await _converse(ws, view, args, source)
                    return 0  # only the --wav conversation ends by itself
            except NoAnswer as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except InvalidURI as e:
                print(f"error: {e}; expected e.g. ws://127.0.0.1:8765/v1/realtime", file=sys.stderr)
                return 2
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as e:
                failures += 1
                if args.max_retries >= 0 and failures > args.max_retries:
                    print(f"error: cannot reach the server at {args.url} ({e}); is it running?", file=sys.stderr)
                    return 1
                delay_s = backoff.next_delay_s()
                print(f"[server unavailable ({type(e).__name__}: {e}); retrying in {delay_s:.1f} s]", file=sys.stderr)
                await asyncio.sleep(delay_s)
    finally:
        if isinstance(source, Microphone):
            source.close()
            if source.dropped_blocks:
                print(f"[{source.dropped_blocks} microphone blocks dropped while not connected]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.desktop", description="Talk to the voice assistant server.")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="server WebSocket URL")
    p.add_argument("--token", help="server token (server.token), sent as a Bearer header")
    p.add_argument("--wav", metavar="FILE", help="stream this WAV file at real-time speed instead of the microphone")
    p.add_argument("--push-to-talk", action="store_true", help="no server VAD: Enter starts and ends each turn")
    p.add_argument("--device", help="sounddevice input device name or index (default: the system default)")
    p.add_argument("--block-ms", type=int, default=DEFAULT_BLOCK_MS, help="audio block length (default 20 ms)")
    p.add_argument("--speed", type=float, default=1.0, help="--wav pacing: 1.0 = real time")
    p.add_argument("--tail-ms", type=int, default=1500, help="--wav: silence streamed after the file (VAD end)")
    p.add_argument("--wait-s", type=float, default=120.0, help="--wav: longest wait for the answer after the tail")
    p.add_argument("--max-retries", type=int, default=-1, help="reconnect attempts before giving up (-1 = forever)")
    p.add_argument("--reconnect-initial-s", type=float, default=0.5, help="first reconnect delay")
    p.add_argument("--reconnect-max-s", type=float, default=10.0, help="longest reconnect delay")
    p.add_argument("--quiet", action="store_true", help="print only transcripts and answers, no state lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is not None and args.device.isdigit():
        args.device = int(args.device)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
