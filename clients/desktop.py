"""Desktop client: `python -m clients.desktop [--url ws://...] [--token T] [--wav FILE] [--push-to-talk]
[--wake-word NAME]`.

Owns the WebSocket conversation of one desktop user: captures the microphone with sounddevice (16 kHz mono PCM16 in
small blocks) or streams a WAV file at real-time speed, sends it as binary frames (our protocol extension), prints
the user's transcript and the answer as it streams (`clients.common.TurnView`), and reconnects with exponential
backoff when the server goes away. With `--wav` it exits after the answer to the file's last turn (exit code 0).
`--wake-word alexa` makes it hands-free: the server hears only speech after the wake word (and, for `--follow-up-ms`
after each answer, speech without it). The audio sources are in `clients.audio_source`, the conversation loops in
`clients.common`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from clients.audio_source import Microphone
from clients.common import (
    AudioSource,
    NoAnswer,
    Reconnects,
    TurnView,
    add_audio_arguments,
    conversation,
    input_rate_hz,
    open_audio_source,
    run_main,
    run_until_either_ends,
    session_update,
)


async def _receive(ws: ClientConnection, view: TurnView) -> None:
    async for message in ws:
        if isinstance(message, str):
            view.handle(json.loads(message))


async def _converse(ws: ClientConnection, view: TurnView, args: argparse.Namespace, source: AudioSource) -> None:
    """One connection: receive and send run together; whichever ends first cancels the other."""

    async def send_event(event: dict[str, Any]) -> None:
        await ws.send(json.dumps(event))

    view.new_connection()
    await send_event(session_update(input_rate_hz(source), args.push_to_talk, args.wake_word, args.follow_up_ms))
    # Re-raises ConnectionClosed etc. for the reconnect loop.
    if await run_until_either_ends(_receive(ws, view), conversation(ws.send, send_event, view, source, args)):
        raise ConnectionClosed(None, None)  # the server closed the connection cleanly: reconnect like after any loss


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def run(args: argparse.Namespace) -> int:
    view = TurnView(show_state=not args.quiet)
    source = open_audio_source(args, args.device)
    if source is None:
        return 2
    reconnects = Reconnects.from_args(args)
    try:
        while True:
            try:
                async with connect(args.url, additional_headers=_headers(args.token), max_size=2**24) as ws:
                    reconnects.connected()
                    await _converse(ws, view, args, source)
                    return 0  # only the --wav conversation ends by itself
            except NoAnswer as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except InvalidURI as e:
                print(f"error: {e}; expected e.g. ws://127.0.0.1:8765/v1/realtime", file=sys.stderr)
                return 2
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as e:
                if not await reconnects.wait_or_give_up("server", args.url, e, f"{type(e).__name__}: {e}"):
                    return 1
    finally:
        if isinstance(source, Microphone):
            source.close()
            if source.dropped_blocks:
                print(f"[{source.dropped_blocks} microphone blocks dropped while not connected]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.desktop", description="Talk to the voice assistant server.")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="server WebSocket URL")
    p.add_argument("--token", help="server token (server.token), sent as a Bearer header")
    add_audio_arguments(p, device_flag="--device")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
