"""Voice activity segmentation: 16 kHz PCM16 in, speech_started / speech_stopped / committed events out.

Owner: engineer D. `VadSegmenter` is a pure, synchronous class (no asyncio, no clocks): feed it int16 samples in any
chunk size and it returns the events those samples caused, stamped in milliseconds of *stream* time (samples seen
since the segmenter's `stream_offset_ms`), so results do not depend on how fast audio arrives.

States: idle -> pending -> speech -> idle.
- idle: the last `prefix_padding_ms` of audio is kept in a ring (the pre-roll, so a turn keeps its first syllable).
- pending: a voiced frame (webrtcvad, `aggressiveness` 0-3) opened a candidate. It becomes speech once it holds
  `min_speech_ms` of voiced frames and at least half of its frames are voiced; `PENDING_GAP_MS` (150) of unvoiced
  audio first drops it (clicks, coughs and sparse noise never become turns).
- speech: `SpeechStarted(audio_start_ms)` was emitted (the onset, i.e. the first voiced frame). `silence_duration_ms`
  of unvoiced audio ends the turn: `SpeechStopped(audio_end_ms)` (end of the last voiced frame) and `Committed` with
  the audio from the pre-roll to `prefix_padding_ms` after the last voiced frame. A turn reaching `max_utterance_ms`
  (pre-roll included, <= 30 s: one model audio window) is committed by force (`Committed.forced`).
- semantic VAD (`TurnDetection.type == "semantic_vad"`): the silence that ends a turn is `max_silence_ms` (the
  eagerness's longest wait) until the caller, having the words of the tentative audio, calls `end_turn_after(ms)`
  (`assistant.audio.semantic_vad`); speech resuming restores the longest wait.
- tentative end (speculation): once the trailing silence of a spoken turn reaches `tentative_ms(whole_padding)`
  (still below `silence_duration_ms`), `TentativeEnd` carries the audio the commit will carry if the silence goes
  on. `whole_padding` (the default): at `max(early_prepare_ms, prefix_padding_ms)`, exactly the commit's samples;
  without it, at `early_prepare_ms`, their start, short of the rest of the trailing padding (unvoiced audio), for a
  recogniser that hears the speech trimmed to a margin anyway (Whisper; the engine reuses the work when both clips
  trim alike: `Speculation.matches`). A voiced frame before the commit voids it (`TentativeVoid`); the silence
  that follows may produce a new `TentativeEnd` for the same turn.
  `early_prepare_ms = 0` turns this off. Callers use it to start the turn's audio work during the silence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import webrtcvad

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.semantic_vad import SEMANTIC_EARLY_PREPARE_MS, max_silence_ms
from assistant.schema import bounds, check_fields

# A candidate (not yet speech) interrupted by this much unvoiced audio is dropped: webrtcvad's own hangover already
# bridges the short gaps between syllables, while a click or cough followed by a pause must not add up with the next.
PENDING_GAP_MS = 150
MAX_UTTERANCE_LIMIT_MS = 30000


@dataclass(frozen=True)
class VadParams:
    """The segmenter's knobs. Their types and ranges are declared here once (`assistant.schema`); the config's
    `[vad]` section and the sessions' `turn_detection` are this dataclass extended (`realtime.settings`)."""

    aggressiveness: int = field(default=2, metadata=bounds(0, 3))  # webrtcvad: 0 keeps most .. 3 drops most
    frame_ms: Literal[10, 20, 30] = 30  # the frame lengths webrtcvad accepts
    prefix_padding_ms: int = field(default=300, metadata=bounds(0, 2000))
    silence_duration_ms: int = field(default=600, metadata=bounds(100, 5000))
    min_speech_ms: int = field(default=250, metadata=bounds(0, 5000))
    max_utterance_ms: int = field(default=30000, metadata=bounds(1000, MAX_UTTERANCE_LIMIT_MS))
    early_prepare_ms: int = field(default=0, metadata=bounds(0, 5000))  # 0 = no TentativeEnd events

    @property
    def max_silence_ms(self) -> int:
        """The trailing silence that ends a turn unless `VadSegmenter.end_turn_after` shortens it (semantic VAD)."""
        return self.silence_duration_ms

    def tentative_ms(self, whole_padding: bool = True) -> int | None:
        """Trailing silence after which `TentativeEnd` fires, or None when it never does (off, or not earlier than
        the commit itself). `whole_padding`: not before the trailing padding is complete (see the module docstring)."""
        if self.early_prepare_ms <= 0:
            return None
        ms = max(self.early_prepare_ms, self.prefix_padding_ms) if whole_padding else self.early_prepare_ms
        return ms if ms < self.max_silence_ms else None

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TurnDetection(VadParams):
    """Turn detection: the segmenter's knobs plus what happens at a turn's edges. A session's `turn_detection` and
    the config's `[vad]` section. OpenAI's keys (threshold, prefix_padding_ms, silence_duration_ms, create_response,
    interrupt_response) + the segmenter's (aggressiveness, min_speech_ms, max_utterance_ms, frame_ms,
    early_prepare_ms) + semantic VAD's `eagerness`. `server_vad` ends a turn after `silence_duration_ms` of silence;
    `semantic_vad` runs the same segmenter but decides how much silence ends the turn from the words heard so far
    and `eagerness` (`assistant.realtime.semantic_vad`)."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"  # semantic_vad: how soon a turn may end
    threshold: float = field(default=0.5, metadata=bounds(0.0, 1.0))  # echoed; this VAD's knob is aggressiveness
    create_response: bool = True
    interrupt_response: bool = True
    early_prepare_ms: int = field(default=200, metadata=bounds(0, 5000))

    @property
    def max_silence_ms(self) -> int:
        """semantic_vad waits up to OpenAI's longest wait for its eagerness, until the words say how long."""
        return max_silence_ms(self.eagerness) if self.type == "semantic_vad" else self.silence_duration_ms

    def tentative_ms(self, whole_padding: bool = True) -> int | None:
        """semantic_vad needs the words, so its turns are always prepared during the silence."""
        if self.type != "semantic_vad" or self.early_prepare_ms > 0:
            return super().tentative_ms(whole_padding)
        return max(SEMANTIC_EARLY_PREPARE_MS, self.prefix_padding_ms) if whole_padding else SEMANTIC_EARLY_PREPARE_MS


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True)
class Committed:
    audio: np.ndarray  # int16 at 16 kHz: pre-roll + speech + trailing padding
    audio_start_ms: int  # stream time of the first sample of `audio`
    audio_end_ms: int  # stream time just after the last sample of `audio`
    forced: bool  # True when max_utterance_ms cut the turn


