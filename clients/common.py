"""Protocol helpers shared by the thin clients (desktop, MQTT device): no torch, no server imports.

Owns: the client events our clients send (`session.update` with the 16 kHz input-rate extension, push-to-talk
commit), the `TurnView` that turns server events into what a person reads (state, transcript, streamed answer,
per-turn latency), the two conversation loops (a WAV file streamed like a microphone; the live microphone with
optional push-to-talk) written against `send_audio`/`send_event` callables so the WebSocket and MQTT clients share
them, the reconnect backoff schedule, and the command-line plumbing both clients have in common (audio/reconnect
options, opening the audio source, running one connection's receive and send loops, counting failed connections).
Audio sources live in `clients.audio_source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TextIO

from clients.audio_source import (
    DEFAULT_BLOCK_MS,
    INPUT_RATE_HZ,
    Microphone,
    NoMicrophone,
    blocks,
    load_wav_pcm16,
    paced,
    silence,
)

SendAudio = Callable[[bytes], Awaitable[None]]
SendEvent = Callable[[dict[str, Any]], Awaitable[None]]


# ----------------------------------------------------------------------------------------------- client events
WAKE_WORD_OFF = "off"  # `--wake-word off`: no wake word, even when the server's default has one


def session_update(
    input_rate_hz: int = INPUT_RATE_HZ,
    push_to_talk: bool = False,
    wake_word: str | None = None,
    follow_up_ms: int | None = None,
) -> dict[str, Any]:
    """The first event our clients send: raw PCM16 at `input_rate_hz` (extension) and the turn-taking mode.

    Push-to-talk switches server VAD off (`turn_detection: null`): the client commits and asks for the answer.
    `wake_word` (extension): only speech after it is heard (`WAKE_WORD_OFF` turns the server's default off; None
    leaves the server's default); `follow_up_ms` is how long after an answer speech needs no wake word."""
    session: dict[str, Any] = {"type": "realtime", "output_modalities": ["text"], "input_sample_rate": input_rate_hz}
    audio_input: dict[str, Any] = {}
    if push_to_talk:
        audio_input["turn_detection"] = None
    if wake_word == WAKE_WORD_OFF:
        audio_input["wake_word"] = None
    elif wake_word is not None:
        audio_input["wake_word"] = {"name": wake_word}
        if follow_up_ms is not None:
            audio_input["wake_word"]["follow_up_ms"] = follow_up_ms
    if audio_input:
        session["audio"] = {"input": audio_input}
    return {"type": "session.update", "session": session}


def push_to_talk_end() -> list[dict[str, Any]]:
    """Events that end a push-to-talk turn: the buffer becomes the user's turn, then the answer is requested."""
    return [{"type": "input_audio_buffer.commit"}, {"type": "response.create"}]


# ----------------------------------------------------------------------------------------------- reconnects
@dataclass
class Backoff:
    """Exponential reconnect delays: initial_s, 2x, 4x ... capped at max_s; `reset()` after a good connection."""

    initial_s: float = 0.5
    max_s: float = 10.0
    attempt: int = 0

    def next_delay_s(self) -> float:
        delay_s = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return delay_s

    def reset(self) -> None:
        self.attempt = 0


# ----------------------------------------------------------------------------------------------- rendering
@dataclass
class TurnView:
    """Sans-I/O view of a conversation: feed server events, it writes lines a person reads and keeps counts.

    Output: `you: <transcript>` when the server has one, `assistant: <answer streamed as it arrives>`, state changes
    (`[listening]`, `[speech]`, `[thinking]`) and each answer's latency, measured from the end of the user's speech
    (VAD `speech_stopped`, or the push-to-talk release) to the first text delta."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    show_state: bool = True
    clock: Callable[[], float] = time.monotonic
    state: str = "connecting"
    responses_done: int = 0
    answers: list[str] = field(default_factory=list)
    transcripts: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    active_responses: int = 0
    wake_words: int = 0  # wake_word_detected events seen
    _turn_end_s: float | None = None
    _first_delta_seen: bool = False
    _line_open: bool = False
    _answer: str = ""

    def new_connection(self) -> None:
        """A (re)connection: responses in flight on the old one will never send their response.done to us."""
        self._close_line()
        self.active_responses = 0
        self._turn_end_s = None
        self._first_delta_seen = False
        self.state = "connecting"

    def mark_turn_end(self) -> None:
        """The user's turn ended on the client side (push-to-talk release); latency counts from here."""
        self._turn_end_s = self.clock()
        self._set_state("thinking")

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        if kind in ("session.created", "session.updated"):
            self._set_state("listening")
        elif kind == "input_audio_buffer.wake_word_detected":
            self.wake_words += 1
            if self.show_state:
                self._write_line(f"[wake word: {event.get('name', '')}]")
        elif kind == "input_audio_buffer.speech_started":
            self._set_state("speech")
        elif kind == "input_audio_buffer.speech_stopped":
            self._turn_end_s = self.clock()
            self._set_state("thinking")
        elif kind == "conversation.item.input_audio_transcription.completed":
            transcript = str(event.get("transcript", "")).strip()
            self.transcripts.append(transcript)
            self._write_line(f"you: {transcript}")
        elif kind == "response.created":
            self.active_responses += 1
            self._first_delta_seen = False
            self._answer = ""
        elif kind in ("response.output_text.delta", "response.text.delta"):
            self._on_delta(str(event.get("delta", "")))
        elif kind == "response.done":
            self._on_done(event.get("response") or {})
        elif kind == "error":
            err = event.get("error") or {}
            self.errors.append(err)
            self._write_line(f"[error {err.get('code') or err.get('type')}: {err.get('message', '')}]")

    def _on_delta(self, delta: str) -> None:
        if not self._first_delta_seen:
            self._first_delta_seen = True
            self._close_line()
            self.out.write("assistant: ")
            self._line_open = True
            if self._turn_end_s is not None:
                self.latencies_ms.append((self.clock() - self._turn_end_s) * 1000.0)
        self._answer += delta
        self.out.write(delta)
        self.out.flush()

    def _on_done(self, response: dict[str, Any]) -> None:
        self.active_responses = max(0, self.active_responses - 1)
        self.responses_done += 1
        status = response.get("status", "completed")
        self.answers.append(self._answer.strip())
        self._close_line()
        details = [status] if status != "completed" else []
        if self._first_delta_seen and self.latencies_ms and self._turn_end_s is not None:
            details.append(f"first text after {self.latencies_ms[-1]:.0f} ms")
        timings = response.get("timings_ms") or {}
        if "total" in timings:
            details.append(f"server {float(timings['total']):.0f} ms")
        if self.show_state and details:
            self._write_line(f"[{', '.join(details)}]")
        self._turn_end_s = None
        self._set_state("listening")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.show_state:
                self._write_line(f"[{state}]")

    def _write_line(self, text: str) -> None:
        self._close_line()
        self.out.write(text + "\n")
        self.out.flush()

    def _close_line(self) -> None:
        if self._line_open:
            self.out.write("\n")
            self._line_open = False


# ----------------------------------------------------------------------------------------------- conversations
class NoAnswer(RuntimeError):
    """The server took the audio but no answer finished in time (e.g. the VAD heard no speech in the file)."""


@dataclass(frozen=True)
class WavOptions:
    push_to_talk: bool = False
    block_ms: int = 20
    speed: float = 1.0  # 1.0 = real time
    tail_ms: int = 1500  # silence streamed after the file so the server VAD sees the end of the turn
    wait_s: float = 120.0  # longest wait for the answer after the tail


async def wav_conversation(
    send_audio: SendAudio, send_event: SendEvent, view: TurnView, pcm: bytes, opts: WavOptions
) -> None:
    """Stream `pcm` at real time, then (VAD) keep streaming silence like an open mic until every answer is done,
    or (push-to-talk) commit and ask for the answer. Returns when the last answer is done; raises NoAnswer."""
    done_before = view.responses_done
    async for chunk in paced(blocks(pcm, opts.block_ms), speed=opts.speed):
        await send_audio(chunk)
    if opts.push_to_talk:
        for event in push_to_talk_end():
            await send_event(event)
        view.mark_turn_end()
    quiet = silence(opts.block_ms)
    tail_ms = 0
    while True:
        answered = view.responses_done > done_before and view.active_responses == 0
        if answered and (opts.push_to_talk or (tail_ms >= opts.tail_ms and view.state == "listening")):
            return
        if tail_ms >= opts.tail_ms + opts.wait_s * 1000:
            raise NoAnswer(f"no answer within {opts.wait_s:.0f} s after the end of the audio (state {view.state})")
        if not opts.push_to_talk:
            await send_audio(quiet)
        await asyncio.sleep(opts.block_ms / 1000 / opts.speed)
        tail_ms += opts.block_ms


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines typed on stdin (push-to-talk presses), read on a daemon thread so the event loop never blocks."""
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)

    threading.Thread(target=read, name="stdin-ptt", daemon=True).start()
    return lines


async def mic_conversation(
    send_audio: SendAudio, send_event: SendEvent, view: TurnView, mic: Microphone, ptt: asyncio.Queue[str] | None
) -> None:
    """Forward microphone blocks forever; with push-to-talk (`ptt` = Enter presses) only between two presses."""
    mic.drain()  # audio captured while disconnected belongs to no turn
    talking = ptt is None
    if ptt is not None:
        print("push-to-talk: press Enter to start talking, Enter again to send", file=sys.stderr)
    while True:
        getters = [asyncio.ensure_future(mic.queue.get())]
        if ptt is not None:
            getters.append(asyncio.ensure_future(ptt.get()))
        try:
            done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in getters:  # a getter that did not complete took nothing off its queue
                if not task.done():
                    task.cancel()
        for task in done:
            if task is getters[0]:
                if talking:
                    await send_audio(task.result())
            elif not talking:  # Enter: start a turn on a fresh buffer
                talking = True
                await send_event({"type": "input_audio_buffer.clear"})
                print("[talking... press Enter to send]", file=sys.stderr)
            else:  # Enter again: the turn is over, ask for the answer
                talking = False
                for event in push_to_talk_end():
                    await send_event(event)
                view.mark_turn_end()


# ----------------------------------------------------------------------------------------------- command line
def _input_device(value: str) -> int | str:
    """sounddevice takes an input device by index (a number) or by name."""
    return int(value) if value.isdigit() else value


def add_audio_arguments(p: argparse.ArgumentParser, device_flag: str) -> None:
    """The audio, pacing, reconnect and output options both clients share. `device_flag` names the sounddevice
    input option: `--device` on the desktop, `--input-device` on MQTT (where `--device` is the device id)."""
    p.add_argument("--wav", metavar="FILE", help="stream this WAV file at real-time speed instead of the microphone")
    p.add_argument("--push-to-talk", action="store_true", help="no server VAD: Enter starts and ends each turn")
    p.add_argument(
        "--wake-word",
        metavar="NAME",
        help="hands-free: only speech after this wake word is heard (alexa, hey_mycroft, okay_nabu, hey_jarvis; "
        f"'{WAKE_WORD_OFF}' turns a server default off); default: the server's setting",
    )
    p.add_argument(
        "--follow-up-ms",
        type=int,
        help="with --wake-word: after an answer, speech within this many ms needs no wake word",
    )
    p.add_argument(
        device_flag, type=_input_device, help="sounddevice input device name or index (default: the system default)"
    )
    p.add_argument("--block-ms", type=int, default=DEFAULT_BLOCK_MS, help="audio block length (default 20 ms)")
    p.add_argument("--speed", type=float, default=1.0, help="--wav pacing: 1.0 = real time")
    p.add_argument("--tail-ms", type=int, default=1500, help="--wav: silence streamed after the file (VAD end)")
    p.add_argument("--wait-s", type=float, default=120.0, help="--wav: longest wait for the answer after the tail")
    p.add_argument("--max-retries", type=int, default=-1, help="reconnect attempts before giving up (-1 = forever)")
    p.add_argument("--reconnect-initial-s", type=float, default=0.5, help="first reconnect delay")
    p.add_argument("--reconnect-max-s", type=float, default=10.0, help="longest reconnect delay")
    p.add_argument("--quiet", action="store_true", help="print only transcripts and answers, no state lines")


# ----------------------------------------------------------------------------------------------- running a client
def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    argv: list[str] | None,
) -> int:
    """A client's `main`: parse `argv`, run the client's `run(args)` to its exit code; Ctrl-C exits with 130."""
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


AudioSource = bytes | Microphone  # the --wav file's PCM16, or the live microphone


def open_audio_source(args: argparse.Namespace, input_device: int | str | None) -> AudioSource | None:
    """The --wav file's PCM16, or the opened microphone (then `args.ptt_lines` holds the Enter presses for
    push-to-talk). None, after saying why on stderr, when no microphone can be opened."""
    if args.wav:
        return load_wav_pcm16(args.wav)
    mic = Microphone(input_device, args.block_ms)
    try:
        mic.open(asyncio.get_running_loop())
    except NoMicrophone as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    args.ptt_lines = stdin_lines(asyncio.get_running_loop()) if args.push_to_talk else None
    return mic


def input_rate_hz(source: AudioSource) -> int:
    """The rate the source's audio is sent at (the microphone may only offer another rate than 16 kHz)."""
    return source.rate_hz if isinstance(source, Microphone) else INPUT_RATE_HZ


