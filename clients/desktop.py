"""Desktop client: `python -m clients.desktop [--url ws://...] [--token T] [--wav FILE [--out ANSWER.wav]]
[--push-to-talk] [--wake-word NAME] [--duplex | --text]`.

Owns the WebSocket conversation of one desktop user: captures the microphone with sounddevice (16 kHz mono PCM16 in
small blocks) or streams a WAV file at real-time speed, sends it as binary frames (our protocol extension), prints
the user's transcript and the answer as it streams (`clients.common.TurnView`), plays the spoken answer as it
streams (`clients.playback`), and reconnects with exponential backoff when the server goes away.

Spoken answers: half duplex by default (the microphone pauses while the assistant speaks; Enter interrupts it);
`--duplex` keeps the microphone open with echo cancellation, so talking over the answer interrupts it (the server
hears you, not the answer). Either way the server is told how much of the answer was heard
(`conversation.item.truncate`). `--text` asks for text answers. With `--wav` it exits after the answer to the file's
last turn (exit code 0); `--out ANSWER.wav` writes that answer's audio instead of playing it.
`--wake-word alexa` makes it hands-free: the server hears only speech after the wake word (and, for
`--follow-up-ms` after each answer, speech without it). Shared plumbing: `clients.cli`, `clients.common`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from clients.cli import (
    ClientAudio,
    Reconnects,
    add_audio_arguments,
    conversation,
    open_client_audio,
    run_main,
    run_until_either_ends,
)
from clients.common import NoAnswer, SendEvent, TurnView
from clients.playback import NoAnswerAudio


async def _receive(ws: ClientConnection, view: TurnView, audio: ClientAudio, send_event: SendEvent) -> None:
    async for message in ws:
        if isinstance(message, str):
            event = json.loads(message)
            view.handle(event)
            for reply in audio.handle(event):  # barge-in: tell the server what was heard
                await send_event(reply)


async def _converse(ws: ClientConnection, view: TurnView, args: argparse.Namespace, audio: ClientAudio) -> None:
    """One connection: receive and send run together; whichever ends first cancels the other."""

    async def send_event(event: dict[str, Any]) -> None:
        await ws.send(json.dumps(event))

    view.new_connection()
    audio.new_connection()
    await send_event(audio.session_update(args))
    # Re-raises ConnectionClosed etc. for the reconnect loop.
    receive = _receive(ws, view, audio, send_event)
    if await run_until_either_ends(receive, conversation(ws.send, send_event, view, audio, args)):
        raise ConnectionClosed(None, None)  # the server closed the connection cleanly: reconnect like after any loss


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def run(args: argparse.Namespace) -> int:
    view = TurnView(show_state=not args.quiet)
    audio = open_client_audio(args, args.device)
    if audio is None:
        return 2
    reconnects = Reconnects.from_args(args)
    try:
        while True:
            try:
                async with connect(args.url, additional_headers=_headers(args.token), max_size=2**24) as ws:
                    reconnects.connected()
                    await _converse(ws, view, args, audio)
                audio.finish(args.out)
                return 0  # only the --wav conversation ends by itself
            except (NoAnswer, NoAnswerAudio) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except InvalidURI as e:
                print(f"error: {e}; expected e.g. ws://127.0.0.1:8765/v1/realtime", file=sys.stderr)
                return 2
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as e:
                if not await reconnects.wait_or_give_up("server", args.url, e, f"{type(e).__name__}: {e}"):
                    return 1
    finally:
        audio.close()


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
