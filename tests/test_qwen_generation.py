"""Sampling (greedy, temperature, top-k, top-p, repetition penalty, seeds, never an id >= n_valid), stop handling,
the UTF-8-safe stream decoder, the response text rule, config defaults, and `ask --json` in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from assistant.backends.base import SamplingParams
from assistant.config import GenerationConfig
from assistant.engine.decoding import StreamDecoder, response_text
from assistant.engine.sampling import Sampler, params_for
from assistant.models.tokenizer import QwenTokenizer

DATA = Path(__file__).parent / "data" / "qwen_golden"
ASK_TIMEOUT_S = 300  # generous: the machine is shared; the tiny model needs a few seconds


@pytest.fixture(scope="module")
def tok():
    return QwenTokenizer.for_qwen_audio()


def test_padding_ids_are_never_emitted():
    logits = torch.zeros(155947)
    logits[155200] = 100.0  # an untrained padding row with the largest logit
    logits[42] = 1.0
    assert Sampler(SamplingParams(greedy=True), n_valid=155165).pick(logits, []) == 42
    s = Sampler(SamplingParams(temperature=5.0, top_p=1.0, seed=1), n_valid=155165)
    assert all(s.pick(logits, []) < 155165 for _ in range(40))


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_p=1.0, seed=1234)
    runs = [[s.pick(logits, []) for _ in range(30)] for s in (Sampler(params, 1000), Sampler(params, 1000))]
    assert runs[0] == runs[1]
    other = Sampler(SamplingParams(temperature=1.5, top_p=1.0, seed=99), 1000)
    assert [other.pick(logits, []) for _ in range(30)] != runs[0]
    assert len(set(runs[0])) > 5  # really sampling


def test_top_k_top_p_and_temperature_restrict_the_choice():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    top2 = Sampler(SamplingParams(temperature=10.0, top_k=2, top_p=1.0, seed=0), 5)
    assert set(top2.pick(logits, []) for _ in range(200)) == {0, 1}
    # softmax(5,4,3,...) = 0.66, 0.24, 0.09 ...: top_p 0.5 keeps only the first, 0.8 the first two.
    p05 = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0), 5)
    assert set(p05.pick(logits, []) for _ in range(100)) == {0}
    p08 = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 5)
    assert set(p08.pick(logits, []) for _ in range(300)) == {0, 1}
    cold = Sampler(SamplingParams(temperature=0.0, seed=0), 5)
    assert cold.pick(logits, []) == 0


def test_repetition_penalty_discourages_seen_ids():
    logits = torch.tensor([2.0, 1.9, -1.0])
    s = Sampler(SamplingParams(greedy=True, repetition_penalty=1.2), 3, prompt_ids=[7, 7])
    assert s.pick(logits, []) == 0
    assert s.pick(logits, [0]) == 1  # 2.0 / 1.2 < 1.9
    neg = torch.tensor([-1.0, -1.1, -5.0])
    assert Sampler(SamplingParams(greedy=True, repetition_penalty=1.2), 3).pick(neg, [0]) == 1  # -1.2 < -1.1


def test_params_default_to_the_checkpoint_chat_config():
    chat = SamplingParams.from_generation_config({"do_sample": True, "top_p": 0.5, "top_k": 0})
    assert chat == SamplingParams(greedy=False, temperature=1.0, top_p=0.5, top_k=0, repetition_penalty=1.0)
    assert params_for(GenerationConfig(), chat).top_p == 0.5
    mine = GenerationConfig(top_p=0.9, greedy=True, seed=3)
    assert params_for(mine, chat) == SamplingParams(True, mine.temperature, 0.9, 20, 1.05, 3)
    assert params_for(GenerationConfig(), None).top_k == 20


def test_stream_decoder_never_splits_a_character(tok):
    text = "é𓀀你好𠀀 <|2.33|>"  # 𓀀 and 𠀀 are 4-byte characters spread over 3 byte-level tokens each
    ids = tok.encode("é𓀀你好𠀀 ") + [tok.special_ids["<|2.33|>"]]
    assert len(tok.encode("𓀀")) == 3
    d = StreamDecoder(tok)
    deltas = [d.push(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == text
    assert "" in deltas  # some ids released nothing: they held an incomplete character back
    assert not any("\ufffd" in delta for delta in deltas)
    broken = StreamDecoder(tok)
    assert broken.push(tok.encode("𓀀")[0]) == "" and broken.finish() == "\ufffd"


def test_response_text_rule(tok):
    ids = tok.encode("  Hi <|2.33|>") + [154104, 151645] + tok.encode("ignored")
    assert response_text(tok, ids) == "Hi <|2.33|><|22.33|>"
    assert response_text(tok, tok.encode("a") + [151644]) == "a"
    assert response_text(tok, tok.encode("𓀀")[:2]) == "\ufffd"


def run_ask(*args):
    cmd = [sys.executable, "-m", "assistant", "ask", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=ASK_TIMEOUT_S)


def test_ask_json_reproduces_the_golden_ids(tiny_qwen_dir):
    case = json.loads((DATA / "tiny.json").read_text())
    r = run_ask(
        "--model", str(tiny_qwen_dir), "--audio", str(DATA / "tiny.wav"), "--text", case["text"],
        "--greedy", "--max-new-tokens", "32", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_token_ids"] == case["prompt_token_ids"]
    assert out["output_token_ids"] == case["greedy"]["output_token_ids"]
    assert out["text"].startswith(case["greedy"]["response_text"])
    assert out["finish_reason"] == "length" and out["backend"] == "qwen-audio"


def test_ask_streams_text_and_reports_bad_audio(tiny_qwen_dir, tmp_path):
    r = run_ask("--model", str(tiny_qwen_dir), "--text", "hello", "--greedy", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    short = tmp_path / "short.wav"
    import soundfile

    soundfile.write(short, [0.0] * 100, 16000, subtype="PCM_16")
    r = run_ask("--model", str(tiny_qwen_dir), "--audio", str(short), "--json")
    assert r.returncode == 2 and "at least 480 samples" in r.stderr
    r = run_ask("--model", str(tmp_path), "--text", "hi")  # a directory without a checkpoint
    assert r.returncode == 2 and "config.json, it does not exist" in r.stderr


@pytest.mark.slow  # real embedded weights (prepared cache) and espeak-ng
def test_ask_on_the_embedded_backend_answers_a_spoken_question(tmp_path):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: install Debian's espeak-ng (make system-deps)")
    wav = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "What is the capital of France?"], check=True, timeout=ASK_TIMEOUT_S)
    r = run_ask("--model", "embedded", "--audio", str(wav), "--greedy", "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "embedded" and "france" in out["transcript"].lower()
    assert "Paris" in out["text"] and out["output_token_ids"]
