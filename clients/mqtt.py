"""MQTT device client (a smart-speaker stand-in): `python -m clients.mqtt --broker mqtt://HOST:PORT --device ID`.

Owns one device's side of the MQTT bridge protocol (DESIGN.md): PCM16 16 kHz chunks to `<prefix>/<device>/audio`,
JSON client events to `<prefix>/<device>/control`, server events (same JSON as the WebSocket) read from
`<prefix>/<device>/events`. Audio comes from the microphone or `--wav FILE` (streamed at real time); the answer is
printed as it streams. Reconnects with backoff when the broker goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

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


async def _receive(client: aiomqtt.Client, view: TurnView) -> None:
    async for message in client.messages:
        payload = message.payload
        if isinstance(payload, bytes | bytearray):
            try:
                view.handle(json.loads(payload))
            except ValueError:
                print(f"[ignored a non-JSON message on {message.topic.value}]", file=sys.stderr)


async def _converse(client: aiomqtt.Client, view: TurnView, args: argparse.Namespace, source: Any) -> None:
    topic = f"{args.prefix}/{args.device}"

    async def send_event(event: dict[str, Any]) -> None:
        await client.publish(f"{topic}/control", json.dumps(event), qos=CONTROL_QOS)

    async def send_audio(chunk: bytes) -> None:
        await client.publish(f"{topic}/audio", chunk, qos=AUDIO_QOS)

    await client.subscribe(f"{topic}/events", qos=1)
    view.new_connection()
    rate_hz = source.rate_hz if isinstance(source, Microphone) else INPUT_RATE_HZ
    if args.reset:
        await send_event({"type": "conversation.reset"})
    await send_event(session_update(rate_hz, push_to_talk=args.push_to_talk))
    receiver = asyncio.create_task(_receive(client, view), name="receive")
    if isinstance(source, Microphone):
        talk = mic_conversation(send_audio, send_event, view, source, args.ptt_lines)
    else:
        opts = WavOptions(args.push_to_talk, args.block_ms, args.speed, args.tail_ms, args.wait_s)
        talk = wav_conversation(send_audio, send_event, view, source, opts)
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
        task.result()  # re-raise MqttError for the reconnect loop
    if receiver in done:
        raise aiomqtt.MqttError("the broker closed the connection")


async def run(args: argparse.Namespace) -> int:
    try:
        broker = parse_broker_url(args.broker)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    view = TurnView(show_state=not args.quiet)
    source: Any
    if args.wav:
        source = load_wav_pcm16(args.wav)
    else:
        source = Microphone(args.input_device, args.block_ms)
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
                    backoff.reset()
                    failures = 0
                    await _converse(client, view, args, source)
                    return 0  # only the --wav conversation ends by itself
            except NoAnswer as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except aiomqtt.MqttError as e:
                failures += 1
                if args.max_retries >= 0 and failures > args.max_retries:
                    print(f"error: cannot reach the broker at {args.broker} ({e}); is it running?", file=sys.stderr)
                    return 1
                delay_s = backoff.next_delay_s()
                print(f"[broker unavailable ({e}); retrying in {delay_s:.1f} s]", file=sys.stderr)
                await asyncio.sleep(delay_s)
    finally:
        if isinstance(source, Microphone):
            source.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.mqtt", description="A smart-speaker stand-in over MQTT.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://[user:pass@]HOST[:PORT] or mqtts://")
    p.add_argument("--device", required=True, help="device id: one assistant session per device")
    p.add_argument("--prefix", default="assistant", help="topic prefix (mqtt.topic_prefix of the server)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password")
    p.add_argument("--tls", action="store_true", help="TLS to the broker (implied by mqtts://)")
    p.add_argument("--ca-file", help="CA bundle for the broker certificate")
    p.add_argument("--wav", metavar="FILE", help="stream this WAV file at real-time speed instead of the microphone")
    p.add_argument("--push-to-talk", action="store_true", help="no server VAD: Enter starts and ends each turn")
    p.add_argument("--reset", action="store_true", help="start a fresh conversation (conversation.reset)")
    p.add_argument("--input-device", help="sounddevice input device name or index")
    p.add_argument("--block-ms", type=int, default=DEFAULT_BLOCK_MS, help="audio chunk length (default 20 ms)")
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
    if args.input_device is not None and args.input_device.isdigit():
        args.input_device = int(args.input_device)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
