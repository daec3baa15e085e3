"""The embedded backend's own Qwen2 decoder against transformers' Qwen2ForCausalLM, and its KV-cache paths.

Tiny random models check the network (GQA, q/k/v biases, rotary, RMSNorm, untied head), chunked prefill == one
prefill, decode == full forward, batched decode over caches of different lengths == one at a time (also while the
batch's padded K/V copy is kept across steps, responses join and leave, and a cache is truncated under it), and the
quantized matmuls (int8, int4) against the slow reference: the same model unquantized on the weights the quantized
layers stand for (`quant.dequantized`). The slow tests compare against transformers on the real converted GGUF
weights (which also proves the GGUF Q/K rows are in transformers' order, not llama.cpp's permuted rotary layout), and
greedy answers of the quantized real model against the unquantized one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from assistant.backends.base import PreparedTurn
from assistant.models import quant
from assistant.models.qwen2_lm import Qwen2Dims, Qwen2LM

DIMS = Qwen2Dims(
    n_layers=2,
    hidden_size=64,
    intermediate_size=96,
    n_heads=4,
    n_kv_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    vocab_size=320,
    tied_embeddings=False,
)


def _hf_config(d: Qwen2Dims):
    return d.transformers_config()


@pytest.fixture(scope="module")
def tiny_pair():
    """(our model, transformers model) with the same random weights, float32."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(_hf_config(DIMS)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # biases too: the HF init leaves them at zero
    ours = Qwen2LM(DIMS, dict(hf.state_dict()), torch.device("cpu"), torch.float32)
    return ours, hf


