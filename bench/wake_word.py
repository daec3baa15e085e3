"""Wake-word detection on synthetic speech: `python -m bench.wake_word [--models alexa ...] [--quick]`.

The set (also used by `tests/test_wake_word.py`): espeak-ng voices `VOICES` at speeds `SPEEDS` (words per minute),
resampled to 16 kHz, 0.5 s of silence before and 1 s after each sentence, each clip clean and with pink noise mixed
in at `SNRS_DB` (signal-to-noise over the speech). For every model:
- wake clips: its phrase (from the model's own config, e.g. "Hey Mycroft") alone and before each of `COMMANDS` in one
  breath ("Alexa, what is the capital of France?"). `detected` counts clips where the model fired at least once
  after the speech began; `delay_ms` is the detection time minus the end of the phrase (the phrase spoken alone by
  the same voice and speed, trailing silence trimmed: espeak says the prefix the same way, so this is approximate).
- false triggers: detections on `ORDINARY` sentences (no wake word), on `CONFUSABLE` ones (near-misses such as
  "Alex", "Hey Jared"), and on the other models' wake clips.
- CPU: process time of `WakeWordDetector.process` per second of audio, per model (one stream), and of the session
  stage behind a wake word (`WakeGate`: detector + VAD while listening) next to the VAD alone on the same audio.
The result goes to `bench/results/wake_word-YYYYMMDD.json` (`bench.results.Record`).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.vad import TurnDetection, VadSegmenter
from assistant.audio.wake_word import WakeWordDetector, WakeWordSettings, installed_wake_words
from assistant.realtime.wake import WakeGate

VOICES = ("en-us", "en-gb+f3", "en-us+m3", "en+f4")
SPEEDS = (130, 160, 190)
SNRS_DB = (None, 20.0, 10.0)  # None = clean
COMMANDS = ("what is the capital of France?", "turn on the kitchen lights.", "what time is it?")
ORDINARY = (
    "What is the capital of France?",
    "Turn on the kitchen lights.",
    "The weather will be sunny tomorrow afternoon.",
    "Could you remind me to buy milk and bread?",
    "I think we should leave for the station at eight.",
    "My sister lives in a small town near the sea.",
    "Please play some quiet music in the living room.",
    "How many minutes does it take to boil an egg?",
    "The meeting has been moved to Thursday morning.",
    "Let me know when the laundry is done.",
)
CONFUSABLE = (
    "My friend Alex is coming over tonight.",
    "Hey, Jared, is that you?",
    "Hey, my car is making a strange noise.",
    "Okay, now let us begin.",
    "I bought a new microwave.",
    "The election is next week.",
    "Hey Travis, how are you?",
)
LEAD_MS, TAIL_MS = 500, 1000
SYNTH_TIMEOUT_S = 60.0


def speak(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """`text` said by espeak-ng as int16 at 16 kHz, without added silence."""
    import soxr

    raw = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        capture_output=True,
        check=True,
        timeout=SYNTH_TIMEOUT_S,
    ).stdout
    # espeak-ng writes a WAV header then int16 samples at 22050 Hz
    data = raw.find(b"data")
    rate_hz = int.from_bytes(raw[24:28], "little")
    pcm = np.frombuffer(raw[data + 8 :], dtype="<i2").astype(np.float32) / 32768.0
    audio = soxr.resample(pcm, rate_hz, MODEL_RATE_HZ)
    return (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype(np.int16)


def clip(speech: np.ndarray) -> np.ndarray:
    """The sentence with `LEAD_MS` of silence before and `TAIL_MS` after."""
    lead = np.zeros(MODEL_RATE_HZ * LEAD_MS // 1000, np.int16)
    tail = np.zeros(MODEL_RATE_HZ * TAIL_MS // 1000, np.int16)
    return np.concatenate([lead, speech, tail])


def speech_end_ms(speech: np.ndarray, threshold: int = 300) -> int:
    loud = np.nonzero(np.abs(speech.astype(np.int32)) > threshold)[0]
    return int(loud[-1]) * 1000 // MODEL_RATE_HZ if len(loud) else 0


def with_noise(pcm: np.ndarray, snr_db: float | None, seed: int) -> np.ndarray:
    """Pink (1/f) noise at `snr_db` below the speech's power (measured over the loud samples); None = clean."""
    if snr_db is None:
        return pcm
    x = pcm.astype(np.float64)
    loud = x[np.abs(x) > 300]
    speech_power = float(np.mean(loud**2)) if len(loud) else 1.0
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(len(x)))
    freqs = np.fft.rfftfreq(len(x))
    spectrum /= np.sqrt(np.maximum(freqs, freqs[1]))
    noise = np.fft.irfft(spectrum, len(x))
    noise *= np.sqrt(speech_power / 10 ** (snr_db / 10) / np.mean(noise**2))
    return np.clip(x + noise, -32768, 32767).astype(np.int16)


