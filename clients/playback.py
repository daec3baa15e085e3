"""Spoken answers on the client side, without a sound card: where an answer's audio goes and what the server is told
when the listener stops hearing it. No sounddevice here (`clients.audio_source` has the sound card), no sockets.

- `Playout`: the jitter buffer between the network (the event loop) and the sound card (PortAudio's thread). It
  resamples each answer to the card's rate, starts playing once `JITTER_MS` is buffered (or the answer's audio is
  complete), counts the frames handed to the card per item, and on `stop()` says how much of each item was heard
  (frames played minus the card's output latency): the `audio_end_ms` of `conversation.item.truncate`.
- `AnswerRecorder`: `--out FILE`: the answers' audio collected as it arrives (not played) and written as one WAV.
- `SpokenAnswers`: server events in (GA `response.output_audio.*`, beta `response.audio.*`, and the MQTT bridge's
  `response.output_audio.started` + raw PCM on the device's speech topic), audio into the sink; barge-in (the
  server heard speech while the answer plays) and the interrupt key give the client events to send:
  `response.cancel` when the answer is still being generated, `conversation.item.truncate` with what was heard.
"""

from __future__ import annotations

import base64
import threading
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

OPENAI_RATE_HZ = 24000  # the OpenAI default output rate: a session that states none speaks at this rate
JITTER_MS = 80  # buffered before an answer starts (and after running dry): covers network and synthesis jitter
ECHO_TAIL_MS = 150  # the room still echoes the last sample this long after it left the speaker (half duplex)
CUT_ITEMS_KEPT = 32  # ids of answers stopped on this client: audio still in flight for them is dropped

AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
AUDIO_DONES = ("response.output_audio.done", "response.audio.done")
AUDIO_STARTED = "response.output_audio.started"  # MQTT bridge extension: raw audio follows on the speech topic


class NoAnswerAudio(RuntimeError):
    """`--out FILE` was asked for, but there is no answer audio to write (the server has no voice, or said why)."""


# ----------------------------------------------------------------------------------------------- sinks
class AudioSink(Protocol):
    def push(self, item_id: str, pcm: bytes, rate_hz: int) -> None: ...
    def end(self, item_id: str) -> None: ...
    def stop(self) -> list[tuple[str, int]]: ...
    @property
    def speaking(self) -> bool: ...


@dataclass
class _Item:
    item_id: str
    resampler: Any  # soxr.ResampleStream when the answer's rate is not the card's, else None
    received: int = 0  # frames queued for it (card rate)
    played: int = 0  # frames handed to the card
    ended: bool = False  # the server sent all of its audio


