"""Speech recognition side by side, one interleaved run: the project's Whisper (base and tiny.en) against
faster-whisper (int8 and float32, its defaults otherwise) on the very same CTranslate2 weights; greedy, and beam
search over 5 hypotheses where a system's name ends in `-beam5` (`[embedded] whisper_beam_size`).

Run: `python -m bench.asr_peers [--questions N] [--threads N] [--systems a,b,..]`. The set is `bench/asr_set.py`:
the spoken set's questions in four espeak-ng voices/speeds, each clip with 0, 0.3, 0.5 and 1.0 s of leading and
1.5 s of trailing silence. For every clip and silence the systems run one after the other (the order rotates), so
load changes on the shared machine hit them alike. Per run: latency (the call, audio in -> text out, features
included), words, language, word errors against the text spoken. Per system: WER overall and per leading silence,
the clips whose words changed with the silence, latency percentiles.

`own-base-en` is the project's base model told the language (`[embedded] language = "en"`, or a client's
transcription `language`): no detection.
`own-base-previous` is the project's path before this benchmark (re-created here from the model's own calls): the
clip plus 2 s encoded without trimming, redone on the full window when the mean token log-probability was under
-0.5 or decoding looped. faster-whisper needs the assembled `model.bin`, which `prepare` does not keep: base is
assembled from its pinned packages into a temporary directory, tiny.en is loaded from its package directory.
The result goes to `bench/results/asr_peers-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.asr_set import LEADS_S, VOICES, clips, word_errors, words
from bench.results import Record

SYSTEMS = (
    "own-base",
    "own-base-en",
    "own-tiny.en",
    "faster-whisper-base-int8",
    "faster-whisper-base-float32",
    "faster-whisper-tiny.en-int8",
    "faster-whisper-tiny.en-float32",
    "own-base-previous",
    "own-base-window10",
    "own-base-window15",
    "own-base-beam5",
    "own-base-en-beam5",
    "own-tiny.en-beam5",
    "faster-whisper-base-int8-beam5",
    "faster-whisper-base-float32-beam5",
    "faster-whisper-tiny.en-float32-beam5",
)


def faster_whisper_dir(name: str, scratch: Path) -> Path:
    """A directory faster-whisper loads for the project's Whisper `name` ("base" or "tiny.en"), from the same
    pinned packages `prepare` converts (model.bin, tokenizer.json, config.json and the vocabulary)."""
    from assistant.weights.sources import WHISPER_SOURCES, Part, assemble, locate

    source = WHISPER_SOURCES[name]
    if len(source.parts) == 1:  # one file in the package (tiny.en): its directory is a faster-whisper model
        return locate(source.parts[0]).parent
    out = scratch / f"faster-whisper-{name}"
    out.mkdir(parents=True, exist_ok=True)
    assemble(source, out / "model.bin")
    for extra in source.extras:
        shutil.copyfile(locate(extra), out / Path(extra.file).name)
    last = source.parts[-1]  # CTranslate2 also needs the vocabulary, which ships next to the extras
    vocab = Part(last.module, last.requirement, str(Path(source.extras[0].file).parent / "vocabulary.json"))
    shutil.copyfile(locate(vocab), out / "vocabulary.json")
    return out


def faster_whisper_transcriber(
    model_dir: Path, compute_type: str, threads: int, beam_size: int = 1
) -> Callable[[np.ndarray], tuple]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)

    def run(audio: np.ndarray) -> tuple[str, str]:
        segments, info = model.transcribe(audio, beam_size=beam_size)
        return " ".join(s.text.strip() for s in segments).strip(), info.language

    return run


def own_transcriber(model_dir: Path, language: str | None = None, beam_size: int = 1) -> Callable[[np.ndarray], tuple]:
    """The project's recogniser; `language` given (the `-en` systems) is the language the user said they speak."""
    from assistant.backends.base import run_steps
    from assistant.models.whisper import WhisperTranscriber

    tr = WhisperTranscriber.load(model_dir, beam_size=beam_size)

    def run(audio: np.ndarray) -> tuple[str, str]:
        [r] = run_steps(tr.transcribe_steps([audio], languages=[language]))
        return r.text, r.language

    return run


