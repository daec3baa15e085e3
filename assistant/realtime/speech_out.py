"""Spoken answers in the session core (sans-I/O): one `SpeechOut` per audio response decides what is said, when and
in which order. The session (`session.py`) creates it when an audio response starts and feeds it the engine's text
and the voice's results; it returns protocol events and commands like the session does.

    speech = SpeechOut(events, response_id, item_id, settings.audio_out, now_s, committed_at_s)
    out = speech.on_text(delta, now_s)        # [Speak(...)] for each clause completed by this text, events
    out = speech.on_result(ClauseSpoken(...) | SpeechFailed(...), now_s)   # transcript + audio deltas, in order
    out = speech.on_text_done(now_s)          # the rest of the text is the last clause
    speech.complete                           # every clause sent: the response may end
    out = speech.cancel()                     # [CancelSpeech]: nothing more is sent
    speech.transcript(), speech.pieces()      # what was said (truncated to `heard_ms` when the client said so)

What it owns:
- clause splitting of the streamed text (`speech_text.ClauseSplitter`) and one `Speak` per clause with words, as
  soon as that clause is complete, so synthesis overlaps with decoding;
- the order the client sees, whatever order syntheses finish in: per clause, its transcript delta, then its audio
  in deltas of at most `AUDIO_CHUNK_MS` (PCM16 or G.711 at the session's rate);
- text that cannot be spoken (no voice for its language, synthesis failed) is still sent: its transcript delta
  carries the `no_audio` extension `{code, message, language?}` saying why (never silence);
- cancel stops at once: no delta after `cancel()`, unsynthesised clauses are dropped (`CancelSpeech`);
- the end: the final status (a stopped answer is cancelled) and what goes back to the engine's history
  (`TruncateReply` with what was said, when that is less than the text decoded);
- latency facts for `response.done.timings_ms`: `first_clause`, `first_audio` (ms after the response started),
  `synthesis` (ms the first spoken clause took to synthesise) and `audio` (ms of audio sent).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from assistant.audio import g711
from assistant.audio.speech_text import ClauseSplitter, has_words, heard_text, no_voice_reason, text_language
from assistant.realtime import commands as C
from assistant.realtime.events import EventFactory
from assistant.realtime.settings import AudioOutput

if TYPE_CHECKING:
    from assistant.engine.api import ResponseDone

AUDIO_CHUNK_MS = 100  # audio per delta (6.4 kB of base64 at 24 kHz): small messages, a client may play the first

Output = dict[str, Any] | C.EngineCommand | C.FirstAudio


@dataclass
class _Clause:
    text: str  # exactly as streamed: the transcript delta
    pcm: np.ndarray | None = None  # int16 at the session's rate, until sent
    audio_ms: int = 0
    ready: bool = False  # synthesised, failed, or has nothing to synthesise
    no_audio: dict[str, str] | None = None


class SpeechOut:
    def __init__(
        self,
        events: EventFactory,
        response_id: str,
        item_id: str,
        out: AudioOutput,
        now_s: float,
        committed_at_s: float | None = None,
    ) -> None:
        self.events = events
        self.response_id = response_id
        self.item_id = item_id
        self.out = out
        self.heard_ms: int | None = None  # conversation.item.truncate during the answer: what the listener heard
        self._splitter = ClauseSplitter(first_clause_chars=out.first_clause_chars)
        self._clauses: list[_Clause] = []
        self._sent = 0  # clauses sent to the client, in order
        self._carry = ""  # whitespace streamed between two clauses: it opens the next one
        self._text_done = False
        self._stopped = False
        self._t0_s = now_s
        self._committed_at_s = committed_at_s
        self._marks_ms: dict[str, float] = {}

    # ---- inputs --------------------------------------------------------------------------------------------------
    def on_text(self, delta: str, now_s: float) -> list[Output]:
        if self._stopped or self._text_done:
            return []
        return self._add(self._splitter.feed_raw(delta), now_s)

    def on_text_done(self, now_s: float) -> list[Output]:
        if self._stopped or self._text_done:
            return []
        out = self._add(self._splitter.flush_raw(), now_s)
        self._text_done = True
        return out

    def on_result(self, res: C.ClauseSpoken | C.SpeechFailed, now_s: float) -> list[Output]:
        if self._stopped or not 0 <= res.index < len(self._clauses) or self._clauses[res.index].ready:
            return []
        clause = self._clauses[res.index]
        clause.ready = True
        if isinstance(res, C.SpeechFailed):
            clause.no_audio = {"code": "speech_failed", "message": f"the voice failed on this text: {res.message}"}
        else:
            clause.pcm = np.frombuffer(res.pcm, dtype="<i2")
            clause.audio_ms = len(clause.pcm) * 1000 // self.out.rate_hz
            self._marks_ms.setdefault("synthesis", round(res.synth_ms, 3))
        return self._release(now_s)

    def finish(self, done: ResponseDone, cancel_reason: str | None) -> tuple[ResponseDone, list[Output]]:
        """The answer ends (the engine finished and the audio is sent, or it was stopped): the response's final
        `done` (cancelled when it was stopped, even if the engine had finished the text) and the commands that
        follow: `CancelSpeech` for clauses never sent, `TruncateReply` when less was said than decoded."""
        out = [] if self.complete else self.cancel()
        if cancel_reason is not None and done.status in ("completed", "incomplete"):
            done = dataclasses.replace(done, status="cancelled", reason=cancel_reason)
        if done.status == "cancelled" or self.heard_ms is not None:
            said = self.transcript()
            if said != done.text:
                out.append(C.TruncateReply(self.response_id, said))
        return done, out

    def cancel(self) -> list[Output]:
        """Stop: nothing more is sent; clauses not synthesised yet are dropped."""
        if self._stopped:
            return []
        self._stopped = True
        for c in self._clauses:
            c.pcm = None
        return [C.CancelSpeech(self.response_id)]

    # ---- queries -------------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The text is done and every clause was sent (or the answer was stopped)."""
        return self._stopped or (self._text_done and self._sent == len(self._clauses))

    def pieces(self) -> list[tuple[str, int]]:
        """What was sent, clause by clause: (text as streamed, ms of audio; 0 = text without audio)."""
        return [(c.text, c.audio_ms) for c in self._clauses[: self._sent]]

    @property
    def audio_ms(self) -> int:
        return sum(ms for _, ms in self.pieces())

    def transcript(self) -> str:
        """What was said: every clause sent, or the part heard when the client truncated the answer."""
        if self.heard_ms is not None:
            return heard_text(self.pieces(), self.heard_ms)
        return "".join(text for text, _ in self.pieces()).strip()

    def timings_ms(self) -> dict[str, float]:
        return {**self._marks_ms, "audio": float(self.audio_ms)}

    # ---- internals -----------------------------------------------------------------------------------------------
    def _add(self, pieces: list[str], now_s: float) -> list[Output]:
        out: list[Output] = []
        ao = self.out
        for raw in pieces:
            text, self._carry = self._carry + raw, ""
            if not text.strip():
                self._carry = text
                continue
            index = len(self._clauses)
            clause = _Clause(text)
            self._clauses.append(clause)
            self._marks_ms.setdefault("first_clause", self._ms_since_start(now_s))
            reason = no_voice_reason(text, ao.voice, ao.voices)
            if reason is not None:
                clause.ready = True
                clause.no_audio = {"code": "no_voice_for_language", "language": text_language(text), "message": reason}
            elif not has_words(text):
                clause.ready = True  # nothing to pronounce ("...", symbols): its text goes out without audio
            else:
                out.append(C.Speak(self.response_id, index, text, ao.voice, ao.speed, ao.rate_hz))
        return out + self._release(now_s)

    def _release(self, now_s: float) -> list[Output]:
        """Send every clause that is ready and has all earlier clauses sent."""
        out: list[Output] = []
        where = {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        while not self._stopped and self._sent < len(self._clauses) and self._clauses[self._sent].ready:
            clause = self._clauses[self._sent]
            delta = self.events.transcript_event("delta", **where, delta=clause.text)
            if clause.no_audio is not None:
                delta["no_audio"] = clause.no_audio
            out.append(delta)
            if clause.pcm is not None and len(clause.pcm):
                if "first_audio" not in self._marks_ms:
                    self._marks_ms["first_audio"] = self._ms_since_start(now_s)
                    if self._committed_at_s is not None:
                        out.append(C.FirstAudio(max(0.0, now_s - self._committed_at_s)))
                out.extend(self.events.audio_event("delta", **where, delta=d) for d in self._encoded(clause.pcm))
            clause.pcm = None
            self._sent += 1
        return out

    def _encoded(self, pcm: np.ndarray) -> list[str]:
        step = self.out.rate_hz * AUDIO_CHUNK_MS // 1000
        fmt = self.out.format
        chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
        raw = [c.astype("<i2").tobytes() if fmt == "pcm16" else g711.encode(c, fmt) for c in chunks]
        return [base64.b64encode(b).decode("ascii") for b in raw]

    def _ms_since_start(self, now_s: float) -> float:
        return round(max(0.0, now_s - self._t0_s) * 1000.0, 3)