def test_prefill_logits_match_transformers(tiny_pair):
    ours, hf = tiny_pair
    ids = torch.randint(0, DIMS.vocab_size, (23,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    got = ours.prefill(ours.embed(ids), ours.new_cache(), all_logits=True)
    assert got.shape == (23, DIMS.vocab_size)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_equal_one_full_pass(tiny_pair):
    ours, _ = tiny_pair
    ids = torch.randint(0, DIMS.vocab_size, (20,))
    full = ours.prefill(ours.embed(ids), ours.new_cache(), all_logits=True)
    cache = ours.new_cache()
    a = ours.prefill(ours.embed(ids[:7]), cache, all_logits=True)
    b = ours.prefill(ours.embed(ids[7:15]), cache, all_logits=True)
    steps = [ours.decode(ours.embed(ids[i : i + 1]), [cache]) for i in range(15, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat([a, b, *steps]), full, atol=1e-4, rtol=1e-4)


def test_batched_decode_over_different_lengths_equals_unbatched(tiny_pair):
    ours, _ = tiny_pair
    prompts = [torch.randint(0, DIMS.vocab_size, (n,)) for n in (3, 17, 9)]
    nxt = torch.randint(0, DIMS.vocab_size, (3,))
    solo = []
    for p, t in zip(prompts, nxt, strict=True):
        c = ours.new_cache()
        ours.prefill(ours.embed(p), c)
        solo.append(ours.decode(ours.embed(t[None]), [c])[0])
    caches = []
    for p in prompts:
        c = ours.new_cache()
        ours.prefill(ours.embed(p), c)
        caches.append(c)
    batched = ours.decode(ours.embed(nxt), caches)
    assert [c.length for c in caches] == [4, 18, 10]
    torch.testing.assert_close(batched, torch.stack(solo), atol=1e-4, rtol=1e-4)


def _solo_step(lm, cache, token: int) -> torch.Tensor:
    """One unbatched decode step on a copy of `cache` (the reference a batch row must equal); `lm` must not be the
    batch's model (a single-row decode drops the model's batch copy)."""
    alone = lm.new_cache()
    alone.copy_prefix_from(cache, cache.length)
    return lm.decode(lm.embed(torch.tensor([token])), [alone])[0]


def test_batched_kv_copy_follows_steps_joins_leaves_and_truncation(tiny_pair):
    """Every row of every batched step equals its unbatched step, while the batch's padded K/V copy is reused,
    rebuilt when a conversation joins or leaves, when one outgrows the copy, and when one is truncated under it."""
    ours, _ = tiny_pair
    solo = copy.copy(ours)  # same weights, its own batch state
    gen = torch.Generator().manual_seed(1)
    caches = []
    for n in (5, 31, 12, 2):
        c = ours.new_cache()
        ours.prefill(ours.embed(torch.randint(0, DIMS.vocab_size, (n,), generator=gen)), c)
        caches.append(c)
    # "redo 3": conversation 3 loses its last 4 positions and gets 4 other tokens: same length, other contents
    plan = [[0, 1, 2]] * 3 + [[0, 1, 2, 3]] * 2 + [[1, 3]] * 2 + ["redo 3"] + [[1, 3]] * 140  # 140 > headroom
    rebuilt, previous = 0, None
    for step in plan:
        if step == "redo 3":
            caches[3].truncate(2)
            ours.prefill(ours.embed(torch.randint(0, DIMS.vocab_size, (4,), generator=gen)), caches[3])
            continue
        batch = [caches[i] for i in step]
        tokens = torch.randint(0, DIMS.vocab_size, (len(step),), generator=gen)
        want = torch.stack([_solo_step(solo, c, int(t)) for c, t in zip(batch, tokens, strict=True)])
        got = ours.decode(ours.embed(tokens), batch)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        rebuilt += ours._decode_batch is not previous
        previous = ours._decode_batch
    assert caches[3].length == 6 + 140 and caches[1].length == 31 + 3 + 2 + 2 + 140
    assert rebuilt == 5  # first step, a join, a leave, the redo, outgrowing the copy: the other 143 steps reused it


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_matches_its_dequantized_reference(tiny_pair, mode):
    """The quantized kernels (bf16 activations) against the unquantized model on the weights they stand for:
    prefill, decode and a batched decode over different lengths; then against the float weights, looser."""
    _, hf = tiny_pair
    sd = dict(hf.state_dict())
    reference_w = {
        k: quant.dequantized(v, mode) if k.endswith("proj.weight") or k == "lm_head.weight" else v
        for k, v in sd.items()
    }
    reference = Qwen2LM(DIMS, reference_w, torch.device("cpu"), torch.float32)
    fast = Qwen2LM(DIMS, sd, torch.device("cpu"), torch.float32, mode)
    full = Qwen2LM(DIMS, sd, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, DIMS.vocab_size, (21,), generator=torch.Generator().manual_seed(2))
    for lm_a, lm_b, tol in ((fast, reference, 2e-2), (fast, full, 0.2 if mode == "int4" else 5e-2)):
        caches = {lm: [lm.new_cache() for _ in range(3)] for lm in (lm_a, lm_b)}
        logits = {}
        for lm in (lm_a, lm_b):
            first = lm.prefill(lm.embed(ids), caches[lm][0], all_logits=True)
            lm.prefill(lm.embed(ids[:7]), caches[lm][1])
            lm.prefill(lm.embed(ids[:13]), caches[lm][2])
            step = lm.decode(lm.embed(ids[:3]), caches[lm])
            logits[lm] = torch.cat([first, step])
        torch.testing.assert_close(logits[lm_a], logits[lm_b], atol=tol, rtol=tol)


def test_quantized_matrices_are_cached_beside_the_weights_and_reloaded(tiny_pair, tmp_path):
    """The first quantized load writes the quantized matrices next to model.safetensors; the next load reads them
    (no quantizing) and gives the same logits."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    _, hf = tiny_pair
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(DIMS)))
    ids = torch.randint(0, DIMS.vocab_size, (9,), generator=torch.Generator().manual_seed(4))
    first = Qwen2LM.load(tmp_path, "cpu", "float32", "int4")
    cached = tmp_path / f"quantized-int4-v{quant.QUANT_FORMAT}.safetensors"
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    again = Qwen2LM.load(tmp_path, "cpu", "float32", "int4")
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    want = first.prefill(first.embed(ids), first.new_cache(), all_logits=True)
    torch.testing.assert_close(again.prefill(again.embed(ids), again.new_cache(), all_logits=True), want)


def test_int4_grid_reproduces_weights_already_on_a_4_bit_grid():
    """A weight whose groups of 32 already hold min + scale * q (q in 0..15, as a GGUF Q4_K block stores them) comes
    back to bf16 precision: the int4 grid loses nothing the source had not already lost."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (64, 128), generator=gen).float()
    q[:, ::32], q[:, 1::32] = 0.0, 15.0  # every group spans the whole range, as the GGUF quantizer's blocks do
    scale = torch.rand(64, 4, 1, generator=gen) * 0.01 + 0.001
    lo = -torch.rand(64, 4, 1, generator=gen) * 0.05
    w = (q.view(64, 4, 32) * scale + lo).view(64, 128)
    err = (quant.dequantized(w, "int4") - w).abs().max() / w.abs().max()
    assert err < 2**-7  # bf16 scales and zero points: 8 significant bits


def test_unknown_quantization_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"none, int8, int4; got 'int3'"):
        quant.resolve_quantization("int3", torch.device("cpu"))
    assert quant.resolve_quantization("auto", torch.device("cpu")) == quant.AUTO_QUANTIZATION["cpu"]


def test_cache_growth_past_initial_capacity_and_rope_table(tiny_pair):
    ours, _ = tiny_pair
    ids = torch.randint(0, DIMS.vocab_size, (300,))  # > KVCache's initial 256 positions
    full = ours.prefill(ours.embed(ids), ours.new_cache(), all_logits=True)
    cache = ours.new_cache()
    ours.prefill(ours.embed(ids[:250]), cache)
    got = torch.cat([ours.decode(ours.embed(ids[i : i + 1]), [cache]) for i in range(250, 300)])
    torch.testing.assert_close(got, full[250:], atol=1e-4, rtol=1e-4)


def test_missing_weight_is_named():
    from transformers import Qwen2ForCausalLM

    sd = dict(Qwen2ForCausalLM(_hf_config(DIMS)).state_dict())
    del sd["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        Qwen2LM(DIMS, sd, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_real_weights_match_transformers(embedded_paths):
    """Our decoder on the converted GGUF vs transformers' Qwen2 on the same tensors, float32, a real chat prompt."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    from assistant.backends.embedded import qwen2_tokenizer

    dims = Qwen2Dims.from_json(embedded_paths.llm_dir / "config.json")
    weights = load_file(str(embedded_paths.llm_dir / "model.safetensors"))
    tok = qwen2_tokenizer(embedded_paths.llm_dir)
    ids = [tok.im_start_id] + tok.encode("user\nWhat is the capital of France?") + [tok.im_end_id]
    ids += tok.encode("\n") + [tok.im_start_id] + tok.encode("assistant\n")
    ids_t = torch.tensor(ids)
    ours = Qwen2LM(dims, weights, torch.device("cpu"), torch.float32)
    got = ours.prefill(ours.embed(ids_t), ours.new_cache(), all_logits=True)
    del ours
    hf = Qwen2ForCausalLM(_hf_config(dims)).eval()
    hf.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        ref = hf(ids_t[None]).logits[0].float()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    assert int(got[-1].argmax()) == int(ref[-1].argmax())


# Bounded work for the real-weight comparison: the first spoken-set questions typed (no Whisper), greedy, at most
# QUANT_CHECK_TOKENS new tokens (each answer names its keyword within its first sentence). The criterion is what
# `python -m bench.quant_accuracy` measured on the spoken set (bench/results/quant_accuracy-20261203.json): int8
# answered correctly wherever float32 did (15 of 16 answers word for word the same), int4 missed one of those.
QUANT_CHECK_QUESTIONS = 6
QUANT_CHECK_TOKENS = 24


def _real_answers(paths, quantization: str) -> list[str]:
    """Greedy answers of the real LLM, quantized as asked, to the first QUANT_CHECK_QUESTIONS spoken-set questions
    typed as text, at most QUANT_CHECK_TOKENS tokens each. One model in memory at a time."""
    from assistant.backends.embedded import EmbeddedBackend, qwen2_tokenizer
    from assistant.config import load_config
    from bench.spoken_set import QUESTIONS, greedy_answer

    system = load_config().embedded.system_prompt
    lm = Qwen2LM.load(paths.llm_dir, "cpu", "auto", quantization)
    backend = EmbeddedBackend(lm, qwen2_tokenizer(paths.llm_dir), None, system)
    questions = QUESTIONS[:QUANT_CHECK_QUESTIONS]
    prompts = [backend.build_prompt(system, [], PreparedTurn(key="q", user_text=q), 2048).ids for q, _ in questions]
    return [greedy_answer(backend, ids, max_tokens=QUANT_CHECK_TOKENS).text for ids in prompts]


@pytest.mark.slow
def test_real_weights_quantized_answers_are_as_correct_as_unquantized(embedded_paths):
    """Greedy answers of the int8 and int4 models against the unquantized one on the same typed questions: int8 is
    correct wherever the unquantized model is; int4 misses at most one of those."""
    from bench.spoken_set import QUESTIONS, correct

    questions = QUESTIONS[:QUANT_CHECK_QUESTIONS]
    reference = _real_answers(embedded_paths, "none")
    right = [correct(a, kw) for a, (_, kw) in zip(reference, questions, strict=True)]
    assert sum(right) >= QUANT_CHECK_QUESTIONS - 1, f"the unquantized model itself: {reference}"
    for mode, may_lose in (("int8", 0), ("int4", 1)):
        got = _real_answers(embedded_paths, mode)
        lost = [
            f"{q!r} -> {a!r} (unquantized: {want!r})"
            for (q, kw), want, a, ok in zip(questions, reference, got, right, strict=True)
            if ok and not correct(a, kw)
        ]
        assert len(lost) <= may_lose, f"{mode} lost {len(lost)} (at most {may_lose}): {lost}"
