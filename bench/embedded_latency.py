"""Embedded backend latency: end of utterance -> first answer token (p50/p95) and decode tokens/s, side by side with
the plain cascade (transformers `generate()` for Whisper, then `generate()` for the LLM, same weights), one run.

Run: `python -m bench.embedded_latency [--tokens N] [--threads N]`. The models: Whisper base (CTranslate2 weights,
converted) and Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF, converted to bf16; it runs in bf16 where the CPU has
native bf16, else float32: the result file says which). The question set and its scoring are `bench/spoken_set.py`,
shared with `tests/test_embedded_backend.py`, which asserts the same outcome as the "nothing cached" row here.

This drives the embedded backend's own calls directly on the main thread (not the engine: `bench/engine_throughput.py`
and `bench/server_latency.py` measure the engine and the server), doing for one turn what the engine does:
Whisper on the clip cut to its speech, in the full 30 s window (`WhisperTranscriber`), then a
prefill onto the conversation's KV cache and greedy decoding. Two cases: `cold` prefills the whole prompt; `session`
has the system prompt already cached, as in any conversation after its first turn. Decode tok/s excludes the prefill
on every row (first token -> last token / tokens after the first; `generate()` timed with a streamer).
The result goes to `bench/results/embedded_latency-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.hf_baseline import load_qwen2, timed_generate
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS, answered_correctly, greedy_answer, synthesize

__all__ = ["QUESTIONS", "synthesize"]  # tests/conftest.py still imports the set from here


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_ours(backend, audios: list[np.ndarray], n_tokens: int, session_cache: bool) -> dict:
    """Per question: seconds to the first token, decode tok/s, the answer."""
    import torch

    from assistant.backends.base import Utterance

    lm, tok = backend.lm, backend.tokenizer
    system_ids = backend.build_prompt(backend.default_system_prompt, [], _dummy_turn(), 10**6).ids
    n_sys = system_ids.index(tok.im_start_id, 1)  # the system message ends where the user message starts
    firsts, rates, answers, heard = [], [], [], []
    for i, audio in enumerate(audios):
        cache = lm.new_cache()
        if session_cache:
            with torch.inference_mode():
                lm.prefill(lm.embed(torch.tensor(system_ids[:n_sys])), cache)
        t0 = time.perf_counter()
        [turn] = backend.prepare([Utterance(key=f"q{i}", audio=audio)], [1])
        ids = backend.build_prompt(backend.default_system_prompt, [], turn, backend.max_window_tokens).ids
        answer = greedy_answer(backend, ids, cache, n_tokens)
        firsts.append(answer.first_token_at - t0)
        if answer.decode_tok_s is not None:
            rates.append(answer.decode_tok_s)
        answers.append(answer.text)
        heard.append(turn.transcript)
    return {"first_s": firsts, "tok_s": rates, "answers": answers, "heard": heard}


def _dummy_turn():
    from assistant.backends.base import PreparedTurn

    return PreparedTurn(key="x", user_text="x")


def load_plain(embedded_paths, dtype):
    """transformers' Whisper and Qwen2 on the very same converted tensors."""
    import json

    from safetensors.torch import load_file
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    from assistant.models.whisper import WhisperDims

    wdir = embedded_paths.whisper_dir
    dims = json.loads((wdir / "dims.json").read_text())
    ct2 = json.loads((wdir / "config.json").read_text())
    wcfg = WhisperDims(**dims).transformers_config(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257
    )
    whisper = WhisperForConditionalGeneration(wcfg).eval()
    missing, unexpected = whisper.load_state_dict(load_file(str(wdir / "model.safetensors")), strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:  # proj_out is tied to the token embedding
        raise RuntimeError(f"converted Whisper does not fit transformers: missing {missing}, unexpected {unexpected}")
    whisper.tie_weights()
    from tokenizers import Tokenizer

    wtok = Tokenizer.from_file(str(wdir / "tokenizer.json"))
    langs = {wtok.id_to_token(i): i for i in ct2["lang_ids"]}
    whisper.generation_config = GenerationConfig(
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        max_length=dims["max_target_positions"],
        lang_to_id=langs,
        task_to_id={"transcribe": wtok.token_to_id("<|transcribe|>"), "translate": wtok.token_to_id("<|translate|>")},
        no_timestamps_token_id=wtok.token_to_id("<|notimestamps|>"),
        is_multilingual=True,
        suppress_tokens=ct2["suppress_ids"],
        begin_suppress_tokens=ct2["suppress_ids_begin"],
    )
    return whisper.float(), load_qwen2(embedded_paths.llm_dir, dtype), wtok


def run_plain(whisper, llm, wtok, backend, audios: list[np.ndarray], n_tokens: int) -> dict:
    import torch
    from transformers import WhisperFeatureExtractor

    from assistant.backends.base import PreparedTurn

    fe = WhisperFeatureExtractor(feature_size=whisper.config.num_mel_bins)
    tok = backend.tokenizer
    firsts, rates, answers, heard = [], [], [], []
    for i, audio in enumerate(audios):
        t0 = time.perf_counter()
        feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            wids = whisper.generate(feats, task="transcribe")
        text = wtok.decode(wids[0].tolist(), skip_special_tokens=True).strip()
        turn = PreparedTurn(key=f"q{i}", user_text=text, transcript=text)
        ids = backend.build_prompt(backend.default_system_prompt, [], turn, 10**6).ids
        heard_s = time.perf_counter() - t0
        gen = timed_generate(llm, [ids], n_tokens, tok.im_end_id, eos_ids=sorted(tok.stop_ids))
        firsts.append(heard_s + gen.first_token_s)  # Whisper, then prefill and first token
        if gen.decode_tok_s_per_row is not None:
            rates.append(gen.decode_tok_s_per_row)
        gen = gen.ids[0].tolist()
        answers.append(tok.decode([t for t in gen if t not in tok.stop_ids]).strip())
        heard.append(text)
    return {"first_s": firsts, "tok_s": rates, "answers": answers, "heard": heard}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=ANSWER_TOKENS, help="max new tokens per answer (greedy)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--notes", default="", help="written into the result file")
    args = ap.parse_args()
    record = Record("embedded_latency", vars(args))
    import torch

    from assistant.backends.embedded import EmbeddedBackend
    from assistant.config import load_config
    from assistant.weights.cache import ensure_prepared

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config()
    paths = ensure_prepared(cfg)
    t0 = time.perf_counter()
    backend = EmbeddedBackend.from_config(cfg)  # from the prepared cache
    load_s = time.perf_counter() - t0
    cache_bytes = sum(f.stat().st_size for d in (paths.llm_dir, paths.whisper_dir) for f in d.rglob("*") if f.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        audios = [synthesize(q, Path(tmp) / f"q{i}.wav") for i, (q, _) in enumerate(QUESTIONS)]
    whisper, llm, wtok = load_plain(paths, backend.lm.dtype)
    run_ours(backend, audios[:1], 4, True)  # warm-up (first-call allocations, oneDNN kernels)
    run_plain(whisper, llm, wtok, backend, audios[:1], 4)
    # Interleaved per question, so the load of this shared machine hits every approach alike.
    runs = {
        "embedded backend, system prompt cached": lambda a: run_ours(backend, a, args.tokens, True),
        "embedded backend, nothing cached": lambda a: run_ours(backend, a, args.tokens, False),
        "plain transformers generate() (Whisper, then the LLM)": lambda a: run_plain(
            whisper, llm, wtok, backend, a, args.tokens
        ),
    }
    results = {name: {"first_s": [], "tok_s": [], "answers": [], "heard": []} for name in runs}
    for audio in audios:
        for name, run in runs.items():
            for key, values in run([audio]).items():
                results[name][key] += values
    secs = [len(a) / 16000 for a in audios]
    dtype = str(backend.lm.dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    print(f"{len(audios)} questions, {min(secs):.1f}-{max(secs):.1f} s of speech, torch threads {threads}")
    print(f"LM dtype {dtype}, {args.tokens} tokens max per answer")
    print(f"{'approach':55s} {'first token p50':>16s} {'p95':>8s} {'decode tok/s':>13s} {'correct':>8s}")
    rows = {}
    for name, r in results.items():
        right = answered_correctly(r["answers"])
        rows[name] = {
            "first_token_p50_s": round(statistics.median(r["first_s"]), 3),
            "first_token_p95_s": round(_pct(r["first_s"], 0.95), 3),
            "decode_tok_s_p50": round(statistics.median(r["tok_s"]), 2),
            "correct": len(right),
            "correct_questions": right,
            "per_question": [
                {"question": q, "heard": h, "answer": a, "first_token_s": round(f, 3)}
                for (q, _), h, a, f in zip(QUESTIONS, r["heard"], r["answers"], r["first_s"], strict=True)
            ],
        }
        row = rows[name]
        print(
            f"{name:55s} {row['first_token_p50_s']:15.3f}s {row['first_token_p95_s']:7.3f}s "
            f"{row['decode_tok_s_p50']:13.1f} {len(right):>5d}/{len(QUESTIONS)}"
        )
    [cached, cold, plain] = rows.values()
    ratio = round(cached["first_token_p50_s"] / plain["first_token_p50_s"], 2)
    print(f"first-token ratio embedded backend (system prompt cached) / plain (p50): {ratio}")
    numbers = {
        "lm_dtype": dtype,
        "backend_load_s": round(load_s, 2),  # Whisper base + the LLM from the prepared cache, on the main thread
        "prepared_cache_bytes": cache_bytes,
        "speech_s": [round(min(secs), 1), round(max(secs), 1)],
        "spoken_set_correct": f"{cold['correct']}/{len(QUESTIONS)}",  # the test asserts this row's outcome
        "first_token_ratio_cached_over_plain_p50": ratio,
        "approaches": rows,
    }
    record.write(numbers, torch_threads=threads, notes=args.notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
