"""The command-line plumbing both thin clients (desktop, MQTT device) share: their audio, answer, pacing and
reconnect options, opening the audio source and the answers' output (`ClientAudio`: the microphone or a --wav file;
the speaker, the --duplex stream, a --out file, or text), running one connection's receive and send loops, and
counting failed connections with a backoff. The protocol side is `clients.common`, the answers' audio
`clients.playback`, the sound card `clients.audio_source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from clients.audio_source import (
    DEFAULT_BLOCK_MS,
    INPUT_RATE_HZ,
    DuplexAudio,
    Microphone,
    NoMicrophone,
    NoSpeaker,
    Speaker,
    load_wav_pcm16,
)
from clients.common import (
    WAKE_WORD_OFF,
    MicOptions,
    SendAudio,
    SendEvent,
    TurnView,
    WavOptions,
    mic_conversation,
    session_update,
    stdin_lines,
    wav_conversation,
)
from clients.playback import AnswerRecorder, NoAnswerAudio, Playout, SpokenAnswers


# ----------------------------------------------------------------------------------------------- options
def _sound_device(value: str) -> int | str:
    """sounddevice takes a device by index (a number) or by name."""
    return int(value) if value.isdigit() else value


def add_audio_arguments(p: argparse.ArgumentParser, device_flag: str) -> None:
    """The audio, answer, pacing, reconnect and output options both clients share. `device_flag` names the
    sounddevice input option: `--device` on the desktop, `--input-device` on MQTT (where `--device` is the id)."""
    p.add_argument("--wav", metavar="FILE", help="stream this WAV file at real-time speed instead of the microphone")
    p.add_argument("--out", metavar="FILE", help="with --wav: write the spoken answer to this WAV file (not played)")
    p.add_argument("--text", action="store_true", help="text answers only (nothing is spoken)")
    p.add_argument(
        "--duplex",
        action="store_true",
        help="full duplex: keep the microphone open while the answer plays, with echo cancellation (WebRTC AEC3), "
        "so you can talk over it; default: half duplex (the microphone pauses while the assistant speaks)",
    )
    p.add_argument("--push-to-talk", action="store_true", help="no server VAD: Enter starts and ends each turn")
    p.add_argument(
        "--language",
        metavar="CODE",
        help="the language you speak, as an ISO-639-1 code (en, de, zh, ...): the recogniser is told it instead of "
        "detecting it each turn (English goes to the faster English-only model); default: detected",
    )
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
        device_flag, type=_sound_device, help="sounddevice input device name or index (default: the system default)"
    )
    p.add_argument(
        "--output-device", type=_sound_device, help="sounddevice output device name or index (default: the system's)"
    )
    p.add_argument("--block-ms", type=int, default=DEFAULT_BLOCK_MS, help="audio block length (default 20 ms)")
    p.add_argument("--speed", type=float, default=1.0, help="--wav pacing: 1.0 = real time")
    p.add_argument("--tail-ms", type=int, default=1500, help="--wav: silence streamed after the file (VAD end)")
    p.add_argument("--wait-s", type=float, default=120.0, help="--wav: longest wait for the answer after the tail")
    p.add_argument("--max-retries", type=int, default=-1, help="reconnect attempts before giving up (-1 = forever)")
    p.add_argument("--reconnect-initial-s", type=float, default=0.5, help="first reconnect delay")
    p.add_argument("--reconnect-max-s", type=float, default=10.0, help="longest reconnect delay")
    p.add_argument("--quiet", action="store_true", help="print only transcripts and answers, no state lines")


def option_conflict(args: argparse.Namespace) -> str | None:
    """Options that cannot go together, said plainly (None when they can)."""
    if args.out and not args.wav:
        return "--out writes the answer to a question from --wav FILE; add --wav (or leave out --out to hear it)"
    if args.out and args.text:
        return "--out writes the spoken answer; --text asks for text only: choose one"
    if args.duplex and (args.wav or args.text):
        return "--duplex is for talking over a spoken answer with the live microphone: leave out --wav / --text"
    return None


# ----------------------------------------------------------------------------------------------- running a client
def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    argv: list[str] | None,
) -> int:
    """A client's `main`: parse `argv`, run the client's `run(args)` to its exit code; Ctrl-C exits with 130."""
    args = parser.parse_args(argv)
    conflict = option_conflict(args)
    if conflict:
        parser.error(conflict)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


AudioSource = bytes | Microphone  # the --wav file's PCM16, or the live microphone


@dataclass
class ClientAudio:
    """What a client listens with and answers through: the question's audio (`source`) and the answers' audio
    (`spoken`: played, or recorded for --out; None: text answers)."""

    source: AudioSource
    spoken: SpokenAnswers | None = None
    keys: asyncio.Queue[str] | None = None  # Enter presses (push-to-talk, interrupting the answer)
    speaker: Speaker | None = None
    recorder: AnswerRecorder | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_rate_hz(self) -> int:
        """The rate the source's audio is sent at (a microphone may only offer another rate than 16 kHz)."""
        return self.source.rate_hz if isinstance(self.source, Microphone) else INPUT_RATE_HZ

    def session_update(self, args: argparse.Namespace, output_rate_hz: int | None = None) -> dict[str, Any]:
        return session_update(
            self.input_rate_hz,
            args.push_to_talk,
            args.wake_word,
            args.follow_up_ms,
            text_only=self.spoken is None,
            output_rate_hz=output_rate_hz,
            language=args.language,
        )

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """A server event for the answers' audio; returns the client events it calls for (truncate on barge-in)."""
        return [] if self.spoken is None else self.spoken.handle(event)

    def new_connection(self) -> None:
        if self.spoken is not None:
            self.spoken.new_connection()

    def finish(self, out_path: str | None) -> None:
        """After a --wav conversation: write the answer's audio to `out_path` (NoAnswerAudio when there is none)."""
        if self.recorder is None or out_path is None:
            return
        if self.recorder.audio_ms == 0:
            assert self.spoken is not None
            why = "; ".join(sorted({str(n.get("message") or n.get("code")) for n in self.spoken.no_audio}))
            raise NoAnswerAudio(f"the answer came without audio ({why or 'the server sent none'}); its text is above")
        self.recorder.write(out_path)
        print(f"[answer audio: {self.recorder.audio_ms} ms written to {out_path}]", file=sys.stderr)

    def close(self) -> None:
        if self.speaker is not None:
            self.speaker.close()
        if isinstance(self.source, Microphone):
            self.source.close()
            if self.source.dropped_blocks:
                print(f"[{self.source.dropped_blocks} microphone blocks dropped while not connected]", file=sys.stderr)


