"""Wake-word detection: 16 kHz PCM16 in, detections out, stamped in stream time. Pure and synchronous.

Owns the wake-word models and their settings schema. The models are pymicro-wakeword's microWakeWord TFLite models
(Apache-2.0, inside the wheel: okay_nabu, hey_jarvis, alexa, hey_mycroft; about 6 ms of CPU per second of audio):

    names = installed_wake_words()                     # ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")
    det = WakeWordDetector("alexa")
    for d in det.process(pcm16):                       # any chunk size; int16 samples at 16 kHz
        print(d.name, d.audio_end_ms)                  # stream ms just after the audio that fired it

Time is stream time: milliseconds of audio given to `process` since the detector was made (plus `stream_offset_ms`),
so results do not depend on how fast audio arrives. The detector keeps no audio: under 10 ms of samples waiting for
a whole feature step, the feature front end's 30 ms window and the model's own streaming state.
`WakeWordSettings` is both the config's `[wake_word]` section and a session's `wake_word` (`realtime.settings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.schema import SettingError, bounds, check_fields

STEP_SAMPLES = MODEL_RATE_HZ // 100  # the feature front end takes 10 ms steps
# After a detection the same model stays quiet this long: its averaged probability stays above the cutoff for a few
# strides after the word (one utterance, one detection). wyoming-microwakeword uses the same 2 s by default.
REFRACTORY_MS = 2000
MAX_FOLLOW_UP_MS = 60000


@dataclass(frozen=True)
class WakeWordSettings:
    """A wake word before each turn: `name` is an installed model ("" = off, config only); after an answer, speech
    within `follow_up_ms` (stream time) starts a turn without it (0 = never)."""

    name: str = ""
    follow_up_ms: int = field(default=8000, metadata=bounds(0, MAX_FOLLOW_UP_MS))

    def __post_init__(self) -> None:
        check_fields(self)
        check_wake_word_name("wake_word.name", self.name, allow_off=True)


@dataclass(frozen=True)
class Detection:
    name: str  # the model that fired
    audio_end_ms: int  # stream time just after the audio that fired it: the wake word ended shortly before
    probability: float  # the model's averaged probability (above its cutoff)


def _models_dir() -> Path:
    import pymicro_wakeword

    return Path(pymicro_wakeword.__file__).resolve().parent / "models"


@cache
def installed_wake_words() -> tuple[str, ...]:
    """The wake-word models this installation has, sorted (each is `<name>.json` + `.tflite` in the wheel)."""
    return tuple(sorted(p.stem for p in _models_dir().glob("*.json") if p.with_suffix(".tflite").exists()))


@cache
def wake_phrase(name: str) -> str:
    """How the model's wake word is said ("Hey Jarvis"), from its config in the wheel (no model loaded)."""
    check_wake_word_name("wake_word", name)
    return str(json.loads((_models_dir() / f"{name}.json").read_text(encoding="utf-8"))["wake_word"])


def check_wake_word_name(key: str, name: str, allow_off: bool = False) -> None:
    """Raise `SettingError` naming the installed models when `name` is not one of them ("" passes if `allow_off`)."""
    if allow_off and name == "":
        return
    names = installed_wake_words()
    if name not in names:
        off = ' or "" (off)' if allow_off else ""
        raise SettingError(key, f"an installed wake word: one of {', '.join(names)}{off}", repr(name))


class WakeWordDetector:
    """One model over one audio stream. `process` returns the detections the given samples caused."""

    def __init__(self, name: str, stream_offset_ms: int = 0) -> None:
        check_wake_word_name("wake_word", name)
        from pymicro_features import MicroFrontend
        from pymicro_wakeword import MicroWakeWord, Model

        self.name = name
        self._model = MicroWakeWord.from_builtin(Model(name))
        self.phrase: str = self._model.wake_word  # how it is said, e.g. "Hey Jarvis"
        self.cutoff: float = self._model.probability_cutoff
        self._frontend = MicroFrontend()
        self._rest = np.zeros(0, dtype=np.int16)  # < one 10 ms step
        self._offset_ms = stream_offset_ms
        self._samples = 0  # samples consumed by the front end
        self._quiet_until_ms = -REFRACTORY_MS

    @property
    def position_ms(self) -> int:
        """Stream time of the end of all audio given so far."""
        return self._ms(self._samples + len(self._rest))

    def _ms(self, samples: int) -> int:
        return self._offset_ms + samples * 1000 // MODEL_RATE_HZ

    def process(self, pcm: np.ndarray) -> list[Detection]:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"expected a 1-D int16 array at 16 kHz, got dtype {pcm.dtype} with shape {pcm.shape}")
        data = np.concatenate([self._rest, pcm]) if len(self._rest) else pcm
        found: list[Detection] = []
        i = 0
        while i + STEP_SAMPLES <= len(data):
            out = self._frontend.process_samples(data[i : i + STEP_SAMPLES].tobytes())
            if out.samples_read <= 0:  # never seen; guards the loop
                raise RuntimeError(f"the wake-word feature front end read {out.samples_read} samples of a 10 ms step")
            i += out.samples_read
            self._samples += out.samples_read
            if out.features:
                # The model runs every `stride` feature steps and returns its probability averaged over its sliding
                # window (0.0 in between and until the window is full).
                prob = self._model.process_streaming_prob(np.asarray(out.features).reshape(1, 1, -1))
                end_ms = self._ms(self._samples)
                if prob is not None and prob > self.cutoff and end_ms >= self._quiet_until_ms:
                    self._quiet_until_ms = end_ms + REFRACTORY_MS
                    found.append(Detection(self.name, end_ms, round(prob, 4)))
        self._rest = data[i:].copy()
        return found
