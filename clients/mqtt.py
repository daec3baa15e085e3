"""MQTT device client (a smart-speaker stand-in): `python -m clients.mqtt --broker mqtt://HOST:PORT --device ID
[--wav FILE [--out ANSWER.wav]] [--output-rate HZ] [--text]`.

Owns one device's side of the MQTT bridge protocol (README, PROTOCOL.md): PCM16 16 kHz chunks to
`<prefix>/<device>/audio`, JSON client events to `<prefix>/<device>/control`, server events (the WebSocket's JSON)
read from `<prefix>/<device>/events`, and the spoken answer as raw PCM16 from `<prefix>/<device>/speech` (each
answer's start is announced on the events topic by `response.output_audio.started` with its rate, its end by
`response.output_audio.done`). Audio comes from the microphone or `--wav FILE` (streamed at real time); the answer
is printed as it streams and played (or written to `--out FILE`); `--output-rate` asks for the answer audio at the
device's own rate. Reconnects with backoff when the broker goes away. `--wake-word NAME` sets this device's wake word
(the server's default for devices is `mqtt.wake_word`; `--wake-word off` turns it off).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

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

# Audio is a live stream: QoS 0 (a late chunk is worth nothing after a reconnect). Control events must arrive: QoS 1.
AUDIO_QOS = 0
CONTROL_QOS = 1


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_broker_url(url: str) -> Broker:
    """`mqtt://[user:pass@]host[:1883]` or `mqtts://...[:8883]`; raises ValueError saying what was expected."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = parts.scheme == "mqtts"
    return Broker(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _tls_context(args: argparse.Namespace, broker: Broker) -> ssl.SSLContext | None:
    if not (broker.tls or args.tls):
        return None
    return ssl.create_default_context(cafile=args.ca_file or None)


async def _receive(
    client: aiomqtt.Client, topic: str, view: TurnView, audio: ClientAudio, send_event: SendEvent
) -> None:
    async for message in client.messages:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            continue
        if message.topic.value == f"{topic}/speech":
            if audio.spoken is not None:
                audio.spoken.raw_audio(bytes(payload))
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            print(f"[ignored a non-JSON message on {message.topic.value}]", file=sys.stderr)
            continue
        view.handle(event)
        for reply in audio.handle(event):  # barge-in: tell the server what was heard
            await send_event(reply)


async def _converse(client: aiomqtt.Client, view: TurnView, args: argparse.Namespace, audio: ClientAudio) -> None:
    topic = f"{args.prefix}/{args.device}"

    async def send_event(event: dict[str, Any]) -> None:
        await client.publish(f"{topic}/control", json.dumps(event), qos=CONTROL_QOS)

    async def send_audio(chunk: bytes) -> None:
        await client.publish(f"{topic}/audio", chunk, qos=AUDIO_QOS)

    subscriptions = [(f"{topic}/events", 1)] + ([(f"{topic}/speech", 1)] if audio.spoken is not None else [])
    await client.subscribe(subscriptions)
    view.new_connection()
    audio.new_connection()
    if args.reset:
        await send_event({"type": "conversation.reset"})
    await send_event(audio.session_update(args, args.output_rate))
    # Re-raises MqttError for the reconnect loop.
    receive = _receive(client, topic, view, audio, send_event)
    if await run_until_either_ends(receive, conversation(send_audio, send_event, view, audio, args)):
        raise aiomqtt.MqttError("the broker closed the connection")


async def run(args: argparse.Namespace) -> int:
    try:
        broker = parse_broker_url(args.broker)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    view = TurnView(show_state=not args.quiet)
    audio = open_client_audio(args, args.input_device)
    if audio is None:
        return 2
    reconnects = Reconnects.from_args(args)
    try:
        while True:
            client = aiomqtt.Client(
                broker.host,
                broker.port,
                username=args.username or broker.username,
                password=args.password or broker.password,
                identifier=f"{args.device}-{uuid.uuid4().hex[:8]}",
                tls_context=_tls_context(args, broker),
            )
            try:
                async with client:
                    reconnects.connected()
                    await _converse(client, view, args, audio)
                audio.finish(args.out)
                return 0  # only the --wav conversation ends by itself
            except (NoAnswer, NoAnswerAudio) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except aiomqtt.MqttError as e:
                if not await reconnects.wait_or_give_up("broker", args.broker, e, str(e)):
                    return 1
    finally:
        audio.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.mqtt", description="A smart-speaker stand-in over MQTT.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://[user:pass@]HOST[:PORT] or mqtts://")
    p.add_argument("--device", required=True, help="device id: one assistant session per device")
    p.add_argument("--prefix", default="assistant", help="topic prefix (mqtt.topic_prefix of the server)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password")
    p.add_argument("--tls", action="store_true", help="TLS to the broker (implied by mqtts://)")
    p.add_argument("--ca-file", help="CA bundle for the broker certificate")
    p.add_argument("--reset", action="store_true", help="start a fresh conversation (conversation.reset)")
    p.add_argument(
        "--output-rate",
        type=int,
        metavar="HZ",
        help="the device's output rate: the spoken answer comes at this rate (8000-48000; default: the server's 24000)",
    )
    add_audio_arguments(p, device_flag="--input-device")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
