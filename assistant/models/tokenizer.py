"""The Qwen tiktoken tokenizer: `qwen.tiktoken` ranks, every special token, NFC, audio tags in user text.

Owns the byte-level BPE of the QWen family (151643 ranked tokens in `qwen.tiktoken`) plus a list of special tokens
numbered from 151643 on. `QwenTokenizer.for_qwen_audio(path)` builds the Qwen-Audio-Chat list of QWEN_AUDIO.md §5
(155165 ids); another model of the family (Qwen2.5: different specials after 151645) passes its own list to the
constructor and gets the same behaviour.

Plain `encode(text)` never parses special tokens: a user typing `<|im_start|>` gets ordinary text tokens, which is
what a chat prompt needs for system text and history. `encode_with_audio(text, span_of)` additionally parses
`<audio>URL</audio>` tags (user text only) and writes each as `[<audio>] + [AUDIO_PAD] * (span - 2) + [</audio>]`,
the URL dropped; `span_of(url)` gives the span length of that audio (its embeddings replace the whole run).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKED = 151643  # lines in qwen.tiktoken; the first special id

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<audio>", "</audio>", "[[[AUDIO:modality]]]"
_AUDIO_TAG = re.compile(r"<audio>(.*?)</audio>", re.DOTALL)


def qwen_audio_specials() -> list[str]:
    """The Qwen-Audio special tokens in id order from 151643 (QWEN_AUDIO.md §5); 3522 names, last id 155164."""
    s = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)]
    s += [AUDIO_PAD, "<|startoftranscript|>", "<|startofanalysis|>", "<|translate|>", "<|transcribe|>"]
    s += ["<|caption|>", "<|keyword|>", "<|unknown|>"]
    s += [f"<|{lang}|>" for lang in ("en", "zh", "de", "es", "ko", "fr", "ja", "it")]
    s += ["<|zh_tr|>", "<|notimestamps|>", "<|sil|>", "<|timestamps|>"]
    s += [f"<|{i / 100:.2f}|>" for i in range(3001)]  # <|0.00|> .. <|30.00|>, 10 ms apart
    s += ["<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>"]
    s += ["<|itn|>", "<|wo_itn|>"]
    s += ["<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>"]
    s += ["<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>"]
    s += ["<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>", "<|pitch|>"]
    s += [f"<|midi_pitch_{i}|>" for i in range(128)] + ["<|velocity|>"]
    s += [f"<|midi_velocity_{i}|>" for i in range(128)]
    s += ["<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>"]
    s += ["<|choice|>", "<|scene|>", "<|event|>", "<|vocal_classification|>", "<|speech_understanding|>"]
    s += ["<|scenario|>", "<|action|>", "<|entities|>", "<|speech_edit|>", AUDIO_START, AUDIO_END]
    return s


def find_tiktoken_file(checkpoint_dir: str | Path | None = None) -> Path:
    """`qwen.tiktoken` beside the checkpoint, else the copy in the `dashscope==2.0.2` wheel (found, never imported)."""
    tried = []
    if checkpoint_dir is not None:
        cand = Path(checkpoint_dir) / "qwen.tiktoken"
        if cand.is_file():
            return cand
        tried.append(str(cand))
    spec = importlib.util.find_spec("dashscope")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        cand = Path(loc) / "resources" / "qwen.tiktoken"
        if cand.is_file():
            return cand
        tried.append(str(cand))
    raise FileNotFoundError(
        f"qwen.tiktoken not found (looked at: {', '.join(tried) or 'no candidates'}); put it beside the checkpoint "
        "or run `pip install --no-deps dashscope==2.0.2`"
    )


def load_ranks(path: str | Path, expected_sha256: str | None = TIKTOKEN_SHA256) -> dict[bytes, int]:
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"{path}: sha256 {digest}, expected {expected_sha256}; the tokenizer file is not Qwen's")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@dataclass(frozen=True)
class AudioTag:
    """Where one `<audio>URL</audio>` landed in the ids: positions start..end-1 (both tags included)."""

    start: int
    end: int
    url: str


class QwenTokenizer:
    """tiktoken over `ranks` with `specials` numbered from len(ranks); implements backends.base.Tokenizer."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        specials: list[str],
        stop_tokens: tuple[str, ...] = (IM_END, IM_START, ENDOFTEXT),
        eos_token: str = ENDOFTEXT,
        pattern: str = QWEN_PATTERN,
        name: str = "qwen",
    ):
        first = len(ranks)
        self.special_ids = {tok: first + i for i, tok in enumerate(specials)}
        if len(self.special_ids) != len(specials):
            raise ValueError("special token list has duplicates")
        self.special_tokens = {i: tok for tok, i in self.special_ids.items()}
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_ids)
        self.n_valid = first + len(specials)
        self.eos_id = self.special_ids[eos_token]
        self.stop_ids = frozenset(self.special_ids[t] for t in stop_tokens)
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        # Audio tags exist only in the Qwen-Audio list; other lists get None and cannot parse `<audio>` tags.
        self.audio_start_id = self.special_ids.get(AUDIO_START)
        self.audio_end_id = self.special_ids.get(AUDIO_END)
        self.audio_pad_id = self.special_ids.get(AUDIO_PAD)
        self._special_bytes = {i: tok.encode("utf-8") for i, tok in self.special_tokens.items()}

    @classmethod
    def for_qwen_audio(cls, checkpoint_dir: str | Path | None = None) -> QwenTokenizer:
        return cls(load_ranks(find_tiktoken_file(checkpoint_dir)), qwen_audio_specials())

    def encode(self, text: str) -> list[int]:
        """NFC-normalised text to ids; special-token text is encoded as ordinary text."""
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def encode_with_audio(self, text: str, span_of: Callable[[str], int | None]) -> tuple[list[int], list[AudioTag]]:
        """Like `encode`, but each `<audio>URL</audio>` becomes `<audio>` + pads + `</audio>`, `span_of(URL)` ids.
        A tag whose `span_of(URL)` is None (no such audio, e.g. typed by the user) stays ordinary text."""
        if self.audio_start_id is None or self.audio_end_id is None or self.audio_pad_id is None:
            raise ValueError(
                "this tokenizer has no audio tags (<audio>, </audio>, [[[AUDIO:modality]]]) in its specials"
            )
        ids: list[int] = []
        tags: list[AudioTag] = []
        pos = 0
        text = unicodedata.normalize("NFC", text)
        for m in _AUDIO_TAG.finditer(text):
            span = span_of(m.group(1))
            if span is None:
                continue
            ids += self.encode(text[pos : m.start()])
            if span < 2:
                raise ValueError(f"audio span of {m.group(1)!r} must be >= 2 (bos and eos), got {span}")
            tags.append(AudioTag(len(ids), len(ids) + span, m.group(1)))
            ids += [self.audio_start_id] + [self.audio_pad_id] * (span - 2) + [self.audio_end_id]
            pos = m.end()
        ids += self.encode(text[pos:])
        return ids, tags

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of `ids`, special tokens written as their text (`<|2.33|>`); ids >= n_valid are an error."""
        out = bytearray()
        run: list[int] = []
        for i in ids:
            if i in self._special_bytes:
                if run:
                    out += self._enc.decode_bytes(run)
                    run = []
                out += self._special_bytes[i]
            elif 0 <= i < self.n_valid:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the tokenizer (0..{self.n_valid - 1})")
        if run:
            out += self._enc.decode_bytes(run)
        return bytes(out)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