@dataclass
class Clip:
    kind: str  # "wake:<model>", "ordinary", "confusable"
    text: str
    voice: str
    speed: int
    snr_db: float | None
    pcm: np.ndarray
    phrase_end_ms: int | None = None  # wake clips: stream time where the phrase ends (approximate)

    @property
    def name(self) -> str:
        noise = "clean" if self.snr_db is None else f"{self.snr_db:g}dB"
        return f"{self.voice}/{self.speed}/{noise}: {self.text}"


def build_set(models: list[str], voices: tuple[str, ...], speeds: tuple[int, ...], snrs: tuple) -> list[Clip]:
    phrases = {m: WakeWordDetector(m).phrase for m in models}
    clips: list[Clip] = []
    seed = 0
    for voice in voices:
        for speed in speeds:
            texts: list[tuple[str, str, int | None]] = []
            for m, phrase in phrases.items():
                end_ms = LEAD_MS + speech_end_ms(speak(phrase, voice, speed))
                texts.append((f"wake:{m}", f"{phrase}.", end_ms))
                texts += [(f"wake:{m}", f"{phrase}, {c}", end_ms) for c in COMMANDS]
            texts += [("ordinary", t, None) for t in ORDINARY]
            texts += [("confusable", t, None) for t in CONFUSABLE]
            for kind, text, end_ms in texts:
                pcm = clip(speak(text, voice, speed))
                for snr in snrs:
                    seed += 1
                    clips.append(Clip(kind, text, voice, speed, snr, with_noise(pcm, snr, seed), end_ms))
    return clips


def detect(model: str, pcm: np.ndarray, chunk_ms: int = 20) -> tuple[list[int], float]:
    """Detection times (stream ms) of one fresh detector over `pcm` fed in `chunk_ms` chunks, and its CPU seconds."""
    det = WakeWordDetector(model)
    step = MODEL_RATE_HZ * chunk_ms // 1000
    t0 = time.process_time()
    found = [d.audio_end_ms for i in range(0, len(pcm), step) for d in det.process(pcm[i : i + step])]
    return found, time.process_time() - t0