def conversation(
    send_audio: SendAudio, send_event: SendEvent, view: TurnView, source: AudioSource, args: argparse.Namespace
) -> Coroutine[Any, Any, None]:
    """The send loop of one connection: the microphone forever, or the --wav file until its answer is done."""
    if isinstance(source, Microphone):
        return mic_conversation(send_audio, send_event, view, source, args.ptt_lines)
    opts = WavOptions(args.push_to_talk, args.block_ms, args.speed, args.tail_ms, args.wait_s)
    return wav_conversation(send_audio, send_event, view, source, opts)


async def run_until_either_ends(receive: Coroutine[Any, Any, None], send: Coroutine[Any, Any, None]) -> bool:
    """One connection: the receive and send loops run together; whichever ends first cancels the other.

    Re-raises what ended a loop (a lost connection, for the caller's reconnect loop; NoAnswer). Returns True when
    the receive loop ended by itself (the peer closed the connection cleanly), False when the send loop finished."""
    receiver = asyncio.create_task(receive, name="receive")
    sender = asyncio.create_task(send, name="send")
    try:
        done, _ = await asyncio.wait([receiver, sender], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiver, sender):
            task.cancel()
        for task in (receiver, sender):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for task in done:
        task.result()
    return receiver in done


@dataclass
class Reconnects:
    """Failed connection attempts in a row: the backoff between them and the `--max-retries` bound."""

    backoff: Backoff
    max_retries: int  # -1 = forever
    failures: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reconnects:
        return cls(Backoff(initial_s=args.reconnect_initial_s, max_s=args.reconnect_max_s), args.max_retries)

    def connected(self) -> None:
        self.backoff.reset()
        self.failures = 0

    async def wait_or_give_up(self, peer: str, address: str, error: BaseException, detail: str) -> bool:
        """After a failed or lost connection to the `peer` ("server", "broker"): False, after saying so on stderr,
        when the retries are used up; otherwise waits the next backoff delay (said on stderr) and returns True."""
        self.failures += 1
        if self.max_retries >= 0 and self.failures > self.max_retries:
            print(f"error: cannot reach the {peer} at {address} ({error}); is it running?", file=sys.stderr)
            return False
        delay_s = self.backoff.next_delay_s()
        print(f"[{peer} unavailable ({detail}); retrying in {delay_s:.1f} s]", file=sys.stderr)
        await asyncio.sleep(delay_s)
        return True
