"""A session's incoming audio: client PCM16 at the session's rate -> 16 kHz -> (noise suppression ->) (wake word ->)
VAD events, or the push-to-talk buffer when turn detection is off. With `noise_reduction`, WebRTC noise suppression
(`assistant.audio.denoise`) comes first, so the VAD, the wake word and the recogniser all hear the cleaned audio.
Pure and synchronous, like the VAD it wraps.

Time is stream time: milliseconds of 16 kHz audio received since the session started, so segmentation does not
depend on how fast audio arrives. Push-to-talk keeps the newest `max_buffer_ms` (one model audio window); the session
core says so to the client when a commit had to drop older audio.

With a wake word, server VAD runs behind it (`wake.WakeGate`). Push-to-talk is not gated by it: the client's commit
is already an explicit "this is for you", and dropping audio the client chose to commit would surprise it; the
detector still runs and its detections are reported (a client without a button can act on them).
"""

from __future__ import annotations

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.denoise import Denoiser, NoiseReductionType
from assistant.audio.resample import StreamResampler
from assistant.audio.vad import Committed, VadEvent, VadParams, VadSegmenter
from assistant.audio.wake_word import WakeWordDetector, WakeWordSettings
from assistant.realtime.wake import GateEvent, WakeGate, WakeWordDetected


class AudioIn:
    def __init__(
        self,
        input_rate_hz: int,
        vad: VadParams | None,
        max_buffer_ms: int,
        wake: WakeWordSettings | None = None,
        whole_padding: bool = True,
    ) -> None:
        self.max_buffer_ms = max_buffer_ms
        self.whole_padding = whole_padding  # the VAD's tentative end waits for the trailing padding (`VadSegmenter`)
        self._samples = 0  # 16 kHz samples received: the stream clock
        self._resampler = StreamResampler(input_rate_hz)
        self._ptt: list[np.ndarray] = []
        self.dropped_ms = 0  # push-to-talk audio dropped from the front of the current buffer (over max_buffer_ms)
        self._vad: VadSegmenter | WakeGate | None = None
        self._ptt_detector: WakeWordDetector | None = None  # push-to-talk with a wake word: detections reported only
        self._denoiser: Denoiser | None = None
        self.reconfigure(vad, wake)

    def set_noise_reduction(self, kind: NoiseReductionType | None) -> None:
        """Noise suppression of the audio from now on (None = off); a new kind starts a fresh noise estimate."""
        if kind is None:
            self._denoiser = None
        elif self._denoiser is None or self._denoiser.kind != kind:
            self._denoiser = Denoiser(kind)

    @property
    def position_ms(self) -> int:
        return self._samples * 1000 // MODEL_RATE_HZ

    @property
    def push_to_talk(self) -> bool:
        return self._vad is None

    def feed(self, pcm: bytes) -> list[GateEvent]:
        """PCM16 LE mono (even length) at the input rate; the VAD events it caused (none in push-to-talk)."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)
        return self._feed_16k(self._resampler.process(samples))

    def set_rate(self, input_rate_hz: int) -> list[GateEvent]:
        """Audio already received was at the old rate: it goes through the old filter first."""
        events = self._feed_16k(self._resampler.flush())
        self._resampler = StreamResampler(input_rate_hz)
        return events

    def reconfigure(self, vad: VadParams | None, wake: WakeWordSettings | None = None) -> None:
        """New turn detection (None = push-to-talk) or wake word (None = off): an open turn or buffer under the old
        settings is dropped."""
        self._ptt = []
        self.dropped_ms = 0
        at_ms = self.position_ms
        self._ptt_detector = WakeWordDetector(wake.name, at_ms) if wake is not None and vad is None else None
        if vad is None:
            self._vad = None
        elif wake is None:
            self._vad = VadSegmenter(vad, at_ms, self.whole_padding)
        else:
            self._vad = WakeGate(wake, vad, at_ms, self.whole_padding)

    def answer_finished(self) -> None:
        """An answer ended: behind a wake word, this opens the follow-up window."""
        if isinstance(self._vad, WakeGate):
            self._vad.answer_finished()

    def commit_vad(self) -> list[VadEvent]:
        """Server VAD, manual commit: the open turn as VAD events (a `Committed` among them if any audio)."""
        assert self._vad is not None
        return self._vad.commit_now()

    def end_turn_after(self, silence_ms: int) -> list[VadEvent]:
        """Semantic VAD: the open turn ends after `silence_ms` of trailing silence (now, if that much has passed)."""
        return [] if self._vad is None else self._vad.end_turn_after(silence_ms)

    def take_buffer(self) -> tuple[np.ndarray, int]:
        """Push-to-talk commit: the buffered audio (int16, 16 kHz) and the ms dropped from its front; emptied."""
        self._feed_16k(self._resampler.flush())
        audio = np.concatenate(self._ptt) if self._ptt else np.zeros(0, dtype=np.int16)
        dropped_ms, self._ptt, self.dropped_ms = self.dropped_ms, [], 0
        return audio, dropped_ms

    def restore_buffer(self, audio: np.ndarray, dropped_ms: int) -> None:
        """A commit refused as too short keeps what was buffered."""
        self._ptt = [audio] if len(audio) else []
        self.dropped_ms = dropped_ms

    def clear(self) -> None:
        self._resampler.flush()
        if self._vad is not None:
            self._vad.reset()
        self._ptt = []
        self.dropped_ms = 0

    def _feed_16k(self, pcm16k: np.ndarray) -> list[GateEvent]:
        if len(pcm16k) == 0:
            return []
        if self._denoiser is not None:
            pcm16k = self._denoiser.process(pcm16k)
        self._samples += len(pcm16k)
        if self._vad is None:
            heard: list[GateEvent] = []
            if self._ptt_detector is not None:
                heard = [WakeWordDetected(d.name, d.audio_end_ms) for d in self._ptt_detector.process(pcm16k)]
            self._ptt.append(pcm16k)
            limit = self.max_buffer_ms * MODEL_RATE_HZ // 1000
            total = sum(len(c) for c in self._ptt)
            if total > limit:
                self._ptt = [np.concatenate(self._ptt)[total - limit :]]
                self.dropped_ms += (total - limit) * 1000 // MODEL_RATE_HZ
            return heard
        return self._vad.feed(pcm16k)


def committed_ms(events: list[GateEvent]) -> int:
    """Milliseconds of audio in the `Committed` among `events` (0 when none)."""
    return next((len(e.audio) * 1000 // MODEL_RATE_HZ for e in events if isinstance(e, Committed)), 0)