def score(models: list[str], clips: list[Clip]) -> dict:
    per_model: dict[str, dict] = {}
    for m in models:
        hits, delays, cpu_s, audio_s = 0, [], 0.0, 0.0
        wake_n = false_ordinary = false_confusable = false_other = 0
        misses: list[str] = []
        false_clips: list[str] = []
        by_snr: dict[str, list[int]] = {}
        for c in clips:
            found, cpu = detect(m, c.pcm)
            cpu_s += cpu
            audio_s += len(c.pcm) / MODEL_RATE_HZ
            if c.kind == f"wake:{m}":
                wake_n += 1
                ok = any(t > LEAD_MS for t in found)
                hits += ok
                snr_key = c.name.split(":")[0].rsplit("/", 1)[1]
                by_snr.setdefault(snr_key, [0, 0])[0] += ok
                by_snr[snr_key][1] += 1
                if ok and c.phrase_end_ms is not None:
                    delays.append(min(t for t in found if t > LEAD_MS) - c.phrase_end_ms)
                if not ok:
                    misses.append(c.name)
                continue
            if found:
                false_clips.append(f"{c.kind} {c.name}")
            if c.kind == "ordinary":
                false_ordinary += len(found)
            elif c.kind == "confusable":
                false_confusable += len(found)
            else:
                false_other += len(found)
        per_model[m] = {
            "detected": hits,
            "wake_clips": wake_n,
            "detected_by_noise": {k: f"{v[0]}/{v[1]}" for k, v in by_snr.items()},
            "false_triggers_ordinary": false_ordinary,
            "false_triggers_confusable": false_confusable,
            "false_triggers_other_wake_words": false_other,
            "delay_ms_median": float(np.median(delays)) if delays else None,
            "delay_ms_range": [int(min(delays)), int(max(delays))] if delays else None,
            "cpu_ms_per_audio_s": round(cpu_s * 1000 / audio_s, 2),
            "misses": misses,
            "false_trigger_clips": false_clips,
        }
    return per_model


def stage_cpu(clips: list[Clip], model: str) -> dict:
    """CPU per second of audio of the session's stage: WakeGate (detector + VAD when listening) vs the VAD alone,
    over the same clips as one continuous stream (as a session would hear them), 20 ms chunks."""
    stream = np.concatenate([c.pcm for c in clips])
    step = MODEL_RATE_HZ * 20 // 1000
    td = TurnDetection()
    out = {}
    for name, stage in (("vad_only", VadSegmenter(td)), ("wake_gate", WakeGate(WakeWordSettings(model), td))):
        t0 = time.process_time()
        for i in range(0, len(stream), step):
            stage.feed(stream[i : i + step])
        out[name] = round((time.process_time() - t0) * 1000 / (len(stream) / MODEL_RATE_HZ), 2)
    out["audio_s"] = round(len(stream) / MODEL_RATE_HZ, 1)
    return out


def main() -> None:
    from bench.results import Record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(installed_wake_words()))
    ap.add_argument("--quick", action="store_true", help="one voice, one speed, clean only (a smoke run)")
    ap.add_argument("--notes", default="", help="written into the result file")
    args = ap.parse_args()
    record = Record("wake_word", vars(args))
    voices, speeds, snrs = (VOICES[:1], SPEEDS[1:2], SNRS_DB[:1]) if args.quick else (VOICES, SPEEDS, SNRS_DB)
    t0 = time.perf_counter()
    clips = build_set(args.models, voices, speeds, snrs)
    print(f"{len(clips)} clips synthesised in {time.perf_counter() - t0:.0f} s", flush=True)
    per_model = score(args.models, clips)
    for m, r in per_model.items():
        print(
            f"{m}: detected {r['detected']}/{r['wake_clips']} {r['detected_by_noise']}, false triggers "
            f"ordinary {r['false_triggers_ordinary']} confusable {r['false_triggers_confusable']} other wake words "
            f"{r['false_triggers_other_wake_words']}, delay median {r['delay_ms_median']} ms, "
            f"CPU {r['cpu_ms_per_audio_s']} ms per audio s",
            flush=True,
        )
    stage = stage_cpu([c for c in clips if c.snr_db is None], args.models[0])
    print(f"session stage CPU (ms per audio s): {stage}", flush=True)
    counts = {k: sum(c.kind.startswith(k) for c in clips) for k in ("wake", "ordinary", "confusable")}
    numbers = {"clips": counts, "voices": list(voices), "speeds_wpm": list(speeds), "snrs_db": list(snrs)}
    numbers |= {"models": per_model, "session_stage_cpu_ms_per_audio_s": stage}
    record.write(numbers, torch_threads=0, notes=args.notes)


if __name__ == "__main__":
    main()
