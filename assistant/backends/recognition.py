"""Speech recognition of user turns for the backends that hear through Whisper (`embedded`, `openai` transcript).

Owns which Whisper hears a turn and in which language:
- `[embedded] whisper` hears every turn; told no language it detects one per turn (a multilingual model);
- a turn told it is English (its `Utterance.language`, a client's transcription language, else `[embedded]
  language`) is heard by `[embedded] whisper_english` when that is set and another model: an English-only Whisper
  needs no language detection and runs twice as fast as base (bench/results/asr_peers-20261203-language.json:
  0.64 s against 1.41 s p50, WER 0.090 against 0.146 there; on the answer-quality set WER 0.186 against 0.192 and
  29 of 48 single questions right against 31, bench/results/quality-20261203-told-en.json);
- a turn told another language is heard in it by `whisper`; one the models do not know is refused with the codes;
- a turn is heard after the client's prompt (`Utterance.prompt`, OpenAI's `transcription.prompt`) and, with
  `[embedded] whisper_previous_text`, after what the user said before it (`Utterance.previous_text`, which the engine
  fills from the conversation): Whisper's previous-text prompt; `whisper_beam_size` sets the decoding.
Worker thread only (the transcribers hold torch state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.audio.speech_text import language_code
from assistant.backends.base import PreparedTurn, Steps, Utterance
from assistant.config import EmbeddedConfig
from assistant.models.device import resolve_dtype
from assistant.models.whisper import WhisperTranscriber

ENGLISH = "en"


@dataclass
class Recognisers:
    """`main` hears every turn not routed to `english` (turns told they are English, when `english` is loaded)."""

    main: WhisperTranscriber
    english: WhisperTranscriber | None = None
    language: str = ""  # `[embedded] language`: what a turn that names none is told ("" = detected)
    previous_text: bool = False  # `[embedded] whisper_previous_text`: the engine tells each turn what was said before

    def __post_init__(self) -> None:
        if self.language:
            try:
                self.language_of(Utterance(key="", language=self.language))
            except ValueError as e:
                raise ValueError(f'[embedded] language: {e}; set it to one of those or to "" (detect)') from None

    @property
    def languages(self) -> tuple[str, ...]:
        """The codes a turn may be told (`Backend.languages`)."""
        extra = (ENGLISH,) if self.english is not None and ENGLISH not in self.main.languages() else ()
        return self.main.languages() + extra

    def language_of(self, utt: Utterance) -> str | None:
        """The language `utt` is heard in: its own, else the configured one, else None (detected); checked."""
        told = utt.language or self.language or None
        if told is None:
            return None
        code = language_code(told)
        if code == ENGLISH and self.english is not None:
            return code
        self.main.language_token(code)  # raises, naming the codes it knows
        return code

    @staticmethod
    def heard_audio(audio: np.ndarray) -> np.ndarray:
        """What every model here takes of `audio` (`WhisperTranscriber.speech`: the speech with a fixed margin)."""
        return WhisperTranscriber.speech(audio)

    @staticmethod
    def previous_text_of(utt: Utterance) -> str:
        """What Whisper is told came before `utt`: the client's prompt, then what the user said before it (which the
        engine fills only when `previous_text` is on: the backends' `hears_previous_text`)."""
        return " ".join(s.strip() for s in (utt.prompt, utt.previous_text) if s.strip())

    def for_language(self, language: str | None) -> WhisperTranscriber:
        return self.english if language == ENGLISH and self.english is not None else self.main


def load_transcriber(whisper_dir: Path, device, beam_size: int = 1) -> WhisperTranscriber:
    """Whisper from the weights cache, in the dtype the device runs best."""
    return WhisperTranscriber.load(whisper_dir, resolve_dtype("auto", device, "whisper"), str(device), beam_size)


def load_recognisers(whisper_dir: Path, english_dir: Path | None, device, embedded: EmbeddedConfig) -> Recognisers:
    """The recognisers `[embedded]` configures (the directories: `assistant.weights.cache.PreparedPaths`), each
    decoding with `whisper_beam_size`, told the text said before when `whisper_previous_text`; a wrong `language`
    stops the start."""
    beam = embedded.whisper_beam_size
    english = load_transcriber(english_dir, device, beam) if english_dir is not None else None
    main = load_transcriber(whisper_dir, device, beam)
    return Recognisers(main, english, embedded.language, embedded.whisper_previous_text)


def transcribed_turns(recognisers: Recognisers | None, utterances: list[Utterance], backend: str) -> Steps:
    """Whisper's transcript of every utterance with audio, in bounded steps; typed text alone is the user message
    as-is, and with both the typed text follows the transcript on a new line (an instruction about what was said)."""
    spoken = [u for u in utterances if u.audio is not None and len(u.audio) > 0]
    if spoken and recognisers is None:
        raise ValueError(f"this {backend} backend was built without Whisper and cannot take audio")
    heard = {}
    if spoken:
        told = [recognisers.language_of(u) for u in spoken]  # every one checked before any work
        for k, model in enumerate(dict.fromkeys(recognisers.for_language(lang) for lang in told)):
            if k:
                yield  # each model's work is its own steps
            group = [(u, lang) for u, lang in zip(spoken, told, strict=True) if recognisers.for_language(lang) is model]
            before = [recognisers.previous_text_of(u) for u, _ in group]
            audios, languages = [u.audio for u, _ in group], [x for _, x in group]
            results = yield from model.transcribe_steps(audios, languages=languages, previous=before)
            heard |= {u.key: r for (u, _), r in zip(group, results, strict=True)}
    turns = []
    for u in utterances:
        r = heard.get(u.key)
        if r is None:
            turns.append(PreparedTurn(key=u.key, user_text=(u.text or "").strip()))
            continue
        user_text = "\n".join(s for s in (r.text, (u.text or "").strip()) if s)
        turns.append(
            PreparedTurn(
                key=u.key, user_text=user_text, transcript=r.text, language=r.language or None, audio_s=u.audio_s
            )
        )
    return turns
