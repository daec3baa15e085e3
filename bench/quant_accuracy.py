"""Answers of the embedded LLM quantized against unquantized (`python -m bench.quant_accuracy [--quantizations
none,int8,int4] [--tag T]`): what decides `quant.AUTO_QUANTIZATION`.

Two question sets, spoken by espeak-ng and transcribed once by the embedded Whisper (base), so every variant answers
the very same prompt ids:
- the spoken set (`bench/spoken_set.py`, 16 questions, the `en` voice at 150 wpm, no leading silence): what
  `tests/test_embedded_backend.py` scores;
- the answer-quality set's single questions (`bench/quality_set.toml`, 48 questions, five voices, three speeds,
  0-2 s of leading silence, the clips `bench/quality.py` speaks), scored by its `answer_correct`.
All variants (`[embedded] quantization` none, int8, int4) are loaded at once and the run goes question by question:
transcribe it, then every variant answers it greedily, at most ANSWER_TOKENS new tokens (`spoken_set.greedy_answer`:
the backend's own prefill and decode). The result (`bench/results/quant_accuracy-YYYYMMDD<tag>.json`, rewritten
every `--write-every` questions, so a run stopped early holds every variant's answers to the same first questions)
has every answer, the correct counts per set and variant, and per quantized variant the questions it gets right
and wrong where "none" does not, and how many answers are word for word the same as "none"'s.
"""

from __future__ import annotations

import argparse
import time

import torch

from assistant.backends.base import Utterance
from assistant.config import load_config
from bench.peers import text_backend
from bench.quality import DEFAULT_CACHE
from bench.quality_set import answer_correct, clip_audio, clip_for, load_set
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS, correct, greedy_answer, synthesize


def questions() -> list[dict]:
    """Both sets as {set, id, say, audio, accept}; the quality set's clips come from bench/quality.py's cache."""
    import tempfile
    from pathlib import Path

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (q, keywords) in enumerate(QUESTIONS):
            audio = synthesize(q, Path(tmp) / f"q{i}.wav")
            out.append({"set": "spoken", "id": f"q{i:02d}", "say": q, "audio": audio, "accept": keywords})
    for item in load_set():
        if item.kind == "single":
            audio = clip_audio(clip_for(item.id, 0, item.say[0]), DEFAULT_CACHE)
            out.append({"set": "quality", "id": item.id, "say": item.say[0], "audio": audio, "accept": item.accept})
    return out


def is_correct(q: dict, answer: str) -> bool:
    return correct(answer, q["accept"]) if q["set"] == "spoken" else answer_correct(answer, q["accept"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantizations", default="none,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-every", type=int, default=8, help="questions between two writes of the result file")
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args(argv)
    record = Record("quant_accuracy", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)
    from assistant.backends import load_backend

    cfg = load_config()
    qs = questions()
    modes = args.quantizations.split(",")
    whisper = load_backend(cfg.replace(**{"embedded.quantization": modes[0]}))
    variants = {m: whisper if m == modes[0] else text_backend(cfg, m) for m in modes}
    answers: dict[str, list[str]] = {m: [] for m in modes}
    seconds = dict.fromkeys(modes, 0.0)
    rows = []
    for n, q in enumerate(qs, 1):
        turn = whisper.prepare([Utterance(key=q["id"], audio=q["audio"])], [n])[0]
        prompt = whisper.build_prompt(whisper.default_system_prompt, [], turn, whisper.max_window_tokens).ids
        row = {"set": q["set"], "id": q["id"], "say": q["say"], "heard": turn.transcript, "accept": list(q["accept"])}
        for m, backend in variants.items():
            t0 = time.monotonic()
            answers[m].append(greedy_answer(backend, prompt, max_tokens=ANSWER_TOKENS).text)
            seconds[m] += time.monotonic() - t0
            row[m] = {"answer": answers[m][-1], "correct": is_correct(q, answers[m][-1])}
        rows.append(row)
        marks = " ".join(f"{m}:{'ok ' if row[m]['correct'] else 'BAD'}" for m in modes)
        print(f"{q['id']} heard {turn.transcript!r}: {marks} {[row[m]['answer'] for m in modes]}", flush=True)
        if n % args.write_every == 0 or n == len(qs):
            numbers = {
                "answer_tokens": ANSWER_TOKENS,
                "lm_dtype_unquantized": str(whisper.lm.dtype).removeprefix("torch."),
                "questions_done": n,
                "of": len(qs),
                "answering_s": {m: round(s, 1) for m, s in seconds.items()},
                "totals": totals(qs[:n], answers),
                "questions": rows,
            }
            print(record.write(numbers, torch_threads=args.threads, notes=args.notes), flush=True)
    return 0


def totals(qs: list[dict], answers: dict[str, list[str]]) -> dict:
    """Per set (and both): correct per variant; per quantized variant against "none": gained, lost, identical."""
    out = {}
    for name in ("spoken", "quality", "all"):
        idx = [i for i, q in enumerate(qs) if name in ("all", q["set"])]
        ok = {m: [is_correct(qs[i], a[i]) for i in idx] for m, a in answers.items()}
        row = {"questions": len(idx), "correct": {m: sum(v) for m, v in ok.items()}}
        if "none" in answers:
            for m in answers:
                if m == "none":
                    continue
                row[f"{m}_vs_none"] = {
                    "gained": [qs[i]["id"] for k, i in enumerate(idx) if ok[m][k] and not ok["none"][k]],
                    "lost": [qs[i]["id"] for k, i in enumerate(idx) if ok["none"][k] and not ok[m][k]],
                    "identical_answers": sum(answers[m][i] == answers["none"][i] for i in idx),
                }
        out[name] = row
        print(f"{name}: {row}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
