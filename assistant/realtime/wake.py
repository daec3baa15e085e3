"""The wake-word stage of a session's audio: between the 16 kHz stream and turn detection (server VAD).

With a wake word on, `WakeGate` stands where the `VadSegmenter` stood (`audio_in.AudioIn`) and gives the same
events, plus `WakeWordDetected`. Every sample goes to the detector (`assistant.audio.wake_word`); only audio from
the wake word on (or inside a follow-up window) reaches a segmenter, so audio before the wake word never becomes a
turn, never reaches the recogniser or the LLM, and is not kept. Time is stream time, as everywhere in the core.

States:
- waiting: the detector alone hears the audio. No segmenter exists; nothing is kept but the detector's own state
  (under 10 ms of samples and its 30 ms feature window).
- listening: a detection at T opened a turn: a fresh segmenter starts at T and hears everything from T on, so speech
  going on after the wake word ("Alexa, what is the capital of France" in one breath) is the turn's speech, with no
  pre-roll from before T. The turn has to begin (the segmenter leaves idle) within `LISTEN_AFTER_WAKE_MS` of T, else
  the gate goes back to waiting. Once the turn is committed: waiting again (its answer is coming; while it plays,
  only the wake word starts a turn, and so barges in).
- follow-up: `answer_finished()` (the session calls it at every response.done) opens listening without the wake word
  for `follow_up_ms`: speech that begins inside it is a turn.
A detection while listening restarts the turn at the new detection, unless speech has already begun: then the wake
word is part of that turn ("... Alexa ...") and is not reported. Push-to-talk does not use the gate (`AudioIn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.vad import Committed, VadEvent, VadParams, VadSegmenter
from assistant.audio.wake_word import Detection, WakeWordDetector, WakeWordSettings

# After the wake word, speech must begin within this: room for the pause of someone who waits for a chime.
LISTEN_AFTER_WAKE_MS = 5000


@dataclass(frozen=True)
class WakeWordDetected:
    name: str
    audio_start_ms: int  # stream time where the turn's audio starts: the detection (the wake word ended just before)


GateEvent = VadEvent | WakeWordDetected


class WakeGate:
    """A `VadSegmenter` behind a wake word. See the module docstring for the states."""

    def __init__(
        self, wake: WakeWordSettings, vad: VadParams, stream_offset_ms: int = 0, whole_padding: bool = True
    ) -> None:
        self.settings = wake
        self.vad_params = vad
        self.whole_padding = whole_padding  # `VadSegmenter`'s
        self._detector = WakeWordDetector(wake.name, stream_offset_ms)
        self._offset_ms = stream_offset_ms
        self._samples = 0  # samples fed to the gate
        self._frame = MODEL_RATE_HZ * vad.frame_ms // 1000
        self._vad: VadSegmenter | None = None  # None: waiting for the wake word
        self._deadline_ms = 0  # listening: a turn must begin before this

    @property
    def listening(self) -> bool:
        return self._vad is not None

    @property
    def position_ms(self) -> int:
        return self._offset_ms + self._samples * 1000 // MODEL_RATE_HZ

    def feed(self, pcm: np.ndarray) -> list[GateEvent]:
        """int16 samples at 16 kHz, any chunk size; the events they caused, in stream order."""
        out: list[GateEvent] = []
        start, done = self._samples, 0
        for det in self._detector.process(pcm):
            at = (det.audio_end_ms - self._offset_ms) * MODEL_RATE_HZ // 1000 - start  # within this chunk
            at = min(max(at, done), len(pcm))
            out += self._hear(pcm[done:at])
            done = at
            out += self._detected(det)
        out += self._hear(pcm[done:])
        return out

    def commit_now(self) -> list[VadEvent]:
        """Manual commit: the open turn (if any) as VAD events; then waiting for the wake word again."""
        if self._vad is None:
            return []
        events = self._vad.commit_now()
        if events:
            self._vad = None
        return events

    def end_turn_after(self, silence_ms: int) -> list[VadEvent]:
        """Semantic VAD's decision for the open turn (`VadSegmenter.end_turn_after`)."""
        if self._vad is None:
            return []
        events = self._vad.end_turn_after(silence_ms)
        if events:
            self._vad = None  # the turn is complete, as in `_hear`
        return events

    def reset(self) -> None:
        """`input_audio_buffer.clear`: the open turn is dropped; a listening window stays open."""
        if self._vad is not None:
            self._vad.reset()

    def answer_finished(self) -> None:
        """An answer ended: speech within `follow_up_ms` (from now, in stream time) is a turn without the wake word."""
        follow_up_ms = self.settings.follow_up_ms
        if follow_up_ms <= 0:
            return
        if self._vad is None:
            self._vad = VadSegmenter(self.vad_params, self.position_ms, self.whole_padding)
            self._deadline_ms = self.position_ms + follow_up_ms
        elif self._vad.idle:
            self._deadline_ms = max(self._deadline_ms, self.position_ms + follow_up_ms)

    def _hear(self, pcm: np.ndarray) -> list[GateEvent]:
        """Audio for the open turn, one VAD frame at a time so that a commit or the window's end stops it exactly
        there; without an open turn the audio goes nowhere (the detector has heard it)."""
        out: list[GateEvent] = []
        n = 0
        while self._vad is not None and n < len(pcm):
            piece = pcm[n : n + self._frame]
            n += len(piece)
            events = self._vad.feed(piece)
            out += events
            now_ms = self._offset_ms + (self._samples + n) * 1000 // MODEL_RATE_HZ
            if any(isinstance(e, Committed) for e in events):
                self._vad = None  # the turn is complete: its answer comes next
            elif self._vad.idle and now_ms >= self._deadline_ms:
                self._vad = None  # nobody spoke in the window
        self._samples += len(pcm)
        return out

    def _detected(self, det: Detection) -> list[GateEvent]:
        if self._vad is not None and self._vad.in_speech:
            return []  # said inside a turn already under way: part of it
        self._vad = VadSegmenter(self.vad_params, self.position_ms, self.whole_padding)
        self._deadline_ms = self.position_ms + LISTEN_AFTER_WAKE_MS
        return [WakeWordDetected(det.name, self.position_ms)]
