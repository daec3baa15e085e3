"""How far back the embedded LLM uses the conversation, and what the history budget costs (issue 20 part 2):
`python -m bench.quality_history [--fillers 0,16,48] [--budgets 512,1024,2048] [--split all] [--tag T]`.

The answer-quality set's dialogues are two or three turns long, so their prompts (at most about 160 tokens) never
reach a history budget. Here each dialogue gets F filler exchanges: single questions of the set, each with the
model's own answer to it asked alone. Two placements:
- `between`: the fillers come between the dialogue's earlier turns and its last, so the name, place or number the
  last turn asks for lies F exchanges back (items whose `needs` is name, place or number: an elliptical "and what
  about ...?" or a pronoun refers to the turn just before, which a filler would change);
- `before`: every dialogue after F fillers (an older conversation: distraction and length, the dialogue intact).
The last turn is answered under each budget (`[engine] max_window_tokens`; the engine keeps the newest exchanges that
fit) and scored like bench/quality.py. Words as said, no recogniser: the history alone is measured. The dialogue's
earlier answers are the model's own, made once without fillers. A prompt met twice (a budget above its length) is
answered once. Each answer's time to first token is a cold prefill (no cached conversation: what a turn costs after
its conversation was evicted from the KV cache or the server restarted).
Result: `bench/results/quality_history-YYYYMMDD<tag>.json`.
"""

from __future__ import annotations

import argparse
import statistics

from bench.quality_screen import answer_prompt
from bench.quality_set import SPLITS, answer_correct, load_set, select

RECALL_NEEDS = ("name", "place", "number")  # what a `between` filler leaves intact


def prompt_for(backend, history, text: str, window: int):
    """The engine's prompt for the typed `text` after `history`, the newest exchanges that fit `window` tokens."""
    from assistant.backends.base import PreparedTurn

    return backend.build_prompt("", history, PreparedTurn(key="q", user_text=text, transcript=text), window)


def answer(backend, cfg, prompt) -> dict:
    """The default settings' answer to `prompt` (`prompt_for`), with its size and time to first token."""
    text, first_s = answer_prompt(backend, cfg, prompt)
    return {
        "answer": text,
        "prompt_tokens": len(prompt.ids),
        "history_kept": prompt.history_kept,
        "first_token_s": round(first_s, 3),
    }


def exchange(text: str, reply: str):
    from assistant.backends.base import Exchange, PreparedTurn

    return Exchange(PreparedTurn(key=text, user_text=text, transcript=text), reply)


def run(backend, cfg, items, fillers: list[int], budgets: list[int], placements: list[str]) -> dict:
    singles = [i.say[0] for i in load_set() if i.kind == "single"]
    full = max(budgets)
    replies: dict[str, str] = {}  # filler question -> the model's answer to it asked alone (made when first used)

    def filler(text: str):
        if text not in replies:
            replies[text] = answer(backend, cfg, prompt_for(backend, [], text, full))["answer"]
        return exchange(text, replies[text])

    dialogues = [i for i in items if i.kind == "followup"]
    earlier = {}  # item id -> its earlier turns as exchanges, answered in context without fillers
    for item in dialogues:
        history = []
        for text in item.say[:-1]:
            reply = answer(backend, cfg, prompt_for(backend, history, text, full))["answer"]
            history.append(exchange(text, reply))
        earlier[item.id] = history
    seen: dict[tuple, dict] = {}
    rows = []
    for placement in placements:
        for n_fill in fillers:
            for k, item in enumerate(dialogues):
                if placement == "between" and item.needs not in RECALL_NEEDS:
                    continue
                # Each dialogue its own fillers (rotated through the singles), none of its own words.
                pool = [filler(t) for t in [t for t in singles[k:] + singles[:k] if t not in item.say][:n_fill]]
                past = earlier[item.id]
                history = past + pool if placement == "between" else pool + past
                for budget in budgets:
                    prompt = prompt_for(backend, history, item.say[-1], budget)
                    key = tuple(prompt.ids)
                    if key not in seen:
                        seen[key] = answer(backend, cfg, prompt)
                    got = seen[key]
                    row = {"id": item.id, "split": item.split, "needs": item.needs, "placement": placement}
                    row |= {"fillers": n_fill, "budget": budget, "history_given": len(history), **got}
                    row["correct"] = answer_correct(got["answer"], item.accept)
                    # between: the dialogue's earlier turns are the oldest history; before: the newest
                    row["fact_in_prompt"] = got["history_kept"] >= len(past) + len(pool) * (placement == "between")
                    rows.append(row)
                    print(
                        f"{'ok ' if row['correct'] else 'BAD'} {placement} F={n_fill} B={budget} {item.id} "
                        f"kept {got['history_kept']}/{len(history)} -> {got['answer']!r}",
                        flush=True,
                    )
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault(f"{r['placement']} F={r['fillers']} B={r['budget']}", []).append(r)
    return {
        k: {
            "correct": sum(r["correct"] for r in g),
            "items": len(g),
            "fact_in_prompt": sum(r["fact_in_prompt"] for r in g),
            "prompt_tokens_max": max(r["prompt_tokens"] for r in g),
            "first_token_s_p50": round(statistics.median(r["first_token_s"] for r in g), 3),
        }
        for k, g in out.items()
    }


def main() -> None:
    import torch

    from assistant.backends import load_backend
    from assistant.config import load_config
    from bench.results import Record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    ap.add_argument("--fillers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 16, 48])
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048])
    ap.add_argument("--placements", type=lambda s: s.split(","), default=["between", "before"])
    ap.add_argument("--ids", type=lambda s: s.split(","), metavar="d01,d03", help="exactly these dialogues")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    record = Record("quality_history", vars(args), tag=f"-{args.tag}" if args.tag else "")
    torch.set_num_threads(args.threads)
    cfg = load_config()
    backend = load_backend(cfg)
    items = select(load_set(), None if args.split == "all" else args.split, None, args.ids)
    result = run(backend, cfg, items, args.fillers, args.budgets, args.placements)
    for k, v in result["summary"].items():
        print(k, v)
    record.write(result, torch_threads=args.threads, notes=args.notes)


if __name__ == "__main__":
    main()
