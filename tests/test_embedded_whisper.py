"""The embedded backend's own Whisper against transformers' WhisperForConditionalGeneration on the same weights.

A tiny random model checks the encoder (30 s window) and the decoder (incremental self-attention cache, cross
attention) logits; the loop detector is checked on its own; the slow test loads the CTranslate2 conversion of the
real Whisper base into transformers strictly (only the tied `proj_out` is absent).
"""

from __future__ import annotations

import pytest
import torch

from assistant.models.whisper import Whisper, WhisperDims, _repeat_start

DIMS = WhisperDims(
    n_mels=80,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_heads=4,
    decoder_heads=4,
    ffn_dim=64,
    vocab_size=120,
    max_source_positions=1500,
    max_target_positions=64,
)


def _hf_model(d: WhisperDims):
    from transformers import WhisperForConditionalGeneration

    cfg = d.transformers_config(decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return WhisperForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    hf = _hf_model(DIMS)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sd = {k: v for k, v in hf.state_dict().items() if k != "proj_out.weight"}  # tied to the token embedding
    return Whisper(DIMS, sd), hf


def test_encoder_and_incremental_decoder_match_transformers(tiny_pair):
    ours, hf = tiny_pair
    mel = torch.randn(1, 80, 3000)
    tokens = torch.randint(0, DIMS.vocab_size, (1, 9))
    with torch.no_grad():
        ref_enc = hf.model.encoder(mel).last_hidden_state
        ref = hf(input_features=mel, decoder_input_ids=tokens).logits
    enc = ours.encode(mel)
    torch.testing.assert_close(enc, ref_enc, atol=1e-4, rtol=1e-4)
    cross = ours.cross_kv(enc)
    first, kv = ours.decode(tokens[:, :4], cross, None)  # the prompt in one pass, then one token at a time
    steps = [first]
    for i in range(4, 9):
        logits, kv = ours.decode(tokens[:, i : i + 1], cross, kv)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-4, rtol=1e-4)


def test_repeat_detector_finds_a_loop_and_leaves_normal_text():
    assert _repeat_start([5, 6, 7, 8, 9, 5, 6, 7, 8, 9]) == 5
    assert _repeat_start([1, 2, 3, 4, 5, 6, 7]) is None
    assert _repeat_start([1, 1, 1]) is None  # shorter than a block: e.g. "..." or "100" digits


@pytest.mark.slow
def test_real_conversion_loads_strictly_into_transformers(embedded_paths):
    import json

    from safetensors.torch import load_file

    dims = WhisperDims(**json.loads((embedded_paths.whisper_dir / "dims.json").read_text()))
    assert (dims.d_model, dims.encoder_layers, dims.vocab_size) == (512, 6, 51865)  # Whisper base, multilingual
    hf = _hf_model(dims)
    missing, unexpected = hf.load_state_dict(load_file(str(embedded_paths.whisper_dir / "model.safetensors")), False)
    assert missing == ["proj_out.weight"] and unexpected == []
