"""The embedded backend's own Qwen2 decoder against transformers' Qwen2ForCausalLM, and its KV-cache paths.

Tiny random models check the network (GQA, q/k/v biases, rotary, RMSNorm, untied head), chunked prefill == one
prefill, decode == full forward, and batched decode over caches of different lengths == one at a time. The slow
test compares against transformers on the real converted GGUF weights (which also proves the GGUF Q/K rows are in
transformers' order, not llama.cpp's permuted rotary layout).
"""

from __future__ import annotations

import pytest
import torch

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
