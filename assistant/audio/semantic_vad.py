"""Semantic turn detection: how much silence ends a turn, decided from the words heard so far and the `eagerness`.

OpenAI's `semantic_vad` ends a turn sooner when the user sounds done and waits longer when they trail off
mid-phrase; `eagerness` `high` answers soonest, `low` waits longest (`auto` = `medium`), with OpenAI's longest waits
of 2, 4 and 8 s. Here the words come from the turn's own speculative transcription: when the trailing silence
reaches `VadParams.tentative_ms()`, the session core starts the turn's audio work (`Speculate`), the engine reports
the transcript of exactly the audio the turn would commit, and `end_silence_ms(transcript, eagerness)` sets how much
silence ends this turn (the segmenter waits `max_silence_ms` until then). A backend without a transcript (the
Qwen-Audio and vLLM audio backends hear audio, not words) gets the `unclear` wait.

The words are judged by their ending: a sentence mark (`.`, `?`, `!`) after a word that does not call for more is
`complete`; a trailing comma, dash or ellipsis, or a last word that leaves the phrase open ("and", "the", "of",
"because", "um", ...) is `incomplete`; anything else is `unclear`. English only: other languages get `complete` or
`unclear` by their punctuation alone.
"""

from __future__ import annotations

import re
from typing import Literal

Eagerness = Literal["low", "medium", "high", "auto"]
Ending = Literal["complete", "unclear", "incomplete"]

# eagerness -> silence (ms) that ends a turn whose words are complete / unclear / incomplete. `incomplete` is
# OpenAI's longest wait per eagerness; `complete` never waits less than the speculation point (300 ms by default).
WAITS_MS: dict[str, dict[Ending, int]] = {
    "high": {"complete": 300, "unclear": 800, "incomplete": 2000},
    "medium": {"complete": 500, "unclear": 1200, "incomplete": 4000},
    "low": {"complete": 1000, "unclear": 2500, "incomplete": 8000},
}
# The speculation point of a semantic turn when the session's `early_prepare_ms` is 0 (it needs the words).
SEMANTIC_EARLY_PREPARE_MS = 200

_OPEN_WORDS = frozenset(
    "and or but nor so because since although though unless until while whereas if whether that which who whom whose "
    "where when than then the a an this these those my your his her its our their some any every no to of in on at "
    "for with from by about into onto over under between through after before during like as is are was were am be "
    "been being do does did have has had can could will would shall should may might must not very really "
    "i i'm we you he she they it's what's there's um uh er erm hmm".split()
)
_TRAILING_OPEN = ("...", "…", ",", ";", ":", "-", "–", "—")


def _wait_key(eagerness: str) -> str:
    return "medium" if eagerness == "auto" else eagerness


def max_silence_ms(eagerness: str) -> int:
    """The longest silence a semantic turn waits (before its words are known, or when they are incomplete)."""
    return WAITS_MS[_wait_key(eagerness)]["incomplete"]


def ending(transcript: str | None) -> Ending:
    text = (transcript or "").strip()
    if not text:
        return "unclear"
    if text.endswith(_TRAILING_OPEN):
        return "incomplete"
    words = re.findall(r"[\w']+", text.lower())
    if words and words[-1] in _OPEN_WORDS:
        return "incomplete"
    return "complete" if text[-1] in ".?!。？！" else "unclear"


def end_silence_ms(transcript: str | None, eagerness: str) -> int:
    """The silence that ends a turn whose words so far are `transcript` (None: no words from this backend)."""
    return WAITS_MS[_wait_key(eagerness)][ending(transcript)]
