"""Protocol helpers shared by the thin clients (desktop, MQTT device): no torch, no server imports.

Owns: the client events our clients send (`session.update` with the 16 kHz input-rate extension, text or spoken
answers, push-to-talk commit), the `TurnView` that turns server events into what a person reads (state, transcript,
streamed answer, per-turn latency, why an answer was not spoken), and the two conversation loops (a WAV file
streamed like a microphone; the live microphone with optional push-to-talk, half duplex while the answer plays, and
the interrupt key) written against `send_audio`/`send_event` callables so the WebSocket and MQTT clients share them.
The answer's audio is `clients.playback`; the command-line plumbing `clients.cli`; audio sources
`clients.audio_source`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from clients.audio_source import INPUT_RATE_HZ, Microphone, blocks, paced, silence
from clients.playback import SpokenAnswers

SendAudio = Callable[[bytes], Awaitable[None]]
SendEvent = Callable[[dict[str, Any]], Awaitable[None]]


# ----------------------------------------------------------------------------------------------- client events
WAKE_WORD_OFF = "off"  # `--wake-word off`: no wake word, even when the server's default has one


def session_update(
    input_rate_hz: int = INPUT_RATE_HZ,
    push_to_talk: bool = False,
    wake_word: str | None = None,
    follow_up_ms: int | None = None,
    text_only: bool = False,
    output_rate_hz: int | None = None,
    language: str | None = None,
) -> dict[str, Any]:
    """The first event our clients send: raw PCM16 at `input_rate_hz` (extension) and the turn-taking mode.

    Push-to-talk switches server VAD off (`turn_detection: null`): the client commits and asks for the answer.
    `wake_word` (extension): only speech after it is heard (`WAKE_WORD_OFF` turns the server's default off; None
    leaves the server's default); `follow_up_ms` is how long after an answer speech needs no wake word.
    Answers are spoken when the server has a voice (its default, as OpenAI's); `text_only` asks for text, and
    `output_rate_hz` (extension) for the answer audio at that rate instead of the server's 24 kHz. `language` (an
    ISO-639-1 code, OpenAI's transcription language): the language the user speaks, told to the recogniser."""
    session: dict[str, Any] = {"type": "realtime", "input_sample_rate": input_rate_hz}
    if text_only:
        session["output_modalities"] = ["text"]
    elif output_rate_hz is not None:
        session["output_sample_rate"] = output_rate_hz
    audio_input: dict[str, Any] = {}
    if push_to_talk:
        audio_input["turn_detection"] = None
    if language:
        audio_input["transcription"] = {"model": "whisper-1", "language": language}
    if wake_word == WAKE_WORD_OFF:
        audio_input["wake_word"] = None
    elif wake_word is not None:
        audio_input["wake_word"] = {"name": wake_word}
        if follow_up_ms is not None:
            audio_input["wake_word"]["follow_up_ms"] = follow_up_ms
    if audio_input:
        session["audio"] = {"input": audio_input}
    return {"type": "session.update", "session": session}


TEXT_ANSWERS = {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}}


def push_to_talk_end() -> list[dict[str, Any]]:
    """Events that end a push-to-talk turn: the buffer becomes the user's turn, then the answer is requested."""
    return [{"type": "input_audio_buffer.commit"}, {"type": "response.create"}]


# ----------------------------------------------------------------------------------------------- rendering
# The answer as text: text answers (GA, beta) and the transcript of spoken ones (GA, beta), clause by clause.
TEXT_DELTAS = (
    "response.output_text.delta",
    "response.text.delta",
    "response.output_audio_transcript.delta",
    "response.audio_transcript.delta",
)


@dataclass
class TurnView:
    """Sans-I/O view of a conversation: feed server events, it writes lines a person reads and keeps counts.

    Output: `you: <transcript>` when the server has one, `assistant: <answer streamed as it arrives>` (the text, or
    a spoken answer's transcript), state changes (`[listening]`, `[speech]`, `[thinking]`, `[speaking]` while an
    answer's audio plays: `set_speaking`), each answer's latency, measured from the end of the user's speech (VAD
    `speech_stopped`, or the push-to-talk release) to its first text, and why text was not spoken (`no_audio`)."""

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
    speaking: bool = False  # an answer's audio is playing (told by the client's playback: `set_speaking`)
    _not_spoken: str = ""  # why some of the current answer has no audio (the server's `no_audio` message)
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
        self.speaking = False
        self.state = "connecting"

    def mark_turn_end(self) -> None:
        """The user's turn ended on the client side (push-to-talk release); latency counts from here."""
        self._turn_end_s = self.clock()
        self._set_state("thinking")

    def set_speaking(self, speaking: bool) -> None:
        """The client's playback started or finished; after the answer is done its end means listening again."""
        if speaking != self.speaking:
            self.speaking = speaking
            if speaking:
                self._set_state("speaking")
            elif self.active_responses == 0:
                self._set_state("listening")

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
            self._not_spoken = ""
        elif kind in TEXT_DELTAS:
            self._on_delta(str(event.get("delta", "")))
            if isinstance(event.get("no_audio"), dict) and not self._not_spoken:
                self._not_spoken = str(event["no_audio"].get("message") or event["no_audio"].get("code"))
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
        if self._not_spoken:
            self._write_line(f"[shown as text, not spoken: {self._not_spoken}]")
        self._turn_end_s = None
        self._set_state("speaking" if self.speaking else "listening")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.show_state and not (state == "speaking" and self._line_open):  # the answer's line says it
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
    send_audio: SendAudio,
    send_event: SendEvent,
    view: TurnView,
    pcm: bytes,
    opts: WavOptions,
    spoken: SpokenAnswers | None = None,
) -> None:
    """Stream `pcm` at real time, then (VAD) keep streaming silence like an open mic until every answer is done
    (and, with `spoken`, played), or (push-to-talk) commit and ask for the answer. Returns when the last answer is
    done; raises NoAnswer."""
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
        speaking = spoken is not None and spoken.speaking
        view.set_speaking(speaking)
        answered = view.responses_done > done_before and view.active_responses == 0 and not speaking
        if answered and (opts.push_to_talk or (tail_ms >= opts.tail_ms and view.state == "listening")):
            return
        if tail_ms >= opts.tail_ms + opts.wait_s * 1000:
            raise NoAnswer(f"no answer within {opts.wait_s:.0f} s after the end of the audio (state {view.state})")
        if not opts.push_to_talk:
            await send_audio(quiet)
        await asyncio.sleep(opts.block_ms / 1000 / opts.speed)
        tail_ms += opts.block_ms


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines typed on stdin (Enter presses), read on a daemon thread so the event loop never blocks."""
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)

    threading.Thread(target=read, name="stdin-keys", daemon=True).start()
    return lines


@dataclass
class MicOptions:
    push_to_talk: bool = False
    keys: asyncio.Queue[str] | None = None  # Enter presses: push-to-talk, and interrupting the spoken answer
    spoken: SpokenAnswers | None = None  # the answers' playback (None: text answers)
    half_duplex: bool = True  # the microphone is not sent while the answer plays (no echo cancellation)


async def mic_conversation(
    send_audio: SendAudio, send_event: SendEvent, view: TurnView, mic: Microphone, opts: MicOptions
) -> None:
    """Forward microphone blocks forever; with push-to-talk only between two Enter presses; half duplex: not
    while the answer plays. Enter while the answer plays interrupts it (and, in push-to-talk, starts your turn)."""
    mic.drain()  # audio captured while disconnected belongs to no turn
    talking = not opts.push_to_talk
    spoken = opts.spoken
    if opts.push_to_talk:
        print("push-to-talk: press Enter to start talking, Enter again to send", file=sys.stderr)
    if spoken is not None and opts.keys is not None:
        print("press Enter while the assistant speaks to interrupt it", file=sys.stderr)
    while True:
        getters = [asyncio.ensure_future(mic.queue.get())]
        if opts.keys is not None:
            getters.append(asyncio.ensure_future(opts.keys.get()))
        try:
            done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in getters:  # a getter that did not complete took nothing off its queue
                if not task.done():
                    task.cancel()
        for task in done:
            speaking = spoken is not None and spoken.speaking
            view.set_speaking(speaking)
            if task is getters[0]:
                if talking and not (opts.half_duplex and speaking):
                    await send_audio(task.result())
                continue
            if spoken is not None and speaking:  # Enter over the answer: stop it where the listener is
                for event in spoken.interrupt(view.active_responses > 0):
                    await send_event(event)
                print("[interrupted]", file=sys.stderr)
                if talking or not opts.push_to_talk:
                    continue
            if not opts.push_to_talk:
                continue
            if not talking:  # Enter: start a turn on a fresh buffer
                talking = True
                await send_event({"type": "input_audio_buffer.clear"})
                print("[talking... press Enter to send]", file=sys.stderr)
            else:  # Enter again: the turn is over, ask for the answer
                talking = False
                for event in push_to_talk_end():
                    await send_event(event)
                view.mark_turn_end()
