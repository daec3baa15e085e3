"""The answer-quality set (`bench/quality_set.toml`): its items, the spoken clip of each turn, and the scoring rules.
Used by `bench/quality.py` (the run) and `tests/test_quality.py` (the regression floor).

    items = load_set()                                   # every item, in file order
    items = select(items, split="tune", subset=10)       # the first 10 of each kind in the tune split
    clip = clip_for("d03", 1, "Which city do I live in?")  # voice, speed, leading silence: fixed per (item, turn)
    audio = clip_audio(clip, cache_dir)                  # 16 kHz float32, synthesised once then cached
    answer_correct("It is Paris.", ("Paris",))           # True
    word_errors("What is two plus three?", "What's 2 + 3?")  # (edits, reference words) after normalisation

Text is compared after Whisper's English normaliser (`transformers`' EnglishTextNormalizer: case, punctuation,
contractions, number words to digits, British spellings are left as they are), so "seven" and "7" are one answer and a
transcript "What is 2 plus 3" has no errors against "What is two plus three?".
"""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.spoken_set import synthesize

SET_PATH = Path(__file__).resolve().parent / "quality_set.toml"
SPLITS = ("tune", "held_out")
KINDS = ("single", "followup")  # [[single]] and [[dialogue]] items of the file
# The speaking conditions; each clip takes one of each, chosen by a hash of (item id, turn), so a clip never changes
# when items are added. espeak-ng voices (gmw data, no mbrola), words per minute, silence before the speech.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp+f2", "en-us+m3")
WPMS = (140, 160, 175)
LEAD_SILENCE_MS = (0, 0, 0, 800, 2000)
RATE_HZ = 16000


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # one of KINDS
    split: str  # one of SPLITS
    say: tuple[str, ...]  # the spoken turns; the last one's answer is scored
    accept: tuple[str, ...]  # accepted answers: any one of them, as whole words, in the answer
    needs: str = ""  # follow-ups: what the last answer needs from an earlier turn (name, place, ellipsis, ...)


def load_set(path: Path = SET_PATH) -> list[Item]:
    """Every item of the set file, singles first, each checked (unique id, known split, 1 or 2-3 turns, answers)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    items: list[Item] = []
    for table, kind in (("single", "single"), ("dialogue", "followup")):
        for raw in data.get(table, []):
            say = (raw["say"],) if isinstance(raw["say"], str) else tuple(raw["say"])
            item = Item(raw["id"], kind, raw["split"], say, tuple(raw["accept"]), raw.get("needs", ""))
            turns_ok = len(say) == 1 if kind == "single" else 2 <= len(say) <= 3
            if item.split not in SPLITS or not turns_ok or not item.accept or not all(say):
                raise ValueError(
                    f"{path}: item {item.id!r} is malformed: expected split in {SPLITS}, "
                    f"{'one turn' if kind == 'single' else '2-3 turns'} and accepted answers; got {raw!r}"
                )
            items.append(item)
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: item ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    return items


def select(
    items: list[Item], split: str | None = None, subset: int | None = None, ids: list[str] | None = None
) -> list[Item]:
    """Items of one split (None: both), then the first `subset` of each kind, or exactly `ids` (in file order)."""
    if ids is not None:
        unknown = set(ids) - {i.id for i in items}
        if unknown:
            raise ValueError(f"unknown item ids {sorted(unknown)}; the set has {items[0].id}..{items[-1].id}")
        return [i for i in items if i.id in ids]
    chosen = [i for i in items if split is None or i.split == split]
    if subset is not None:
        chosen = [i for kind in KINDS for i in [j for j in chosen if j.kind == kind][:subset]]
    return chosen


@dataclass(frozen=True)
class Clip:
    text: str
    voice: str
    wpm: int
    lead_ms: int  # silence before the speech


def clip_for(item_id: str, turn: int, text: str) -> Clip:
    h = zlib.crc32(f"{item_id}/{turn}".encode())
    v, h = h % len(VOICES), h // len(VOICES)
    w, h = h % len(WPMS), h // len(WPMS)
    return Clip(text, VOICES[v], WPMS[w], LEAD_SILENCE_MS[h % len(LEAD_SILENCE_MS)])


@functools.cache
def espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()


def clip_audio(clip: Clip, cache_dir: Path) -> np.ndarray:
    """The clip as 16 kHz mono float32: espeak-ng's speech (cached by voice, speed, text and espeak-ng version)
    after `lead_ms` of digital silence."""
    from assistant.audio.io import load_audio

    key = hashlib.sha256(f"{espeak_version()}|{clip.voice}|{clip.wpm}|{clip.text}".encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.wav"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"{key}.partial.wav"
        synthesize(clip.text, tmp, voice=clip.voice, wpm=clip.wpm)
        tmp.rename(path)  # a clip interrupted mid-write is never taken from the cache
    speech = load_audio(str(path))  # always from the file: a first run hears the same 16-bit samples as a later one
    return np.concatenate([np.zeros(RATE_HZ * clip.lead_ms // 1000, dtype=np.float32), speech])


@functools.cache
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def normalize(text: str) -> list[str]:
    """Whisper's English normaliser, words. Brackets become spaces first: the normaliser drops bracketed text, and
    "Beijing (Peking)" must keep both names."""
    return _normalizer()(re.sub(r"[()\[\]{}<>]", " ", text)).split()


def answer_correct(answer: str, accept: tuple[str, ...]) -> bool:
    """Any accepted answer, normalised, as a run of whole words of the normalised answer ("au" never matches
    "because"; "blue whale" needs both words in order)."""
    words = normalize(answer)
    for form in accept:
        want = normalize(form)
        if want and any(words[i : i + len(want)] == want for i in range(len(words) - len(want) + 1)):
            return True
    return False


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference) after normalising both: WER = e / n."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))  # Levenshtein over words, one row at a time
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)
