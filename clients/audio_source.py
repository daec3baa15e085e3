"""Audio sources and the sound card of the thin clients: WAV files (soxr-resampled to 16 kHz PCM16, paced at real
time), the microphone (sounddevice, 16 kHz mono PCM16 in small blocks, into a bounded asyncio queue), the speaker the
answers play on (`Speaker`, fed by a `clients.playback.Playout`) and, for full duplex, one stream for both
(`DuplexAudio`: the speaker's own output is the far-end reference of WebRTC's echo canceller, so the microphone
hears the user, not the answer).

No protocol knowledge here; `clients.common` decides what to send.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from clients.playback import Playout

INPUT_RATE_HZ = 16000
BYTES_PER_SAMPLE = 2  # PCM16 mono
DEFAULT_BLOCK_MS = 20


def silence(duration_ms: int, rate_hz: int = INPUT_RATE_HZ) -> bytes:
    return bytes(BYTES_PER_SAMPLE * (rate_hz * duration_ms // 1000))


def load_wav_pcm16(path: str | Path, rate_hz: int = INPUT_RATE_HZ) -> bytes:
    """A PCM WAV file (8/16/24/32-bit, any channels, any rate) as mono PCM16 LE at `rate_hz`."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, src_rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise SystemExit(f"error: audio file {path} does not exist; pass an existing WAV file to --wav") from None
    except (wave.Error, EOFError) as e:
        raise SystemExit(
            f"error: {path} is not a PCM WAV file ({e}); convert it first, e.g. `sox in.mp3 -r 16000 -c 1 out.wav`"
        ) from None
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    elif width == 3:  # 24-bit: place the 3 bytes in the top of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        as32 = (b[:, 0].astype(np.int32) << 8) | (b[:, 1].astype(np.int32) << 16) | (b[:, 2].astype(np.int32) << 24)
        samples = as32.astype(np.float32) / float(np.iinfo(np.int32).max)
    else:
        raise SystemExit(f"error: {path}: unsupported sample width {width} bytes; expected 1-4")
    mono = samples.reshape(-1, channels).mean(axis=1)  # (frames, channels) -> (frames,)
    if src_rate != rate_hz:
        import soxr  # only needed when the file is not already at the target rate

        mono = soxr.resample(mono, src_rate, rate_hz)
    return (np.clip(mono, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def blocks(pcm: bytes, block_ms: int = DEFAULT_BLOCK_MS, rate_hz: int = INPUT_RATE_HZ) -> list[bytes]:
    step = BYTES_PER_SAMPLE * rate_hz * block_ms // 1000
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def paced(chunks: list[bytes], rate_hz: int = INPUT_RATE_HZ, speed: float = 1.0) -> AsyncIterator[bytes]:
    """Yield audio blocks no faster than real time (`speed` 2.0 = twice as fast), like a microphone would.

    Pacing is against a monotonic deadline, not a sleep per block, so scheduling jitter does not accumulate."""
    start = time.monotonic()
    sent_s = 0.0
    for chunk in chunks:
        delay_s = start + sent_s / speed - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        yield chunk
        sent_s += len(chunk) / (BYTES_PER_SAMPLE * rate_hz)


# Microphone blocks buffered between the audio thread and the event loop (50 x 20 ms = 1 s). When the connection is
# down or slow the OLDEST block is dropped: the freshest audio is what the user is saying now.
MIC_QUEUE_BLOCKS = 50


class NoMicrophone(RuntimeError):
    """No usable audio input device; the message says what to do instead."""


class NoSpeaker(RuntimeError):
    """No usable audio output device; the message says what to do instead."""


def _sounddevice(error: type[RuntimeError], what: str, instead: str) -> Any:
    """The sounddevice module, or `error` saying what is missing and what to do `instead`."""
    try:
        import sounddevice as sd
    except OSError as e:  # raised at import when libportaudio2 is missing
        raise error(
            f"cannot use the {what}: the PortAudio library is missing ({e}). "
            f"Install it (Debian/Ubuntu: `sudo apt install libportaudio2`) or {instead}."
        ) from None
    except ImportError:
        raise error(
            f"cannot use the {what}: the `sounddevice` package is not installed. "
            f"Install it with `pip install '.[client]'` or {instead}."
        ) from None
    return sd


class Microphone:
    """sounddevice capture into a bounded asyncio queue (drop-oldest). Tries 16 kHz, else the device's own rate."""

    def __init__(self, device: str | int | None, block_ms: int) -> None:
        self._sd = _sounddevice(NoMicrophone, "microphone", "stream a file with --wav FILE")
        self.device = device
        self.block_ms = block_ms
        self.rate_hz = INPUT_RATE_HZ
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(MIC_QUEUE_BLOCKS)
        self.dropped_blocks = 0
        self._stream: Any = None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        sd = self._sd
        try:
            info = sd.query_devices(self.device, kind="input")
        except (sd.PortAudioError, ValueError) as e:
            raise NoMicrophone(
                f"no microphone found ({e}). Connect a microphone (or pick one with --device; list them with "
                "`python -m sounddevice`), or stream a file instead with --wav FILE."
            ) from None

        def on_audio(data: Any, frames: int, time_info: Any, status: Any) -> None:  # runs on PortAudio's thread
            loop.call_soon_threadsafe(self._put, bytes(data))

        last_error: Exception | None = None
        for rate_hz in (INPUT_RATE_HZ, int(info["default_samplerate"])):
            try:
                stream = sd.RawInputStream(
                    samplerate=rate_hz,
                    blocksize=rate_hz * self.block_ms // 1000,
                    device=self.device,
                    channels=1,
                    dtype="int16",
                    callback=on_audio,
                )
                stream.start()
            except sd.PortAudioError as e:  # e.g. the hardware cannot do 16 kHz: the server resamples instead
                last_error = e
                continue
            self._stream, self.rate_hz = stream, rate_hz
            return
        raise NoMicrophone(f"cannot open the microphone {info['name']!r}: {last_error}. Try --device or --wav FILE.")

    def _put(self, block: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped_blocks += 1
        self.queue.put_nowait(block)

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


class Speaker:
    """sounddevice playback of a `Playout` (its own stream; the microphone has another). Tries the answers' rate,
    else the device's own rate (the playout then resamples)."""

    def __init__(self, playout: Playout, device: str | int | None = None) -> None:
        self.playout = playout
        self.device = device
        self._stream: Any = None

    def open(self) -> None:
        sd = _sounddevice(NoSpeaker, "speaker", "write the answer to a file with --out FILE, or ask for --text")
        try:
            info = sd.query_devices(self.device, kind="output")
        except (sd.PortAudioError, ValueError) as e:
            raise NoSpeaker(
                f"no speaker found ({e}). Connect one (or pick one with --output-device; list them with "
                "`python -m sounddevice`), or ask for text answers with --text."
            ) from None
        last_error: Exception | None = None
        for rate_hz in dict.fromkeys((self.playout.rate_hz, int(info["default_samplerate"]))):
            try:
                stream = sd.RawOutputStream(
                    samplerate=rate_hz, device=self.device, channels=1, dtype="int16", callback=self.fill
                )
                stream.start()
            except sd.PortAudioError as e:
                last_error = e
                continue
            self.playout.set_card(rate_hz, float(stream.latency))
            self._stream = stream
            return
        raise NoSpeaker(f"cannot open the speaker {info['name']!r}: {last_error}. Try --output-device or --text.")

    def fill(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:  # runs on PortAudio's thread
        outdata[:] = self.playout.read(frames).tobytes()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


# AEC3 learns the room from the first ~2 s of audio it plays (bench/duplex_echo.py: the echo left drops by ~20 dB
# after 2.0 s in every room tried, and before that the server's VAD hears it as speech). Until the canceller has
# played this much, the microphone is muted while the speaker plays (half duplex), as it always is without --duplex.
ECHO_WARMUP_MS = 2500
ECHO_TAIL_MS = 200  # during the warm-up, the microphone stays muted this long after the speaker stops (the echo)


class DuplexAudio(Microphone):
    """`--duplex`: microphone and speaker as ONE sounddevice stream, so each captured block comes with the block
    played at the same time: WebRTC AEC3 (pywebrtc-audio) removes that far-end audio from the capture, and the
    user can talk over the answer without the answer barging in on itself (once the canceller has learnt the room:
    `ECHO_WARMUP_MS`). Runs at the answers' rate (else the device's), and sends the microphone at that rate."""

    def __init__(self, device: str | int | None, output_device: str | int | None, block_ms: int, playout: Playout):
        super().__init__(device, block_ms)
        try:
            import pywebrtc_audio
        except ImportError:
            raise NoMicrophone(
                "--duplex needs the echo canceller: `pip install '.[client]'` (pywebrtc-audio), or leave out --duplex"
            ) from None
        self._webrtc = pywebrtc_audio
        self.output_device = output_device
        self.playout = playout
        self.echo: Any = None  # pywebrtc_audio.AudioProcessor, made once the stream's rate and latency are known
        self.loop: asyncio.AbstractEventLoop | None = None
        self.far_ms = 0  # answer audio the canceller has played so far (its warm-up)
        self._far_quiet_ms = ECHO_TAIL_MS  # since the speaker last played answer audio

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        sd = self._sd
        try:
            info = sd.query_devices(self.device, kind="input")
            sd.query_devices(self.output_device, kind="output")
        except (sd.PortAudioError, ValueError) as e:
            raise NoMicrophone(
                f"--duplex needs a microphone and a speaker ({e}). Pick them with --device and --output-device "
                "(list them with `python -m sounddevice`), or leave out --duplex."
            ) from None

        self.loop = loop
        last_error: Exception | None = None
        for rate_hz in dict.fromkeys((self.playout.rate_hz, int(info["default_samplerate"]))):
            try:
                stream = sd.RawStream(
                    samplerate=rate_hz,
                    blocksize=rate_hz * self.block_ms // 1000,
                    device=(self.device, self.output_device),
                    channels=1,
                    dtype="int16",
                    callback=self.on_audio,
                )
                stream.start()
            except sd.PortAudioError as e:
                last_error = e
                continue
            in_latency_s, out_latency_s = stream.latency
            self.playout.set_card(rate_hz, out_latency_s)
            self.start_echo_canceller(rate_hz, round((in_latency_s + out_latency_s) * 1000))
            self._stream = stream
            return
        raise NoMicrophone(f"cannot open {info['name']!r} for --duplex: {last_error}. Leave out --duplex.")

    def start_echo_canceller(self, rate_hz: int, delay_ms: int) -> None:
        """The echo canceller for a stream at `rate_hz` (`delay_ms`: a hint, AEC3 estimates the delay itself)."""
        self.rate_hz = rate_hz
        self.echo = self._webrtc.AudioProcessor(sample_rate=rate_hz, echo_cancellation=True, stream_delay_ms=delay_ms)

    def on_audio(self, indata: Any, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        """The stream's callback (PortAudio's thread): play the next answer block, and hand the captured block with
        it to the event loop."""
        far = self.playout.read(frames).tobytes()
        outdata[:] = far
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._put_pair, bytes(indata), far)

    def _put_pair(self, near: bytes, far: bytes) -> None:
        """One captured block and the block played with it: the capture without the answer's echo (muted while the
        canceller is still learning the room and the speaker plays)."""
        clean = cancel_echo(self.echo, near, far)
        block_ms = len(far) * 500 // self.rate_hz
        if any(far):  # the Playout gives exact zeros when no answer plays
            self.far_ms += block_ms
            self._far_quiet_ms = 0
        else:
            self._far_quiet_ms += block_ms
        if self.far_ms <= ECHO_WARMUP_MS and self._far_quiet_ms < ECHO_TAIL_MS:
            clean = bytes(len(clean))
        self._put(clean)


def cancel_echo(echo: Any, near: bytes, far: bytes) -> bytes:
    """`near` (the microphone) minus the echo of `far` (what the speaker played meanwhile), PCM16 mono."""
    clean = echo.process(np.frombuffer(near, dtype="<i2"), np.frombuffer(far, dtype="<i2"))
    return clean.astype("<i2").tobytes()