class Playout:
    """Answer audio waiting for the sound card. `push`/`end`/`stop` run on the event loop, `read` on the audio
    thread; one lock guards the state (held for a slice copy, never for I/O)."""

    def __init__(self, rate_hz: int = OPENAI_RATE_HZ, jitter_ms: int = JITTER_MS, tail_ms: int = ECHO_TAIL_MS) -> None:
        self.rate_hz = rate_hz  # the sound card's rate (`set_card`)
        self.latency_ms = 0  # the card's output latency: played frames are heard this much later
        self.jitter_ms = jitter_ms
        self.tail_ms = tail_ms
        self._lock = threading.Lock()
        self._queue: deque[tuple[_Item, np.ndarray]] = deque()
        self._items: dict[str, _Item] = {}  # answers with audio queued or still coming
        self._cut: deque[str] = deque(maxlen=CUT_ITEMS_KEPT)
        self._queued = 0  # frames in the queue
        self._buffering = True
        self._quiet = 1 << 62  # frames handed to the card since the last answer sample
        self.played_frames = 0  # every answer frame handed to the card (for reports and tests)

    def set_card(self, rate_hz: int, latency_s: float) -> None:
        """The opened sound card's rate and output latency (before any audio arrives)."""
        self.rate_hz, self.latency_ms = rate_hz, round(latency_s * 1000)

    # ---- event loop side -----------------------------------------------------------------------------------------
    def push(self, item_id: str, pcm: bytes, rate_hz: int) -> None:
        if item_id in self._cut:
            return  # in flight when the listener stopped this answer
        item = self._items.get(item_id)
        if item is None:
            item = _Item(item_id, self._resampler(rate_hz))
            with self._lock:
                self._items[item_id] = item
        samples = np.frombuffer(pcm, dtype="<i2")
        if item.resampler is not None:
            samples = item.resampler.resample_chunk(samples)
        self._enqueue(item, samples)

    def end(self, item_id: str) -> None:
        item = self._items.get(item_id)
        if item is None:
            return
        if item.resampler is not None:  # soxr holds back a few ms until told the stream is over
            self._enqueue(item, item.resampler.resample_chunk(np.zeros(0, np.int16), last=True))
        with self._lock:
            item.ended = True
            self._forget_if_done(item)

    def stop(self) -> list[tuple[str, int]]:
        """Silence at once: drop everything queued. Returns (item id, ms heard) of every answer cut short."""
        with self._lock:
            cut = [(i.item_id, self._heard_ms(i)) for i in self._items.values()]
            self._cut.extend(self._items)
            self._items.clear()
            self._queue.clear()
            self._queued = 0
            self._buffering = True
        return cut

    @property
    def speaking(self) -> bool:
        """Audio is queued, playing, or was played so recently that the room may still echo it."""
        with self._lock:
            tail = (self.tail_ms + self.latency_ms) * self.rate_hz // 1000
            return self._queued > 0 or self._quiet < tail

    @property
    def queued_ms(self) -> int:
        """Answer audio received and not played yet."""
        with self._lock:
            return self._queued * 1000 // self.rate_hz

    def heard_ms(self, item_id: str) -> int:
        with self._lock:
            item = self._items.get(item_id)
            return 0 if item is None else self._heard_ms(item)

    # ---- audio thread side ---------------------------------------------------------------------------------------
    def read(self, frames: int) -> np.ndarray:
        """The next `frames` samples for the card (int16): answer audio, or silence while there is none."""
        out = np.zeros(frames, dtype=np.int16)
        with self._lock:
            if self._buffering and self._queue:
                last = self._queue[-1][0]
                self._buffering = self._queued < self.jitter_ms * self.rate_hz // 1000 and not last.ended
            filled = 0
            while not self._buffering and filled < frames and self._queue:
                item, chunk = self._queue[0]
                take = min(frames - filled, len(chunk))
                out[filled : filled + take] = chunk[:take]
                filled += take
                item.played += take
                self._queued -= take
                if take == len(chunk):
                    self._queue.popleft()
                    self._forget_if_done(item)
                else:
                    self._queue[0] = (item, chunk[take:])
            if not self._queue:
                self._buffering = True  # ran dry: the next audio waits for the jitter buffer again
            self.played_frames += filled
            self._quiet = frames - filled if filled else self._quiet + frames
        return out

    # ---- internals -----------------------------------------------------------------------------------------------
    def _resampler(self, rate_hz: int) -> Any:
        if rate_hz == self.rate_hz:
            return None
        import soxr

        return soxr.ResampleStream(rate_hz, self.rate_hz, 1, dtype="int16")

    def _enqueue(self, item: _Item, samples: np.ndarray) -> None:
        if not len(samples):
            return
        with self._lock:
            if item.item_id not in self._items:
                return  # stopped meanwhile
            self._queue.append((item, samples))
            self._queued += len(samples)
            item.received += len(samples)

    def _forget_if_done(self, item: _Item) -> None:
        if item.ended and item.played == item.received:
            self._items.pop(item.item_id, None)

    def _heard_ms(self, item: _Item) -> int:
        return max(0, item.played * 1000 // self.rate_hz - self.latency_ms)


class AnswerRecorder:
    """`--out FILE`: every answer's audio as it arrives, in order (nothing is played, nothing is cut)."""

    speaking = False

    def __init__(self) -> None:
        self.rate_hz: int | None = None
        self._chunks: list[bytes] = []

    def push(self, item_id: str, pcm: bytes, rate_hz: int) -> None:
        if self.rate_hz is not None and rate_hz != self.rate_hz:
            raise NoAnswerAudio(f"the answer audio changed rate from {self.rate_hz} to {rate_hz} Hz mid-recording")
        self.rate_hz = rate_hz
        self._chunks.append(pcm)

    def end(self, item_id: str) -> None:
        pass

    def stop(self) -> list[tuple[str, int]]:
        return []

    @property
    def audio_ms(self) -> int:
        return 0 if self.rate_hz is None else sum(len(c) for c in self._chunks) * 500 // self.rate_hz

    def write(self, path: str | Path) -> None:
        """One mono PCM16 WAV at the answers' rate."""
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.rate_hz or OPENAI_RATE_HZ)
            w.writeframes(b"".join(self._chunks))


