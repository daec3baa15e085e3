"""Embedded backend latency: end of utterance -> first answer token (p50/p95) and decode tokens/s, side by side with
the plain cascade (transformers `generate()` for Whisper, then `generate()` for the LLM, same weights), one run.

Run: `python -m bench.embedded_latency [--tokens N] [--threads N]`. The question set (espeak-ng `en` voice, 150 wpm,
16 kHz mono) is shared with the tests (`tests/test_embedded_backend.py`), which check the answers by keyword.

"Ours" is what the server does for a turn: Whisper on the clip plus a short padding (full 30 s window only when
the short result looks unreliable), then a prefill onto the conversation's KV cache and the first token. Two cases:
`cold` prefills the whole prompt; `session` has the system prompt already cached, as in any conversation after its
first turn (the engine keeps each session's cache). Greedy decoding everywhere.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many days are in a week?", ("seven", "7")),
    ("What is two plus three?", ("five", "5")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the boiling point of water in Celsius?", ("100", "hundred")),
    ("Which animal says moo?", ("cow",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("Who painted the Mona Lisa?", ("leonardo", "vinci")),
    ("What is ten minus four?", ("six", "6")),
    ("What is the chemical symbol for gold?", ("au",)),
]
SYNTH_TIMEOUT_S = 60.0


def synthesize(text: str, wav_path: Path) -> np.ndarray:
    """Speak `text` with espeak-ng (default `en` voice, 150 wpm); returns 16 kHz mono float32 and writes it to
    `wav_path` as 16-bit PCM (for `ask --audio`)."""
    import soxr

    raw = wav_path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw), text], check=True, timeout=SYNTH_TIMEOUT_S)
    with wave.open(str(raw)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    raw.unlink()
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 16000).astype(np.float32)
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype(np.int16).tobytes())
    return audio


def correct(answer: str, keywords: tuple[str, ...]) -> bool:
    """Any keyword as a whole word ("au" must not match "because")."""
    low = answer.lower()
    return any(re.search(rf"\b{re.escape(k)}\b", low) for k in keywords)


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
            lm.prefill(lm.embed(torch.tensor(system_ids[:n_sys])), cache)
        t0 = time.perf_counter()
        [turn] = backend.prepare([Utterance(key=f"q{i}", audio=audio)], [1])
        ids = backend.build_prompt(backend.default_system_prompt, [], turn, backend.max_window_tokens).ids
        logits = lm.prefill(lm.embed(torch.tensor(ids[cache.length :])), cache)
        nxt = int(logits[0, : tok.n_valid].argmax())
        firsts.append(time.perf_counter() - t0)
        out = [nxt]
        t1 = time.perf_counter()
        while len(out) < n_tokens and out[-1] not in tok.stop_ids:
            logits = lm.decode(lm.embed(torch.tensor([out[-1]])), [cache])
            out.append(int(logits[0, : tok.n_valid].argmax()))
        if len(out) > 1:
            rates.append((len(out) - 1) / (time.perf_counter() - t1))
        answers.append(tok.decode([t for t in out if t not in tok.stop_ids]).strip())
        heard.append(turn.transcript)
    return {"first_s": firsts, "tok_s": rates, "answers": answers, "heard": heard}


def _dummy_turn():
    from assistant.backends.base import PreparedTurn

    return PreparedTurn(key="x", user_text="x")


def load_plain(embedded_paths, dtype):
    """transformers' Whisper and Qwen2 on the very same converted tensors."""
    import json

    from safetensors.torch import load_file
    from transformers import GenerationConfig, Qwen2ForCausalLM, WhisperForConditionalGeneration

    from assistant.models.qwen2_lm import Qwen2Dims
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
    qdims = Qwen2Dims.from_json(embedded_paths.llm_dir / "config.json")
    llm = Qwen2ForCausalLM(qdims.transformers_config()).eval()
    llm.load_state_dict(load_file(str(embedded_paths.llm_dir / "model.safetensors")), strict=True)
    return whisper.float(), llm.to(dtype), wtok


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
        ids = torch.tensor([backend.build_prompt(backend.default_system_prompt, [], turn, 10**6).ids])
        with torch.inference_mode():
            llm.generate(ids, max_new_tokens=1, do_sample=False)
        firsts.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = llm.generate(ids, max_new_tokens=n_tokens, do_sample=False, eos_token_id=sorted(tok.stop_ids))
        gen = out[0, ids.shape[1] :].tolist()
        if len(gen) > 1:
            rates.append(len(gen) / (time.perf_counter() - t1))  # includes one prefill: the plain path pays it
        answers.append(tok.decode([t for t in gen if t not in tok.stop_ids]).strip())
        heard.append(text)
    return {"first_s": firsts, "tok_s": rates, "answers": answers, "heard": heard}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="answer tokens decoded per question (greedy)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    import torch

    from assistant.backends.embedded import EmbeddedBackend
    from assistant.config import load_config
    from assistant.weights.cache import ensure_prepared

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config()
    paths = ensure_prepared(cfg)
    backend = EmbeddedBackend.from_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        audios = [synthesize(q, Path(tmp) / f"q{i}.wav") for i, (q, _) in enumerate(QUESTIONS)]
    whisper, llm, wtok = load_plain(paths, backend.lm.dtype)
    run_ours(backend, audios[:1], 4, True)  # warm-up (first-call allocations, oneDNN kernels)
    run_plain(whisper, llm, wtok, backend, audios[:1], 4)
    # Interleaved per question, so the load of this shared machine hits every approach alike.
    runs = {
        "ours, session cache": lambda a: run_ours(backend, a, args.tokens, True),
        "ours, cold cache": lambda a: run_ours(backend, a, args.tokens, False),
        "plain transformers generate()": lambda a: run_plain(whisper, llm, wtok, backend, a, args.tokens),
    }
    results = {name: {"first_s": [], "tok_s": [], "answers": [], "heard": []} for name in runs}
    for audio in audios:
        for name, run in runs.items():
            for key, values in run([audio]).items():
                results[name][key] += values
    secs = [len(a) / 16000 for a in audios]
    print(
        f"{len(audios)} questions, {min(secs):.1f}-{max(secs):.1f} s of speech, torch threads {torch.get_num_threads()}"
    )
    print(f"LM dtype {str(backend.lm.dtype).removeprefix('torch.')}, {args.tokens} tokens max per answer")
    print(f"{'approach':32s} {'first token p50':>16s} {'p95':>8s} {'decode tok/s':>13s} {'correct':>8s}")
    for name, r in results.items():
        ok = sum(correct(a, kws) for a, (_, kws) in zip(r["answers"], QUESTIONS, strict=True))
        print(
            f"{name:32s} {statistics.median(r['first_s']):15.3f}s {_pct(r['first_s'], 0.95):7.3f}s "
            f"{statistics.median(r['tok_s']):13.1f} {ok:>5d}/{len(QUESTIONS)}"
        )
    plain = statistics.median(results["plain transformers generate()"]["first_s"])
    ours = statistics.median(results["ours, session cache"]["first_s"])
    print(f"first-token ratio ours/plain (p50): {ours / plain:.2f}")
    for name, r in results.items():
        print(f"\n{name}:")
        for (q, _), h, a in zip(QUESTIONS, r["heard"], r["answers"], strict=True):
            print(f"  {q!r} -> heard {h!r} -> {a!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