def open_client_audio(args: argparse.Namespace, input_device: int | str | None) -> ClientAudio | None:
    """The question's source and the answers' output as the options say. None, after saying why on stderr, when
    the microphone cannot be opened; a missing speaker only means text answers (said on stderr)."""
    loop = asyncio.get_running_loop()
    playout = None if (args.text or args.out) else Playout()
    if args.wav:
        audio = ClientAudio(load_wav_pcm16(args.wav))
    else:
        try:
            if args.duplex:
                assert playout is not None  # --duplex with --text is refused by option_conflict
                mic: Microphone = DuplexAudio(input_device, args.output_device, args.block_ms, playout)
            else:
                mic = Microphone(input_device, args.block_ms)
            mic.open(loop)
        except NoMicrophone as e:
            print(f"error: {e}", file=sys.stderr)
            return None
        audio = ClientAudio(mic)
    if args.out:
        audio.recorder = AnswerRecorder()
        audio.spoken = SpokenAnswers(audio.recorder)
    elif playout is not None:
        if not args.duplex:
            speaker = Speaker(playout, args.output_device)
            try:
                speaker.open()
                audio.speaker = speaker
            except NoSpeaker as e:
                print(f"[{e} Answers are shown as text.]", file=sys.stderr)
                playout = None
        audio.spoken = SpokenAnswers(playout) if playout is not None else None
    live = isinstance(audio.source, Microphone)
    if live and (args.push_to_talk or audio.spoken is not None):
        audio.keys = stdin_lines(loop)
    return audio


def conversation(
    send_audio: SendAudio, send_event: SendEvent, view: TurnView, audio: ClientAudio, args: argparse.Namespace
) -> Coroutine[Any, Any, None]:
    """The send loop of one connection: the microphone forever, or the --wav file until its answer is done."""
    if isinstance(audio.source, Microphone):
        opts = MicOptions(args.push_to_talk, audio.keys, audio.spoken, half_duplex=not args.duplex)
        return mic_conversation(send_audio, send_event, view, audio.source, opts)
    wav = WavOptions(args.push_to_talk, args.block_ms, args.speed, args.tail_ms, args.wait_s)
    return wav_conversation(send_audio, send_event, view, audio.source, wav, audio.spoken)


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
