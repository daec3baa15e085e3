"""The desktop client's `--duplex` echo cancellation, measured on its own code path: `python -m bench.duplex_echo`.

A synthetic room: the Piper-like answer (espeak-ng here, 24 kHz) goes through `clients.audio_source.DuplexAudio`'s
stream callback exactly as PortAudio would call it (20 ms blocks, the `Playout` playing the answer); the microphone
hears what the speaker played `delay_ms` later at `echo_db`, then the user alone. For each room (delay x level):
how far below the echo the canceller's output is in its first 2 s and after them, the user's level change, how many
turns the server's own VAD (`assistant.audio.vad`, default `[vad]` settings) would start on the echo alone: the raw
microphone, the canceller's output, and what the client sends (the canceller, with the microphone muted while the
speaker plays during its `ECHO_WARMUP_MS`) - each one a false barge-in - and the client's CPU time per second of
audio (canceller included).
Writes `bench/results/duplex_echo-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import soxr

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.vad import SpeechStarted, VadSegmenter
from bench.results import Record
from bench.wake_word import speak
from clients.audio_source import ECHO_WARMUP_MS, DuplexAudio, cancel_echo
from clients.playback import Playout

RATE_HZ = 24000
BLOCK = RATE_HZ * 20 // 1000
ANSWER = (
    "The capital of France is Paris. It is a large city on the river Seine, famous for its museums, "
    "its cafes and the Eiffel Tower, which was built for a world fair."
)
USER = "Stop, please. What time is it?"


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x.astype(np.float64))) + 1e-9))


def false_turns(pcm24k: np.ndarray) -> int:
    """Turns the server's VAD (default settings) starts on this audio (it runs at 16 kHz)."""
    seg = VadSegmenter()
    pcm16k = soxr.resample(pcm24k, RATE_HZ, MODEL_RATE_HZ)
    return sum(isinstance(e, SpeechStarted) for e in seg.feed(pcm16k))


async def room(answer: np.ndarray, user: np.ndarray, delay_ms: int, echo_db: float) -> dict[str, float]:
    gain = 10 ** (echo_db / 20)
    delay = RATE_HZ * delay_ms // 1000
    playout = Playout(RATE_HZ, jitter_ms=0)
    duplex = DuplexAudio(None, None, 20, playout)
    duplex.loop = asyncio.get_running_loop()
    duplex.start_echo_canceller(RATE_HZ, delay_ms)
    playout.push("answer", answer.tobytes(), RATE_HZ)
    playout.end("answer")
    n = len(answer) + len(user) + RATE_HZ // 5
    n -= n % BLOCK
    user_track = np.zeros(n, np.int16)
    user_track[len(answer) : len(answer) + len(user)] = user
    played = np.zeros(n + delay, np.int16)
    mic = np.zeros(n, np.int16)
    heard = np.zeros(n, np.int16)  # what the client sends
    aec_only = np.zeros(n, np.int16)  # a second canceller on the same signals, without the warm-up muting
    reference = duplex._webrtc.AudioProcessor(sample_rate=RATE_HZ, echo_cancellation=True, stream_delay_ms=delay_ms)
    cpu_s = 0.0
    for at in range(0, n, BLOCK):
        echo = (played[at : at + BLOCK].astype(np.float64) * gain).astype(np.int16)
        mic[at : at + BLOCK] = np.clip(echo.astype(np.int32) + user_track[at : at + BLOCK], -32768, 32767)
        out = bytearray(2 * BLOCK)
        t0 = time.process_time()
        duplex.on_audio(mic[at : at + BLOCK].tobytes(), memoryview(out), BLOCK, None, None)
        heard[at : at + BLOCK] = np.frombuffer(await duplex.queue.get(), "<i2")  # the echo canceller runs here
        cpu_s += time.process_time() - t0
        aec_only[at : at + BLOCK] = np.frombuffer(cancel_echo(reference, mic[at : at + BLOCK].tobytes(), out), "<i2")
        played[at + delay : at + delay + BLOCK] = np.frombuffer(out, "<i2")
    echo_in = (played[: len(answer)].astype(np.float64) * gain).astype(np.int16)
    first, rest = slice(0, 2 * RATE_HZ), slice(2 * RATE_HZ, len(answer))
    user_span = slice(len(answer), len(answer) + len(user))
    return {
        "delay_ms": delay_ms,
        "echo_db": echo_db,
        "echo_removed_first_2s_db": round(db(echo_in[first]) - db(aec_only[first]), 1),
        "echo_removed_after_2s_db": round(db(echo_in[rest]) - db(aec_only[rest]), 1),
        "user_level_change_db": round(db(heard[user_span]) - db(user_track[user_span]), 2),
        "false_turns_raw_microphone": false_turns(mic[: len(answer)]),
        "false_turns_canceller_only": false_turns(aec_only[: len(answer)]),
        "false_turns_client_sends": false_turns(heard[: len(answer)]),
        "cpu_ms_per_audio_s": round(cpu_s * 1000 / (n / RATE_HZ), 2),
    }


async def main(args: argparse.Namespace) -> None:
    record = Record("duplex_echo", vars(args))
    answer = soxr.resample(speak(ANSWER), MODEL_RATE_HZ, RATE_HZ).astype(np.int16)
    answer = np.concatenate([answer, np.zeros(-len(answer) % BLOCK, np.int16)])
    user = soxr.resample(speak(USER), MODEL_RATE_HZ, RATE_HZ).astype(np.int16)
    rooms = []
    for delay_ms in args.delays_ms:
        for echo_db in args.echo_db:
            rooms.append(await room(answer, user, delay_ms, echo_db))
            print(rooms[-1], flush=True)
    numbers = {"answer_s": round(len(answer) / RATE_HZ, 2), "user_s": round(len(user) / RATE_HZ, 2), "rooms": rooms}
    notes = f"pywebrtc-audio AudioProcessor(echo_cancellation=True) at 24 kHz; warm-up {ECHO_WARMUP_MS} ms"
    record.write(numbers, torch_threads=0, notes=notes)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delays-ms", type=int, nargs="+", default=[20, 60, 150])
    p.add_argument("--echo-db", type=float, nargs="+", default=[-12.0, -6.0, 0.0])
    asyncio.run(main(p.parse_args()))
