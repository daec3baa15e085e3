"""Screen candidate defaults on the tune half quickly (issue 20): `python -m bench.quality_screen [--split tune]
[--only NAME,...] [--tag T]`.

One process, one loaded embedded backend: every turn of every item is transcribed once (the whole clip, as `ask`
does: no server, no VAD; the recogniser does not depend on the candidates), then each candidate of `CANDIDATES`
(config overrides of `[generation]`, `[embedded]` and `[engine] max_window_tokens`) answers every item from those
transcripts, a dialogue's earlier turns entering the history with the candidate's own earlier answers, exactly as
the engine renders them (`backend.build_prompt`, `generate_stream`). Scored like `bench/quality.py`.
`--transcripts spoken` answers the words said instead (the LLM's share of the misses, without the recogniser's).
This is the screen only: the winner is confirmed through the server with `python -m bench.quality` on both halves.
Result: `bench/results/quality_screen-YYYYMMDD<tag>.json` (per candidate: totals and every item's answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from bench.quality import score, totals
from bench.quality_set import SPLITS, clip_audio, clip_for, load_set, select

SPOKEN_PROMPT = (
    "You are a voice assistant. Your answer is spoken aloud, so answer in one short sentence that states the fact "
    "asked for. Earlier turns of the conversation tell you names, places and numbers, and what words like it, that "
    "or and what about refer to: use them. Answer in the language the user speaks. No lists, no markdown."
)
BRIEF_PROMPT = (
    "You are a voice assistant. Reply with one short sentence that gives the fact asked for. A short question "
    "continues the conversation: answer it about the person, place or thing of the earlier turns. "
    "No lists, no markdown."
)
SPOKEN = "spoken"  # --transcripts: the words said instead of Whisper's
# name -> config overrides on top of the defaults (the first is the current default, the reference)
CANDIDATES: dict[str, dict] = {
    "default": {},
    "t0.7": {"generation.temperature": 0.7},  # the default before issue 20 part 2 (sampled)
    "greedy": {"generation.greedy": True},
    "t0.3": {"generation.temperature": 0.3},
    "greedy-rep1.0": {"generation.greedy": True, "generation.repetition_penalty": 1.0},
    "greedy-prompt-spoken": {"generation.greedy": True, "embedded.system_prompt": SPOKEN_PROMPT},
    "greedy-history-questions": {"generation.greedy": True, "embedded.history": "questions"},
    "greedy-max64": {"generation.greedy": True, "generation.max_new_tokens": 64},
    "greedy-turn-instruction": {
        "generation.greedy": True,
        "embedded.turn_instruction": "Answer in one short sentence.",
    },
    "greedy-prompt-brief": {"generation.greedy": True, "embedded.system_prompt": BRIEF_PROMPT},
    "t0.3-prompt-spoken": {"generation.temperature": 0.3, "embedded.system_prompt": SPOKEN_PROMPT},
    "greedy-prompt-spoken-rep1.0": {
        "generation.greedy": True,
        "generation.repetition_penalty": 1.0,
        "embedded.system_prompt": SPOKEN_PROMPT,
    },
    "greedy-rep1.0-questions": {
        "generation.greedy": True,
        "generation.repetition_penalty": 1.0,
        "embedded.history": "questions",
    },
    # the sampled default of round 2 with fixed seeds: how far one sampled draw of the reference moves
    "t0.7-seed1": {"generation.temperature": 0.7, "generation.seed": 1},
    "t0.7-seed2": {"generation.temperature": 0.7, "generation.seed": 2},
    "greedy-prompt-spoken-questions": {
        "generation.greedy": True,
        "embedded.system_prompt": SPOKEN_PROMPT,
        "embedded.history": "questions",
    },
}


def transcribe_all(backend, items, cache_dir) -> dict[str, list]:
    """item id -> [(clip, PreparedTurn)] per turn: Whisper once per clip."""
    from assistant.backends.base import Utterance

    out = {}
    for item in items:
        clips = [clip_for(item.id, k, text) for k, text in enumerate(item.say)]
        turns = []
        for k, clip in enumerate(clips):
            audio = clip_audio(clip, cache_dir)
            [turn] = backend.prepare([Utterance(key=f"{item.id}.{k}", audio=audio)], [1])
            turns.append((clip, turn))
        out[item.id] = turns
    return out


def transcripts_from(path: str, items) -> dict[str, list]:
    """`transcribe_all`'s answer taken from an earlier screen result (its first candidate's turns): the recogniser
    does not depend on the candidates, so a second screen process need not run it again. `path` "spoken": the words
    said, as if heard without an error (what the LLM alone gets right: the hearing's share of the misses)."""
    import json

    from assistant.backends.base import PreparedTurn

    rows = {}
    if path != SPOKEN:
        first = next(iter(json.loads(Path(path).read_text())["results"]["candidates"].values()))
        rows = {r["id"]: r for r in first["items"]}
    out = {}
    for item in items:
        clips = [clip_for(item.id, k, text) for k, text in enumerate(item.say)]
        texts = list(item.say) if path == SPOKEN else [t["transcript"] for t in rows[item.id]["turns"]]
        out[item.id] = [
            (c, PreparedTurn(key=f"{item.id}.{k}", user_text=t, transcript=t))
            for k, (c, t) in enumerate(zip(clips, texts, strict=True))
        ]
    return out


def answer_prompt(backend, cfg, prompt) -> tuple[str, float]:
    """The answer `cfg.generation` gives to `prompt` (`generate_stream`, the engine's reference decoder), and the
    seconds to its first token."""
    from assistant.engine.decoding import generate_stream, response_text
    from assistant.engine.sampling import params_for

    t0 = time.perf_counter()
    first_s, ids = None, []
    for step in generate_stream(backend, prompt, params_for(cfg.generation), cfg.generation.max_new_tokens):
        if first_s is None:
            first_s = time.perf_counter() - t0
        if step.token_id is not None:
            ids.append(step.token_id)
    return response_text(backend.tokenizer, ids).strip(), first_s or 0.0


def run_candidate(backend, cfg, items, heard) -> list[dict]:
    from assistant.backends.base import Exchange

    backend.default_system_prompt = cfg.embedded.system_prompt
    backend.history, backend.turn_instruction = cfg.embedded.history, cfg.embedded.turn_instruction.strip()
    window = cfg.engine.max_window_tokens or backend.max_window_tokens
    rows = []
    for item in items:
        history: list[Exchange] = []
        turns = []
        for _, turn in heard[item.id]:
            t0 = time.perf_counter()
            prompt = backend.build_prompt("", history, turn, window)
            answer, _ = answer_prompt(backend, cfg, prompt)
            turns.append(
                {
                    "transcript": turn.transcript or "",
                    "answer": answer,
                    "status": "completed",
                    "errors": [],
                    "prompt_tokens": len(prompt.ids),
                    "history_kept": prompt.history_kept,
                    "answer_s": round(time.perf_counter() - t0, 2),
                }
            )
            history.append(Exchange(turn, answer))
        row = score(item, "ask", turns, [c for c, _ in heard[item.id]])
        row["path"] = "screen"
        rows.append(row)
        print(f"{'ok ' if row['correct'] else 'BAD'} {item.id} -> {row['answer']!r}", flush=True)
    return rows


def main(args, on_candidate=lambda numbers: None) -> dict:
    import torch

    from assistant.backends import load_backend
    from assistant.config import load_config
    from bench.quality import DEFAULT_CACHE

    torch.set_num_threads(args.threads)
    items = select(load_set(), None if args.split == "all" else args.split, None, args.ids)
    backend = load_backend(load_config(overrides={"embedded.whisper": args.whisper}))
    heard = (
        transcribe_all(backend, items, DEFAULT_CACHE)
        if args.transcripts is None
        else transcripts_from(args.transcripts, items)
    )
    names = args.only or list(CANDIDATES)
    out = {}
    for name in names:
        cap = {} if args.max_new_tokens is None else {"generation.max_new_tokens": args.max_new_tokens}
        cfg = load_config(overrides={**CANDIDATES[name], **cap})
        t0 = time.perf_counter()
        rows = run_candidate(backend, cfg, items, heard)
        for r in rows:  # totals() groups by path: the screen reports as "ask"
            r["path"] = "ask"
        summary = totals(rows)
        line = {k: {s: v[s] for s in (*SPLITS, "all") if s in v} for k, v in summary.items() if "/" in k}
        print(name, line, flush=True)
        out[name] = {
            "overrides": CANDIDATES[name],
            "generation": dataclasses.asdict(cfg.generation),
            "run_s": round(time.perf_counter() - t0, 1),
            "max_prompt_tokens": max(t["prompt_tokens"] for r in rows for t in r["turns"]),
            "totals": {k: v for k, v in summary.items() if "/" in k},
            "items": rows,
        }
        on_candidate({"candidates": out})  # each candidate's result is kept as soon as it is known
    return {"candidates": out}


if __name__ == "__main__":
    from bench.results import Record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=[*SPLITS, "all"], default="tune")
    ap.add_argument("--only", type=lambda s: s.split(","), help=f"candidates, of {list(CANDIDATES)}")
    ap.add_argument("--ids", type=lambda s: s.split(","), metavar="s01,d02", help="exactly these items (a check)")
    ap.add_argument(
        "--transcripts",
        help=f"an earlier quality_screen result: its transcripts, Whisper not run again; {SPOKEN!r}: the words said",
    )
    ap.add_argument("--whisper", default="base", help="[embedded] whisper of the transcripts: base or tiny.en")
    ap.add_argument("--max-new-tokens", type=int, help="cap every candidate's answers (a faster screen)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    unknown = set(args.only or []) - set(CANDIDATES)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; expected names of {list(CANDIDATES)}")
    record = Record("quality_screen", vars(args), tag=f"-{args.tag}" if args.tag else "")
    main(args, lambda numbers: record.write(numbers, torch_threads=args.threads, notes=args.notes))