def previous_transcriber(model_dir: Path) -> Callable[[np.ndarray], tuple]:
    """The project's path before the fix: no trim, the clip + 2 s encoded, a full-window redo when unsure."""
    from assistant.audio.frontend import HOP, N_FRAMES, log_mel
    from assistant.models.whisper import WhisperTranscriber

    tr = WhisperTranscriber.load(model_dir)

    def run(audio: np.ndarray) -> tuple[str, str]:
        mel = log_mel(audio[: N_FRAMES * HOP])
        frames = min(N_FRAMES, -(-len(audio) // HOP) + 200)
        [r] = tr.decode_features(tr.model.encode(mel[None, :, : frames + frames % 2]), [audio])
        if r.looped or r.avg_logprob < -0.5:
            [r] = tr.decode_features(tr.model.encode(mel[None]), [audio])
        return r.text, r.language

    return run


def window_transcriber(model_dir: Path, window_s: int) -> Callable[[np.ndarray], tuple]:
    """The project's path with a shorter window: the speech trimmed as always, then only the first `window_s` of the
    30 s window encoded (the speech always starts at its beginning, so the words still cannot depend on the
    silence around it); a clip longer than the window gets the full 30 s."""
    from assistant.audio.frontend import HOP, log_mel
    from assistant.models.whisper import WhisperTranscriber

    tr = WhisperTranscriber.load(model_dir)
    frames = window_s * 100  # mel frames (10 ms each)

    def run(audio: np.ndarray) -> tuple[str, str]:
        speech = tr.speech(audio)
        mel = log_mel(speech)
        if len(speech) // HOP + 50 <= frames:
            mel = mel[:, :frames]
        [r] = tr.decode_features(tr.model.encode(mel[None]), [speech])
        return r.text, r.language

    return run


def load_systems(names: list[str], threads: int, scratch: Path) -> dict[str, Callable[[np.ndarray], tuple]]:
    from assistant.config import load_config
    from assistant.weights.cache import default_cache_dir, prepare_source
    from assistant.weights.sources import WHISPER_SOURCES

    cache = default_cache_dir(load_config())
    out = {}
    for name in names:
        model = "tiny.en" if "tiny.en" in name else "base"
        stem, _, beam = name.partition("-beam")  # "-beamN": beam search over N hypotheses, else greedy
        beam_size = int(beam or 1)
        if name.startswith("own"):
            model_dir = prepare_source(WHISPER_SOURCES[model], cache)
            if "-window" in name:
                out[name] = window_transcriber(model_dir, int(name.rsplit("window", 1)[1]))
            elif name.endswith("previous"):
                out[name] = previous_transcriber(model_dir)
            else:
                out[name] = own_transcriber(model_dir, "en" if stem.endswith("-en") else None, beam_size)
        else:
            compute_type = stem.split("-")[-1]
            out[name] = faster_whisper_transcriber(faster_whisper_dir(model, scratch), compute_type, threads, beam_size)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarise(runs: list[dict]) -> dict:
    def wer(rows: list[dict]) -> float:
        return round(sum(r["errors"] for r in rows) / max(1, sum(r["ref_words"] for r in rows)), 4)

    by_clip: dict[str, set[str]] = {}
    for r in runs:
        by_clip.setdefault(r["clip"], set()).add(" ".join(words(r["text"])))
    lat = [r["latency_s"] for r in runs]
    return {
        "wer": wer(runs),
        "wer_by_lead_s": {str(lead): wer([r for r in runs if r["lead_s"] == lead]) for lead in LEADS_S},
        "clips": len(by_clip),
        "clips_whose_words_change_with_silence": sorted(c for c, texts in by_clip.items() if len(texts) > 1),
        "non_english_language": sum(r["language"] != "en" for r in runs),
        "latency_s": {
            "p50": round(_pct(lat, 0.5), 3),
            "p90": round(_pct(lat, 0.9), 3),
            "min": round(min(lat), 3),
            "max": round(max(lat), 3),
            "mean": round(statistics.fmean(lat), 3),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=8, help="questions of the spoken set (each in every voice)")
    ap.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 threads")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument("--notes", default="")
    ap.add_argument("--tag", default="", help="result file name suffix: asr_peers-DATE-TAG.json")
    args = ap.parse_args()
    names = args.systems.split(",")
    if unknown := sorted(set(names) - set(SYSTEMS)):
        ap.error(f"unknown systems {unknown}; expected some of {', '.join(SYSTEMS)}")
    record = Record("asr_peers", {**vars(args), "voices": VOICES, "leads_s": LEADS_S}, tag=args.tag)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        systems = load_systems(names, args.threads, Path(tmp))
        clip_set = clips(args.questions)
        for run in systems.values():  # warm-up: first allocations, kernels
            run(clip_set[0].with_silence(0.0))
        runs: dict[str, list[dict]] = {n: [] for n in names}
        turn = 0
        for clip in clip_set:
            for lead in LEADS_S:
                audio = clip.with_silence(lead)
                order = names[turn % len(names) :] + names[: turn % len(names)]
                turn += 1
                for name in order:
                    t0 = time.perf_counter()
                    text, language = systems[name](audio)
                    elapsed = time.perf_counter() - t0
                    runs[name].append(
                        {
                            "clip": clip.name,
                            "voice": clip.voice,
                            "wpm": clip.wpm,
                            "lead_s": lead,
                            "audio_s": round(len(audio) / 16000, 3),
                            "latency_s": round(elapsed, 4),
                            "text": text,
                            "language": language,
                            "errors": word_errors(clip.text, text),
                            "ref_words": len(words(clip.text)),
                        }
                    )
                print(f"{clip.name} +{lead}s: " + " | ".join(f"{n}: {runs[n][-1]['text']}" for n in names), flush=True)
    summary = {name: summarise(rows) for name, rows in runs.items()}
    for name, s in summary.items():
        varying = len(s["clips_whose_words_change_with_silence"])
        print(f"{name:32s} WER {s['wer']:.3f}  varying {varying}/{s['clips']}  p50 {s['latency_s']['p50']:.2f}s")
    record.write({"summary": summary, "runs": runs}, torch_threads=args.threads, notes=args.notes)


if __name__ == "__main__":
    main()