@dataclass(frozen=True)
class TentativeEnd:
    """The open turn's trailing silence reached `VadParams.tentative_ms()`: `audio` is what `Committed` will carry
    unless speech resumes first (then `TentativeVoid` follows), or its start when the trailing padding is not yet
    complete. `turn` numbers the segmenter's turns."""

    audio: np.ndarray  # int16 at 16 kHz: the coming Committed's samples, or their start (see the module docstring)
    audio_start_ms: int
    audio_end_ms: int
    turn: int


@dataclass(frozen=True)
class TentativeVoid:
    """Speech resumed after a `TentativeEnd` of turn `turn`: that tentative audio will not be committed."""

    turn: int


VadEvent = SpeechStarted | SpeechStopped | Committed | TentativeEnd | TentativeVoid

_IDLE, _PENDING, _SPEECH = "idle", "pending", "speech"


class VadSegmenter:
    """Turns a 16 kHz int16 stream into speech turns. See the module docstring for the state machine."""

    def __init__(self, params: VadParams | None = None, stream_offset_ms: int = 0, whole_padding: bool = True) -> None:
        self.params = params or VadParams()
        self.whole_padding = whole_padding  # a TentativeEnd waits for the trailing padding (see `tentative_ms`)
        self._vad = webrtcvad.Vad(self.params.aggressiveness)
        self._frame_len = MODEL_RATE_HZ * self.params.frame_ms // 1000
        self._offset_samples = stream_offset_ms * MODEL_RATE_HZ // 1000
        self._pos = 0  # samples consumed as whole frames
        self._rest = np.zeros(0, dtype=np.int16)  # samples not yet forming a whole frame
        self._ring: deque[np.ndarray] = deque(maxlen=max(1, self.params.prefix_padding_ms // self.params.frame_ms))
        self._state = _IDLE
        self._turn = 0  # number of turns opened so far (pending candidates included)
        self._reset_segment()

    # ---- public -------------------------------------------------------------------------------------------
    @property
    def in_speech(self) -> bool:
        """True between SpeechStarted and the turn's Committed."""
        return self._state == _SPEECH

    @property
    def idle(self) -> bool:
        """True when no turn is open, not even a candidate (pending) one."""
        return self._state == _IDLE

    @property
    def position_ms(self) -> int:
        """Stream time of the end of all audio fed so far (whole frames and the partial one)."""
        return self._ms(self._pos + len(self._rest))

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"expected a 1-D int16 array at 16 kHz, got dtype {pcm.dtype} with shape {pcm.shape}")
        data = np.concatenate([self._rest, pcm]) if len(self._rest) else pcm
        n_frames = len(data) // self._frame_len
        events: list[VadEvent] = []
        for i in range(n_frames):
            frame = data[i * self._frame_len : (i + 1) * self._frame_len]
            voiced = self._vad.is_speech(frame.tobytes(), MODEL_RATE_HZ)
            events.extend(self._step(frame, voiced))
        self._rest = data[n_frames * self._frame_len :].copy()
        return events

    def commit_now(self) -> list[VadEvent]:
        """Manual commit (client `input_audio_buffer.commit` under server VAD): ends a pending or spoken turn now.
        Returns [] when no turn is open; otherwise [SpeechStopped, Committed] (the partial frame is included)."""
        if self._state == _IDLE:
            return []
        if len(self._rest):
            self._frames.append(self._rest)
            self._pos += len(self._rest)
            self._rest = np.zeros(0, dtype=np.int16)
        end = self._pos
        return [SpeechStopped(self._ms(end)), self._commit(end, forced=False)]

    def end_turn_after(self, silence_ms: int) -> list[VadEvent]:
        """Semantic VAD: the open turn ends after `silence_ms` of trailing silence instead of `max_silence_ms`; when
        that much has already passed, it ends now ([SpeechStopped, Committed], the same cut as ever). It holds for
        this silence only: speech resuming puts `max_silence_ms` back, and the next silence is judged again."""
        if self._state != _SPEECH:
            return []
        self._end_ms = silence_ms
        if self._unvoiced_run_ms >= silence_ms:
            return self._end_turn()
        return []

    def reset(self) -> None:
        """Drop buffered audio and any open turn (`input_audio_buffer.clear`); stream time keeps running."""
        self._pos += len(self._rest)
        self._rest = np.zeros(0, dtype=np.int16)
        self._ring.clear()
        self._state = _IDLE
        self._reset_segment()

    # ---- internals ----------------------------------------------------------------------------------------
    def _ms(self, samples: int) -> int:
        return (self._offset_samples + samples) * 1000 // MODEL_RATE_HZ

    def _reset_segment(self) -> None:
        self._frames: list[np.ndarray] = []
        self._seg_start = self._pos  # first sample of self._frames (pre-roll included)
        self._onset = self._pos
        self._voiced_frames = 0
        self._unvoiced_run_ms = 0
        self._last_voiced_end = self._pos
        self._tentative = False  # a TentativeEnd was emitted for the current trailing silence
        self._end_ms = self.params.max_silence_ms  # the trailing silence that ends this turn (end_turn_after)

    def _step(self, frame: np.ndarray, voiced: bool) -> list[VadEvent]:
        p = self.params
        forced: list[VadEvent] = []
        max_samples = p.max_utterance_ms * MODEL_RATE_HZ // 1000
        if self._state != _IDLE and self._pos + len(frame) - self._seg_start > max_samples:
            # This frame would push the turn past max_utterance_ms: cut before it (the turn fits one audio window);
            # the frame then opens the next turn. A pending candidate this long is dropped, not committed.
            was_speech = self._state == _SPEECH
            committed = self._commit(self._pos, forced=True)
            self._ring.clear()
            forced = [SpeechStopped(self._ms(self._pos)), committed] if was_speech else []
        return forced + self._advance(frame, voiced)

    def _advance(self, frame: np.ndarray, voiced: bool) -> list[VadEvent]:
        p = self.params
        start = self._pos
        self._pos += len(frame)
        if self._state == _IDLE:
            if not voiced:
                self._ring.append(frame)
                return []
            pre = list(self._ring)
            self._ring.clear()
            self._reset_segment()
            self._turn += 1
            self._frames = [*pre, frame]
            self._seg_start = start - sum(len(f) for f in pre)
            self._onset = start
            self._voiced_frames = 1
            self._last_voiced_end = self._pos
            self._state = _PENDING
            return self._maybe_confirm()
        self._frames.append(frame)
        resumed: list[VadEvent] = []
        if voiced:
            self._voiced_frames += 1
            self._unvoiced_run_ms = 0
            self._end_ms = p.max_silence_ms
            self._last_voiced_end = self._pos
            if self._tentative:
                self._tentative = False
                resumed.append(TentativeVoid(self._turn))
        else:
            self._unvoiced_run_ms += p.frame_ms
        if self._state == _PENDING:
            if self._unvoiced_run_ms >= min(PENDING_GAP_MS, p.silence_duration_ms):
                self._drop_pending()
                return []
            return self._maybe_confirm()
        # speech
        if self._unvoiced_run_ms >= self._end_ms:
            return self._end_turn()
        tentative_ms = p.tentative_ms(self.whole_padding)
        if tentative_ms is not None and not self._tentative and self._unvoiced_run_ms >= tentative_ms:
            self._tentative = True
            return [self._tentative_end()]
        return resumed

    def _end_turn(self) -> list[VadEvent]:
        pad = self.params.prefix_padding_ms * MODEL_RATE_HZ // 1000
        end = min(self._pos, self._last_voiced_end + pad)
        stopped = SpeechStopped(self._ms(self._last_voiced_end))
        return [stopped, self._commit(end, forced=False)]

    def _tentative_end(self) -> TentativeEnd:
        """The audio `_commit` would cut if the silence lasts, as far as it has come (its trailing padding may be
        incomplete: `early_prepare_ms < prefix_padding_ms`)."""
        pad = self.params.prefix_padding_ms * MODEL_RATE_HZ // 1000
        end = min(self._pos, self._last_voiced_end + pad)
        audio = np.concatenate(self._frames)[: end - self._seg_start]
        return TentativeEnd(audio, self._ms(self._seg_start), self._ms(end), self._turn)

    def _maybe_confirm(self) -> list[VadEvent]:
        p = self.params
        onset_frames = (self._pos - self._onset) // self._frame_len
        enough = self._voiced_frames * p.frame_ms >= p.min_speech_ms
        if enough and 2 * self._voiced_frames >= onset_frames:
            self._state = _SPEECH
            return [SpeechStarted(self._ms(self._onset))]
        return []

    def _drop_pending(self) -> None:
        """A candidate that never became speech: its tail becomes the new pre-roll."""
        tail = self._frames[-self._ring.maxlen :] if self._ring.maxlen else []
        self._state = _IDLE
        self._reset_segment()
        self._ring.extend(tail)

    def _commit(self, end: int, forced: bool) -> Committed:
        audio = np.concatenate(self._frames) if self._frames else np.zeros(0, dtype=np.int16)
        audio = audio[: end - self._seg_start]
        committed = Committed(audio, self._ms(self._seg_start), self._ms(end), forced)
        # Audio after `end` (trailing silence beyond the padding) seeds the next turn's pre-roll.
        leftover = np.concatenate(self._frames)[end - self._seg_start :] if self._frames else audio[:0]
        self._state = _IDLE
        self._reset_segment()
        self._ring.clear()
        # Whole frames aligned to the stream position, so the pre-roll stays contiguous with the next frame.
        n_whole = len(leftover) // self._frame_len
        for i in range(n_whole, 0, -1):
            cut = len(leftover) - i * self._frame_len
            self._ring.append(leftover[cut : cut + self._frame_len])
        return committed
