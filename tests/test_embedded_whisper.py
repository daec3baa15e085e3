"""The embedded backend's own Whisper against transformers' WhisperForConditionalGeneration on the same weights.

A tiny random model checks the encoder (30 s window) and the decoder (incremental self-attention cache, cross
attention) logits; the loop detector is checked on its own; the batched beam search (cached, reordered K/V) against
a slow reference that recomputes every hypothesis from its prompt, and at beam 1 against greedy decoding; the slow
test loads the CTranslate2 conversion of the real Whisper base into transformers strictly (only the tied
`proj_out` is absent).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from assistant.models.whisper import Whisper, WhisperDims, WhisperTranscriber, _repeat_start

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


# The tiny model's tokens: 100 words, then Whisper's special tokens in their order (an English-only model's).
EOT, SOT, EN, NO_TIMESTAMPS, START_OF_PREV = 100, 101, 102, 104, 106
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|notimestamps|>",
    "<|nocaptions|>",
    "<|startofprev|>",
]


def _tiny_transcriber(model: Whisper, tmp_path, beam_size: int) -> WhisperTranscriber:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(EOT)} | {tok: EOT + i for i, tok in enumerate(SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"lang_ids": [EN], "suppress_ids": [7], "suppress_ids_begin": [EOT, 3]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return WhisperTranscriber(model, tmp_path / "tokenizer.json", tmp_path / "config.json", beam_size)


def _reference_beam(tr: WhisperTranscriber, prompt: list[int], cross, limit: int, beam: int):
    """The rules of `WhisperTranscriber._beam`, written plainly for one row: no K/V cache (every hypothesis decoded
    from its prompt at every step), no batch, candidates sorted in Python. Returns (ids, summed logprob, looped)."""
    alive = [([], [])]
    finished = []  # (ranking score, ids, logprobs, looped)
    for step in range(limit + 1):
        if not alive or len(finished) >= beam:
            break
        cands = []
        for h, (ids, lps) in enumerate(alive):
            logits, _ = tr.model.decode(torch.tensor([prompt + ids]), cross, None)
            mask = tr.suppress_begin if step == 0 else tr.suppress
            lp = logits[0, -1].masked_fill(mask, float("-inf")).log_softmax(-1)
            cands += [(sum(lps) + float(lp[t]), h, t, float(lp[t])) for t in range(len(lp)) if not mask[t]]
        cands.sort(key=lambda c: -c[0])
        grown, capped = [], set()
        for score, h, tok, tok_lp in cands[: 2 * beam]:
            if len(grown) == beam:
                break
            ids, lps = alive[h]
            if tok == tr.eot:
                done = (score, ids, lps, False)
            elif step >= limit:
                if h in capped:
                    continue
                capped.add(h)
                done = (sum(lps), ids, lps, True)
            else:
                cut = _repeat_start(ids + [tok])
                if cut is None:
                    grown.append((ids + [tok], lps + [tok_lp]))
                    continue
                done = (sum(lps) + tok_lp, (ids + [tok])[:cut], lps + [tok_lp], True)
            if len(finished) < beam:
                finished.append(done)
        alive = [] if len(finished) >= beam else grown
    pool = finished or [(sum(lps), ids, lps, True) for ids, lps in alive]
    _, ids, lps, looped = max(pool, key=lambda f: f[0] / max(1, len(f[1])))
    return ids, sum(lps), looped


@pytest.mark.parametrize("limit", [3, 12, 40])
def test_beam_search_matches_a_slow_reference(tiny_pair, tmp_path, limit):
    """Three prompt rows over two clips (the rows of unsure languages share a clip), `beam` 4: the batched search
    with its cached, reordered K/V finds what the plain search finds, row by row; short limits end on the cap."""
    ours, _ = tiny_pair
    tr = _tiny_transcriber(ours, tmp_path, beam_size=4)
    torch.manual_seed(limit)
    cross = ours.cross_kv(ours.encode(torch.randn(2, 80, 3000)))
    prompts = [[SOT, NO_TIMESTAMPS, 11], [SOT, NO_TIMESTAMPS, 5], [SOT, NO_TIMESTAMPS, 9]]
    clip_of = [0, 1, 1]
    row_cross = [(k[clip_of], v[clip_of]) for k, v in cross]
    out, logprob, looped = tr._beam(torch.tensor(prompts), row_cross, [limit] * 3, 4)
    for r, prompt in enumerate(prompts):
        one_cross = [(k[clip_of[r] : clip_of[r] + 1], v[clip_of[r] : clip_of[r] + 1]) for k, v in cross]
        ids, lp, loop = _reference_beam(tr, prompt, one_cross, limit, 4)
        assert (out[r], looped[r]) == (ids, loop), f"row {r}"
        assert logprob[r] == pytest.approx(lp, abs=1e-4)
        assert 0 < len(out[r]) <= limit and not set(out[r]) & {EOT, 7}  # suppressed tokens never chosen


def test_beam_one_is_greedy_decoding(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    tr = _tiny_transcriber(ours, tmp_path, beam_size=1)
    torch.manual_seed(1)
    cross = ours.cross_kv(ours.encode(torch.randn(3, 80, 3000)))
    prompt = torch.tensor([[SOT, NO_TIMESTAMPS]] * 3)
    limits = [2, 20, 50]
    greedy, beam = tr._greedy(prompt, cross, limits), tr._beam(prompt, cross, limits, 1)
    assert greedy[0] == beam[0] and greedy[2] == beam[2]
    assert greedy[1] == pytest.approx(beam[1], abs=1e-4)


def test_the_transcriber_decodes_with_its_beam_size(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    with pytest.raises(ValueError, match="beam size 0: expected 1"):
        _tiny_transcriber(ours, tmp_path, beam_size=0)
    torch.manual_seed(2)
    feats = ours.encode(torch.randn(1, 80, 3000))
    speech = [np.zeros(3 * 16000, dtype=np.float32)]  # 3 s: a cap of 16 + 6 tokens per second
    for beam in (1, 4):
        tr = _tiny_transcriber(ours, tmp_path, beam)
        [heard] = tr.decode_features(feats, speech)
        ids, _, _ = _reference_beam(tr, [SOT, NO_TIMESTAMPS], ours.cross_kv(feats), 34, beam)
        assert not heard.no_speech and heard.language == "en"
        assert heard.token_ids == ids, beam


def test_the_text_said_before_is_the_previous_text_prompt(tiny_pair, tmp_path):
    """Clips told other texts said before (prompts of other lengths) decode in one call as each does alone, after
    `<|startofprev|>` and the text's last tokens (31 of this decoder's 64 positions)."""
    ours, _ = tiny_pair
    tr = _tiny_transcriber(ours, tmp_path, beam_size=2)
    long_text = " ".join(f"w{i % 100}" for i in range(300))
    assert tr.previous_ids("") == [] and tr.previous_ids(" w5  w6 ") == [START_OF_PREV, 5, 6]
    assert tr.previous_tokens == 31
    assert tr.previous_ids(long_text) == [START_OF_PREV] + [i % 100 for i in range(300)][-tr.previous_tokens :]
    torch.manual_seed(3)
    feats = ours.encode(torch.randn(3, 80, 3000))
    speech = [np.zeros(2 * 16000, dtype=np.float32)] * 3  # a cap of 28 tokens
    before = ["", "w5 w6", long_text]
    together = tr.decode_features(feats, speech, previous=before)
    for i, text in enumerate(before):
        [alone] = tr.decode_features(feats[i : i + 1], speech[:1], previous=[text])
        prompt = [*tr.previous_ids(text), SOT, NO_TIMESTAMPS]
        cap = min(28, DIMS.max_target_positions - 1 - len(prompt))  # the long prompt leaves 29 positions
        one_cross = [(k[i : i + 1], v[i : i + 1]) for k, v in ours.cross_kv(feats)]
        ids, _, _ = _reference_beam(tr, prompt, one_cross, cap, 2)
        assert together[i].token_ids == alone.token_ids == ids, i


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
