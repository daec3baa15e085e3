"""The QWen LM fast paths against slow references: KV-cache decoding equals a full forward pass (with NTK and logn
active), chunked prefill equals one prefill, batched decode over caches of different lengths and NTK alphas equals
decoding each alone; dynamic-NTK alpha schedule."""

import copy

import numpy as np
import pytest
import torch

from assistant.audio.frontend import mel_frames
from assistant.backends.base import Utterance
from assistant.backends.qwen_audio import QwenAudioBackend
from assistant.models.qwen_audio_encoder import span_tokens

ATOL = 1e-4  # float32 logits up to ~15; different matmul shapes reorder sums at the 1e-6 level


@pytest.fixture(scope="module")
def lm(tiny_ntk_qwen_dir):
    return QwenAudioBackend.from_checkpoint(tiny_ntk_qwen_dir, device="cpu").lm  # seq_length 64


def random_ids(n, seed):
    return torch.randint(0, 151643, (n,), generator=torch.Generator().manual_seed(seed))


def test_rope_alpha_schedule(lm):
    assert lm.cfg.seq_length == 64
    assert [lm.rope_alpha_for(n) for n in (1, 32, 64, 65, 128, 129, 256, 257, 512)] == [1, 1, 1, 3, 3, 7, 7, 15, 15]


@torch.inference_mode()
@pytest.mark.parametrize("n_prompt,n_new", [(20, 12), (70, 30)])  # alpha 1 without logn; alpha 3 with logn
def test_kv_cache_decoding_equals_full_forward(lm, n_prompt, n_new):
    ids = random_ids(n_prompt + n_new, seed=n_prompt)
    full_cache = lm.new_cache()
    full = lm.prefill(lm.embed(ids), full_cache, all_logits=True)
    cache = lm.new_cache()
    rows = [lm.prefill(lm.embed(ids[:n_prompt]), cache)[0]]
    assert cache.rope_alpha == full_cache.rope_alpha
    for i in range(n_prompt, n_prompt + n_new - 1):
        rows.append(lm.decode(lm.embed(ids[i : i + 1]), [cache])[0])
    torch.testing.assert_close(torch.stack(rows), full[n_prompt - 1 : -1], atol=ATOL, rtol=0)
    assert cache.length == full_cache.length - 1


@torch.inference_mode()
@pytest.mark.parametrize("first,second", [(40, 20), (70, 30)])  # totals 60 (alpha 1) and 100 (alpha 3, logn)
def test_chunked_prefill_equals_one_prefill(lm, first, second):
    ids = random_ids(first + second, seed=first)
    cache = lm.new_cache()
    a = lm.prefill(lm.embed(ids[:first]), cache, all_logits=True)
    b = lm.prefill(lm.embed(ids[first:]), cache, all_logits=True)  # a non-empty cache keeps its alpha
    ref_cache = lm.new_cache()
    ref = lm.prefill(lm.embed(ids), ref_cache, all_logits=True)
    assert cache.rope_alpha == ref_cache.rope_alpha
    torch.testing.assert_close(torch.cat([a, b]), ref, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batched_decode_equals_unbatched_across_lengths_and_alphas(lm):
    caches, next_ids = [], []
    for n, seed in ((30, 1), (100, 2), (200, 3)):  # alphas 1, 3, 7
        c = lm.new_cache()
        lm.prefill(lm.embed(random_ids(n, seed)), c)
        caches.append(c)
        next_ids.append(int(random_ids(1, seed + 10)[0]))
    assert [c.rope_alpha for c in caches] == [1.0, 3.0, 7.0]
    alone_caches = [copy.deepcopy(c) for c in caches]
    for _ in range(3):
        x = lm.embed(torch.tensor(next_ids))
        batched = lm.decode(x, caches)
        alone = torch.cat([lm.decode(x[i : i + 1], [alone_caches[i]]) for i in range(3)])
        torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
        next_ids = batched.argmax(-1).tolist()
    for c, a in zip(caches, alone_caches, strict=True):
        assert c.length == a.length
        for layer in range(lm.cfg.n_layers):
            torch.testing.assert_close(c.k[layer][:, : c.length], a.k[layer][:, : a.length], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_bfloat16_selectable(tiny_qwen_dir):
    b = QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu", dtype="bfloat16")
    assert b.lm.dtype == torch.bfloat16 and b.encoder.dtype == torch.bfloat16
    logits = b.lm.prefill(b.lm.embed(random_ids(16, 5)), b.lm.new_cache())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    tone = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    [turn] = b.prepare([Utterance(key="a", audio=tone)], [1])
    emb = turn.audio_embeds["a"]
    assert emb.dtype == torch.bfloat16 and emb.shape == (span_tokens(mel_frames(8000)), 32)
    assert torch.isfinite(emb.float()).all()
