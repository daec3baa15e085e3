"""Every golden case of ../shared/qwen_audio_golden (copied to tests/data/qwen_golden) within its tolerances:
mel, audio embeddings, prefill logits, 32 greedy ids with per-step logits, response text, the 114-id and 190-id
prompts (NTK alpha 7 + logn on tiny-ntk) and the 205-id history prompt. Checkpoints are regenerated from the recipe."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from assistant.audio.frontend import log_mel, mel_frames
from assistant.audio.io import load_audio
from assistant.backends.base import Exchange, SamplingParams, Utterance
from assistant.backends.qwen_audio import QwenAudioBackend
from assistant.engine.decoding import generate_stream, prompt_embeddings, response_text

DATA = Path(__file__).parent / "data" / "qwen_golden"
ATOL_MEL, ATOL_EMB, ATOL_LOGITS = 1e-4, 1e-4, 1e-3  # golden README "Tolerances"


def golden(case):
    return json.loads((DATA / f"{case}.json").read_text()), np.load(DATA / f"{case}_expected.npz")


@pytest.fixture(scope="module")
def backends(tiny_qwen_dir, tiny_ntk_qwen_dir):
    return {
        "tiny": QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu"),
        "tiny-ntk": QwenAudioBackend.from_checkpoint(tiny_ntk_qwen_dir, device="cpu"),
    }


def turn_and_prompt(backend, case):
    c, _ = golden(case)
    audio = load_audio(DATA / f"{case}.wav")
    [turn] = backend.prepare([Utterance(key="golden", audio=audio, text=c["text"])], [1])
    return audio, turn, backend.build_prompt(c["system"], [], turn, backend.max_window_tokens)


@pytest.mark.parametrize("case", ["tiny", "tiny-ntk"])
def test_mel_and_lengths(case):
    c, e = golden(case)
    audio = load_audio(DATA / f"{case}.wav")
    assert len(audio) == c["audio"]["num_samples"]
    assert mel_frames(len(audio)) == c["audio"]["mel_len"]
    np.testing.assert_allclose(log_mel(audio).numpy(), e["mel"], atol=ATOL_MEL, rtol=0)


@pytest.mark.parametrize("case", ["tiny", "tiny-ntk"])
def test_prompt_ids_and_audio_embedding(backends, case):
    c, e = golden(case)
    _, turn, prompt = turn_and_prompt(backends[case], case)
    assert prompt.ids == c["prompt_token_ids"]
    assert len(prompt.ids) == c["prompt_len"]
    [span] = prompt.audio
    assert span.start == c["prompt_token_ids"].index(155163)
    assert span.embeds.shape[0] == c["audio_span_tokens"][0]
    np.testing.assert_allclose(span.embeds.numpy(), e["audio_emb"], atol=ATOL_EMB, rtol=0)


@pytest.mark.parametrize("case", ["tiny", "tiny-ntk"])
def test_prefill_logits_greedy_ids_and_step_logits(backends, case):
    c, e = golden(case)
    b = backends[case]
    _, _, prompt = turn_and_prompt(b, case)
    g = c["greedy"]
    with torch.inference_mode():
        cache = b.lm.new_cache()
        logits = b.lm.prefill(prompt_embeddings(b.lm, prompt), cache, all_logits=True)
        assert cache.rope_alpha == c["ntk_alpha"]
        assert logits.argmax(-1).tolist() == e["prefill_top1_ids"].tolist()
        np.testing.assert_allclose(logits.max(-1).values.numpy(), e["prefill_top1_logits"], atol=ATOL_LOGITS, rtol=0)
        last = logits[-1].numpy()
        np.testing.assert_allclose(last[e["prefill_last_ids"]], e["prefill_last_logits"], atol=ATOL_LOGITS, rtol=0)
        ids, row = [], logits[-1]
        for step in range(g["max_new_tokens"]):
            # Compare at the listed ids (one padding id appears in a top-5 list; we never emit those).
            np.testing.assert_allclose(row[g["top5_ids"][step]].numpy(), g["top5_logits"][step], atol=ATOL_LOGITS)
            ids.append(int(row[: b.tokenizer.n_valid].argmax()))
            row = b.lm.decode(b.lm.embed(torch.tensor([ids[-1]])), [cache])[0]
    assert ids == g["output_token_ids"]


@pytest.mark.parametrize("case", ["tiny", "tiny-ntk"])
def test_generate_stream_and_response_text(backends, case):
    c, _ = golden(case)
    b = backends[case]
    _, _, prompt = turn_and_prompt(b, case)
    steps = list(generate_stream(b, prompt, SamplingParams(greedy=True), max_new_tokens=32))
    ids = [s.token_id for s in steps if s.token_id is not None]
    assert ids == c["greedy"]["output_token_ids"]
    streamed = "".join(s.text for s in steps)
    assert streamed.strip() == response_text(b.tokenizer, ids)
    # The reference's chat() drops the last id when generation ends by length without a stop id (its stop search
    # leaves the index on the last token): its text equals ours for the first 31 ids.
    assert response_text(b.tokenizer, ids[:-1]) == c["greedy"]["response_text"]
    if case == "tiny-ntk":
        assert "<|27.04|>" in streamed  # timestamp special kept in the text


def test_history_prompt_of_205_ids(backends):
    h = json.loads((DATA / "history.json").read_text())
    b = backends["tiny"]
    t1, t2 = b.prepare(
        [
            Utterance(key="a1", audio=load_audio(DATA / "tiny.wav"), text="What is in this recording?"),
            Utterance(
                key="a2", audio=load_audio(DATA / "history_audio_2.wav"), text="And what does this second clip say?"
            ),
        ],
        [1, 2],
    )
    history = [Exchange(user=t1, reply=h["history"][0]["response"])]
    prompt = b.build_prompt(h["system"], history, t2, b.max_window_tokens)
    assert prompt.ids == h["prompt_token_ids"]
    assert prompt.history_kept == 1
    assert [s.embeds.shape[0] for s in prompt.audio] == h["audio_span_tokens"]
    assert [prompt.ids[s.start] for s in prompt.audio] == [155163, 155163]
    assert [prompt.ids[s.start + len(s.embeds) - 1] for s in prompt.audio] == [155164, 155164]


def test_history_window_keeps_newest_exchanges_that_fit(backends):
    b = backends["tiny"]
    clip = load_audio(DATA / "tiny.wav")
    turns = b.prepare([Utterance(key=f"k{i}", audio=clip, text=f"question {i}") for i in range(4)], [1, 2, 3, 4])
    history = [Exchange(user=t, reply=f"  answer {i}\n") for i, t in enumerate(turns[:3])]
    full = b.build_prompt("", history, turns[3], 10**6)
    assert full.history_kept == 3
    system_len = full.ids.index(151645) + 1
    exchange_len = (len(full.ids) - system_len - len(b.build_prompt("", [], turns[3], 10**6).ids) + system_len) // 3
    # system + kept history must stay strictly under the window; the current query is not counted.
    for kept in range(4):
        window = system_len + kept * exchange_len
        assert b.build_prompt("", history, turns[3], window).history_kept == max(kept - 1, 0)
        assert b.build_prompt("", history, turns[3], window + 1).history_kept == kept
    two = b.build_prompt("", history, turns[3], system_len + 2 * exchange_len + 1)
    assert [s.key for s in two.audio] == ["k1", "k2", "k3"]  # the newest two exchanges, then the query
    end_of_question = two.ids.index(151645, two.audio[0].start + 82)
    end_of_reply = two.ids.index(151645, end_of_question + 1) - 1  # the assistant turn after k1's question
    reply_ids = b.tokenizer.encode("answer 1")  # re-encoded from the stripped text
    assert two.ids[end_of_reply - len(reply_ids) + 1 : end_of_reply + 1] == reply_ids
    zero = b.tokenizer.encode("answer 0")
    assert not any(two.ids[i : i + len(zero)] == zero for i in range(len(two.ids)))


@pytest.mark.parametrize("flag", ["use_dynamic_ntk", "use_logn_attn"])
def test_tiny_ntk_ids_depend_on_ntk_and_logn(tiny_ntk_qwen_dir, tmp_path, flag):
    """The tiny-ntk case really exercises both: switching either off in config.json changes the greedy ids."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ntk_qwen_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[flag] = False
    (d / "config.json").write_text(json.dumps(cfg))
    b = QwenAudioBackend.from_checkpoint(d, device="cpu")
    _, _, prompt = turn_and_prompt(b, "tiny-ntk")
    ids = [s.token_id for s in generate_stream(b, prompt, SamplingParams(greedy=True), max_new_tokens=4)]
    assert ids != golden("tiny-ntk")[0]["greedy"]["output_token_ids"][:4]
