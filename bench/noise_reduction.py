"""Does a session's `noise_reduction` help the recogniser? espeak-ng questions (bench/asr_set.py) in white and brown
noise at several signal-to-noise ratios, transcribed by our Whisper base with no noise reduction, `near_field` and
`far_field` (WebRTC noise suppression, `assistant.audio.denoise`, fed in 20 ms chunks as a session's audio is);
word errors against the text spoken. Clean clips are the reference point.

    python -m bench.noise_reduction [--questions 6] [--snrs 10,5,0]    # -> bench/results/noise_reduction-DATE.json
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.asr_set import clips, word_errors, words
from bench.results import Record

CHUNK = 320  # 20 ms at 16 kHz, as a client streams
LEAD_S, TRAIL_S = 0.8, 1.0  # noise alone before the speech: the suppressor's noise estimate settles in it
VOICES = (("en-us", 150), ("en+f3", 175))
MODES = ("none", "near_field", "far_field")


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise: `white` (hiss) or `brown` (a rumble: fans, traffic; integrated white noise, high-passed)."""
    x = rng.standard_normal(n)
    if kind == "brown":
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(400) / 400, mode="same")  # keep it stationary: no drift below ~40 Hz
    return x / np.sqrt(np.mean(x**2))


def noisy(speech: np.ndarray, kind: str, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`speech` (float32 16 kHz) padded with silence and mixed with noise at `snr_db` (speech RMS over its voiced
    part vs noise RMS), on the int16 grid as a PCM16 stream carries it."""
    lead, trail = np.zeros(int(LEAD_S * 16000)), np.zeros(int(TRAIL_S * 16000))
    voiced = speech[np.abs(speech) > 0.01]
    speech_rms = np.sqrt(np.mean(voiced**2)) if len(voiced) else 0.1
    clean = np.concatenate([lead, speech, trail])
    mixed = clean + noise(kind, len(clean), rng) * speech_rms / 10 ** (snr_db / 20)
    return (np.clip(mixed, -1, 1 - 1 / 32768) * 32768).astype(np.int16)


def denoised(pcm: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return pcm
    from assistant.audio.denoise import Denoiser

    d = Denoiser(mode)  # type: ignore[arg-type]
    return np.concatenate([d.process(pcm[i : i + CHUNK]) for i in range(0, len(pcm), CHUNK)])


def transcriber():
    from assistant.backends.base import run_steps
    from assistant.config import load_config
    from assistant.models.whisper import WhisperTranscriber
    from assistant.weights.cache import default_cache_dir, prepare_source
    from assistant.weights.sources import WHISPER_SOURCES

    tr = WhisperTranscriber.load(prepare_source(WHISPER_SOURCES["base"], default_cache_dir(load_config())))

    def run(pcm: np.ndarray) -> str:
        [r] = run_steps(tr.transcribe_steps([pcm.astype(np.float32) / 32768.0]))
        return r.text

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=6, help="questions of the spoken set (each in 2 voices)")
    ap.add_argument("--snrs", default="10,5,0", help="signal-to-noise ratios in dB, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    snrs = [float(s) for s in args.snrs.split(",")]
    record = Record("noise_reduction", {**vars(args), "voices": VOICES, "lead_s": LEAD_S, "trail_s": TRAIL_S})

    import torch

    torch.set_num_threads(args.threads)
    run = transcriber()
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    for clip in clips(args.questions, VOICES):
        ref_words = len(words(clip.text))
        conditions = [("clean", None)] + [(kind, snr) for kind in ("white", "brown") for snr in snrs]
        for kind, snr in conditions:
            if snr is None:
                pcm = (np.concatenate([np.zeros(int(LEAD_S * 16000)), clip.speech]) * 32768).astype(np.int16)
            else:
                pcm = noisy(clip.speech, kind, snr, rng)
            for mode in MODES if snr is not None else ("none", "far_field"):
                text = run(denoised(pcm, mode))
                row = {"clip": clip.name, "noise": kind, "snr_db": snr, "mode": mode, "text": text}
                rows.append({**row, "errors": word_errors(clip.text, text), "ref_words": ref_words})
                print(f"{clip.name} | {kind} {snr} dB | {mode}: {text}", flush=True)
    summary: dict[str, dict[str, float]] = {}
    for row in rows:
        key = f"{row['noise']}" + ("" if row["snr_db"] is None else f"@{row['snr_db']:g}dB")
        s = summary.setdefault(key, {}).setdefault(row["mode"], {"errors": 0, "words": 0})  # type: ignore[arg-type]
        s["errors"] += row["errors"]
        s["words"] += row["ref_words"]
    wer = {k: {m: round(v["errors"] / v["words"], 4) for m, v in modes.items()} for k, modes in summary.items()}
    for key, modes in wer.items():
        print(key, modes)
    path = record.write({"word_error_rate": wer, "rows": rows}, torch_threads=args.threads, notes=args.notes)
    print(path)


if __name__ == "__main__":
    main()