# ----------------------------------------------------------------------------------------------- events
def truncate(item_id: str, audio_end_ms: int) -> dict[str, Any]:
    return {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms}


class SpokenAnswers:
    """Server events -> the answer's audio in `sink`; the listener stopping it -> the client events to send."""

    def __init__(self, sink: AudioSink) -> None:
        self.sink = sink
        self.rate_hz: int | None = None  # the session's output rate; None: the server has no voice
        self.no_audio: list[dict[str, Any]] = []  # `no_audio` notes of text sent without a voice
        self.truncated: list[tuple[str, int]] = []  # (item id, audio_end_ms) of every truncate sent
        self.dropped_raw_bytes = 0  # speech-topic bytes that came with no start event (should not happen)
        self._raw: tuple[str, int] | None = None  # MQTT: (item id, rate) the speech topic's bytes belong to now
        self._open = False  # an answer's audio began and its response is not done yet

    @property
    def speaking(self) -> bool:
        """The assistant is speaking: an answer's audio began and its response is not done, or audio still plays."""
        return self._open or self.sink.speaking

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type", "")
        if kind in ("session.created", "session.updated"):
            rate = (event.get("session") or {}).get("output_sample_rate")
            self.rate_hz = rate if isinstance(rate, int) else None
            if self.rate_hz is None and isinstance(self.sink, AnswerRecorder):
                raise NoAnswerAudio(
                    "the server has no voice (its answers are text), so there is no answer audio to write: "
                    "leave out --out, or install the voice on the server (pip install '.[voice]')"
                )
        elif kind in AUDIO_DELTAS:
            self._open = True
            pcm = base64.b64decode(event.get("delta", ""))
            self.sink.push(str(event.get("item_id")), pcm, self.rate_hz or OPENAI_RATE_HZ)
        elif kind == AUDIO_STARTED:
            fmt = event.get("format", "pcm16")
            if fmt != "pcm16":
                raise NoAnswerAudio(f"the answer audio is {fmt!r}; this client plays pcm16 only (do not ask for G.711)")
            self._raw = (str(event.get("item_id")), int(event.get("sample_rate", OPENAI_RATE_HZ)))
        elif kind in AUDIO_DONES:
            self.sink.end(str(event.get("item_id")))
            if self._raw is not None and self._raw[0] == event.get("item_id"):
                self._raw = None
        elif kind.endswith("audio_transcript.delta") and "no_audio" in event:
            self.no_audio.append(event["no_audio"])
        elif kind == "response.done":
            self._open = False
        elif kind == "input_audio_buffer.speech_started" and self.speaking:
            return self.cut()  # barge-in: the server heard the listener over the answer
        return []

    def new_connection(self) -> None:
        """A (re)connection: answers of the lost connection are over (nothing can be told about them)."""
        self.sink.stop()
        self._open, self._raw = False, None

    def raw_audio(self, pcm: bytes) -> None:
        """PCM from the MQTT speech topic: it belongs to the answer the last start event named."""
        if self._raw is None:
            self.dropped_raw_bytes += len(pcm)
            return
        self._open = True
        self.sink.push(self._raw[0], pcm, self._raw[1])

    def interrupt(self, response_active: bool) -> list[dict[str, Any]]:
        """The listener pressed the interrupt key: stop generating (when it still is) and cut to what was heard."""
        cancel = [{"type": "response.cancel"}] if response_active else []
        return cancel + self.cut()

    def cut(self) -> list[dict[str, Any]]:
        """Stop the audio now; tell the server how much of each answer was heard."""
        self._open = False
        cut = self.sink.stop()
        self.truncated.extend(cut)
        return [truncate(item_id, ms) for item_id, ms in cut]
