"""Does Whisper hear a follow-up turn better when it is told the conversation's earlier words?

Run: `python -m bench.asr_context [--model whisper-base|whisper-tiny.en] [--language en|""] [--beam-size N]
[--threads N] [--tag T]`. For every later turn of the answer-quality set's dialogues (`bench/quality_set.py`, the
same cached espeak-ng clips as `bench/quality.py`), the turn is transcribed twice by the product's recogniser
(`WhisperTranscriber.transcribe_steps`, told English unless `--language ""`, which detects it as the default server
does): with no context, and after Whisper's previous-text prompt holding the earlier turns' transcripts as that
run heard them (`[embedded] whisper_previous_text`: what the engine tells it, `Conversation.said_before`). Word
errors against the words spoken, per turn, into `bench/results/asr_context-YYYYMMDD[-T].json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from assistant.backends.base import run_steps
from assistant.models.whisper import WhisperTranscriber
from bench.quality import DEFAULT_CACHE
from bench.quality_set import clip_audio, clip_for, load_set, word_errors
from bench.results import Record


def transcribe(t: WhisperTranscriber, audio, language: str | None, previous: str) -> str:
    [heard] = run_steps(t.transcribe_steps([audio], languages=[language], previous=[previous]))
    return heard.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base", help="a prepared Whisper directory in the weights cache")
    ap.add_argument("--language", default="en", help='the language each turn is told ("" = detected)')
    ap.add_argument("--beam-size", type=int, default=1, help="[embedded] whisper_beam_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    record = Record("asr_context", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)
    t = WhisperTranscriber.load(Path.home() / ".cache" / "qwen-voice-assistant" / args.model, beam_size=args.beam_size)
    language = args.language or None
    rows, totals = [], {"no_context": [0, 0], "previous_turns": [0, 0]}
    for item in (i for i in load_set() if i.kind == "followup"):
        heard: dict[str, list[str]] = {"no_context": [], "previous_turns": []}
        for k, say in enumerate(item.say):
            audio = clip_audio(clip_for(item.id, k, say), DEFAULT_CACHE)
            plain = transcribe(t, audio, language, "")
            # a first turn has nothing before it: the two runs hear it alike
            told = transcribe(t, audio, language, " ".join(heard["previous_turns"])) if k else plain
            got = {"no_context": plain, "previous_turns": told}
            if k:
                row = {"item": item.id, "turn": k, "split": item.split, "say": say}
                for key, hyp in got.items():
                    errors, words = word_errors(say, hyp)
                    totals[key][0] += errors
                    totals[key][1] += words
                    row[key] = {"heard": hyp, "word_errors": errors}
                rows.append(row)
                print(f"{item.id}.{k} {say!r}: {got['no_context']!r} | {got['previous_turns']!r}", flush=True)
            for key, hyp in got.items():
                heard[key].append(hyp)
    summary = {k: {"word_errors": e, "words": n, "wer": round(e / n, 3)} for k, (e, n) in totals.items()}
    print(summary)
    record.write({"summary": summary, "turns": rows}, torch_threads=args.threads, notes=args.notes)


if __name__ == "__main__":
    main()
