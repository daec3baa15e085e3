"""Exploration: does Whisper hear a follow-up turn better when it is given the conversation's earlier words?

Run: `python -m bench.asr_context [--model whisper-base|whisper-tiny.en] [--threads N] [--tag T]`. For every later
turn of the answer-quality set's dialogues (`bench/quality_set.py`, the same cached espeak-ng clips as
`bench/quality.py`), the turn is transcribed twice with greedy decoding, told English: as the server does today
(no context), and with Whisper's previous-text prompt (`<|startofprev|>` and the earlier turns' transcripts as heard,
as openai/whisper's `condition_on_previous_text` does across 30 s windows). Word errors against the words spoken,
per turn, into `bench/results/asr_context-YYYYMMDD[-T].json`. Not a product path: the server does not prompt
Whisper (this measures whether it should).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from assistant.audio.frontend import log_mel
from assistant.models.whisper import WhisperTranscriber
from bench.quality import DEFAULT_CACHE
from bench.quality_set import clip_audio, clip_for, load_set, word_errors
from bench.results import Record

PROMPT_TOKENS = 223  # openai/whisper keeps the last n_text_ctx // 2 - 1 tokens of the previous text


def transcribe(t: WhisperTranscriber, audio, previous: str) -> str:
    """Greedy, told English, optionally after `<|startofprev|>` + `previous` (the model's own prompt format)."""
    speech = t.speech(audio)
    with torch.inference_mode():
        cross = t.model.cross_kv(t.model.encode(log_mel(speech)[None]))
        head = (
            [t.sot, t.language_token("en"), t.transcribe, t.no_timestamps]
            if t.multilingual
            else [t.sot, t.no_timestamps]
        )
        ids = head
        if previous:
            prev = t.tok.encode(" " + previous.strip(), add_special_tokens=False).ids[-PROMPT_TOKENS:]
            ids = [t.tok.token_to_id("<|startofprev|>"), *prev, *head]
        out, _, _ = t._greedy(torch.tensor([ids]), cross, [16 + int(6 * len(speech) / 16000)])
    return t.tok.decode(out[0], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base", help="a prepared Whisper directory in the weights cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    record = Record("asr_context", vars(args), tag=args.tag)
    torch.set_num_threads(args.threads)
    t = WhisperTranscriber.load(Path.home() / ".cache" / "qwen-voice-assistant" / args.model)
    rows, totals = [], {"no_context": [0, 0], "previous_turns": [0, 0]}
    for item in (i for i in load_set() if i.kind == "followup"):
        heard: list[str] = []
        for k, say in enumerate(item.say):
            audio = clip_audio(clip_for(item.id, k, say), DEFAULT_CACHE)
            plain = transcribe(t, audio, "")
            if k:
                with_context = transcribe(t, audio, " ".join(heard))
                row = {"item": item.id, "turn": k, "split": item.split, "say": say}
                for key, hyp in (("no_context", plain), ("previous_turns", with_context)):
                    errors, words = word_errors(say, hyp)
                    totals[key][0] += errors
                    totals[key][1] += words
                    row[key] = {"heard": hyp, "word_errors": errors}
                rows.append(row)
                print(f"{item.id}.{k} {say!r}: {plain!r} | {with_context!r}", flush=True)
            heard.append(plain)
    summary = {k: {"word_errors": e, "words": n, "wer": round(e / n, 3)} for k, (e, n) in totals.items()}
    print(summary)
    record.write({"summary": summary, "turns": rows}, torch_threads=args.threads, notes=args.notes)


if __name__ == "__main__":
    main()
