"""The embedded backend end to end on the real weights: spoken questions (espeak-ng) answered correctly, a Chinese
question answered in Chinese, batched transcription, the chatml prompt and its rolling window, and `ask`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from assistant.backends.base import Exchange, PreparedTurn, Utterance
from bench.spoken_set import QUESTIONS, answered_correctly, correct, greedy_answer, synthesize

pytestmark = pytest.mark.slow
ASK_TIMEOUT_S = 600.0

# The measured regression baseline, not a floor: the questions of bench/spoken_set.py answered correctly under greedy
# decoding (Whisper base transcript, Qwen2.5-Coder-0.5B-Instruct answer, ANSWER_TOKENS at most) with the default
# configuration ([embedded] quantization "auto" = int8 on the CPU). Measured on 2026-12-03 by
# `python -m bench.quant_accuracy` (bench/results/quant_accuracy-20261203.json, spoken set: float32 and int8 answer
# these same 13; int4 misses the spider). Since the ASR fix (trim + full 30 s window) Whisper hears "How many days are
# in a week?" as "How many made more than a week?" (first as Thai, English since the unsure-language rule) and "How
# many legs does a spider have?" well enough, so those two changed places (this test passed so on main 53a2a21).
# A change here is a change of the system's answers: measure again and update the list and README together (a CPU
# with native bf16 runs the LM in bf16 and may answer differently: measure there too).
ANSWERED_CORRECTLY = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is two plus three?",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
    "What is the largest planet in our solar system?",
    "How many legs does a spider have?",
    "What is the capital of Italy?",
    "What is the boiling point of water in Celsius?",
    "What is the capital of Germany?",
    "Who painted the Mona Lisa?",
    "What is ten minus four?",
    "What is the chemical symbol for gold?",
]


def answer_text(backend, turn: PreparedTurn, history: list[Exchange] | None = None) -> str:
    ids = backend.build_prompt(backend.default_system_prompt, history or [], turn, backend.max_window_tokens).ids
    return greedy_answer(backend, ids).text


def test_spoken_questions_give_the_measured_answers(embedded_backend, embedded_questions):
    utterances = [Utterance(key=f"q{i}", audio=audio) for i, (_, _, audio) in enumerate(embedded_questions)]
    turns = embedded_backend.prepare(utterances, list(range(1, len(utterances) + 1)))  # one batch
    answers, report = [], []
    for (question, keywords, _), turn in zip(embedded_questions, turns, strict=True):
        assert turn.transcript is not None and turn.user_text == turn.transcript and turn.audio_s > 1.0
        answers.append(answer_text(embedded_backend, turn))
        mark = "ok " if correct(answers[-1], keywords) else "BAD"
        report.append(f"{mark} {question!r} heard {turn.transcript!r} ({turn.language}) -> {answers[-1]!r}")
    print("\n".join(report))
    assert [q for q, _, _ in embedded_questions] == [q for q, _ in QUESTIONS]
    assert answered_correctly(answers) == ANSWERED_CORRECTLY, "\n".join(report)
    assert [t.language for t in turns] == ["en"] * len(turns)


def test_batched_transcription_equals_one_at_a_time(embedded_backend, embedded_questions):
    picks = [embedded_questions[i][2] for i in (0, 4, 6)]
    batch = embedded_backend.prepare([Utterance(key=f"b{i}", audio=a) for i, a in enumerate(picks)], [1, 2, 3])
    solo = [embedded_backend.prepare([Utterance(key=f"s{i}", audio=a)], [1])[0] for i, a in enumerate(picks)]
    assert [t.transcript for t in batch] == [t.transcript for t in solo]


def test_a_told_language_is_the_one_whisper_hears_in(embedded_backend, embedded_questions):
    """`Utterance.language` (a client's transcription language) reaches the recogniser: English goes to the
    English-only model (`[embedded] whisper_english`, tiny.en by default), another language to base told it (no
    detection); an unknown one is refused with the codes it knows; `[embedded] language` is the default of a turn
    that names none."""
    from assistant.backends.base import run_steps

    rec, audio = embedded_backend.recognisers, embedded_questions[0][2]
    assert rec.english is not None and not rec.english.multilingual and rec.main.multilingual
    assert {"en", "de", "zh"} <= set(embedded_backend.languages)
    en, de = embedded_backend.prepare(
        [Utterance(key="en", audio=audio, language="en-US"), Utterance(key="de", audio=audio, language="de")], [1, 2]
    )
    [tiny] = run_steps(rec.english.transcribe_steps([audio]))
    [base_de] = run_steps(rec.main.transcribe_steps([audio], languages=["de"]))
    assert (en.language, en.transcript) == ("en", tiny.text) and correct(en.transcript, ("france",))
    assert (de.language, de.transcript) == ("de", base_de.text) and de.transcript != en.transcript
    with pytest.raises(ValueError, match="not one Whisper knows.*expected one of .*en"):
        embedded_backend.prepare([Utterance(key="xx", audio=audio, language="xx")], [1])
    rec.language = "de"
    try:
        [default] = embedded_backend.prepare([Utterance(key="d", audio=audio)], [1])
    finally:
        rec.language = ""
    assert default.language == "de" and default.transcript == de.transcript


def test_silence_and_a_click_give_empty_transcripts_not_hallucinations(embedded_backend, embedded_questions):
    import numpy as np

    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(16000) * 1e-4).astype(np.float32)  # 1 s of near silence
    click = np.full(100, 0.3, dtype=np.float32)  # 6 ms: under Whisper's minimum
    speech = embedded_questions[0][2]
    utts = [Utterance(key="quiet", audio=quiet), Utterance(key="click", audio=click), Utterance(key="q", audio=speech)]
    quiet_t, click_t, speech_t = embedded_backend.prepare(utts, [1, 2, 3])
    assert quiet_t.transcript == "" and click_t.transcript == "" and click_t.language is None
    assert "france" in speech_t.transcript.lower()  # a silent neighbour in the batch does not disturb the others


def test_chinese_text_question_is_answered_in_chinese(embedded_backend):
    [turn] = embedded_backend.prepare([Utterance(key="zh", text="请问法国的首都是哪里？")], [1])
    assert turn.user_text == "请问法国的首都是哪里？" and turn.transcript is None
    answer = answer_text(embedded_backend, turn)
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in answer)
    assert "巴黎" in answer and cjk >= len(answer.replace(" ", "")) // 2, answer


def test_history_is_used_and_window_drops_oldest_first(embedded_backend):
    b, tok = embedded_backend, embedded_backend.tokenizer
    history = [
        Exchange(PreparedTurn(key=f"h{i}", user_text=f"Remember the number {n}."), f"OK, {n}.")
        for i, n in enumerate((11, 22, 33))
    ]
    turn = PreparedTurn(key="t", user_text="Which number did I ask you to remember last?")
    full = b.build_prompt("SYS", history, turn, 10_000)
    text = tok.decode(full.ids)
    expected = "<|im_start|>system\nSYS<|im_end|>\n"
    for n in (11, 22, 33):
        expected += f"<|im_start|>user\nRemember the number {n}.<|im_end|>\n<|im_start|>assistant\nOK, {n}.<|im_end|>\n"
    expected += f"<|im_start|>user\n{turn.user_text}<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected and full.history_kept == 3
    per_exchange = (len(full.ids) - len(b.build_prompt("SYS", [], turn, 10_000).ids)) // 3
    small = b.build_prompt("SYS", history, turn, len(full.ids) - per_exchange)  # room for two of three
    assert small.history_kept == 2 and "11" not in tok.decode(small.ids) and "33" in tok.decode(small.ids)
    tiny = b.build_prompt("SYS", history, turn, 1)  # no room at all: system and the question are still there
    assert tiny.history_kept == 0 and tok.decode(tiny.ids).startswith("<|im_start|>system\nSYS")
    # The history reaches the model: a fact from an earlier turn is used in the answer.
    named = [Exchange(PreparedTurn(key="n", user_text="My name is Alice."), "Nice to meet you, Alice.")]
    assert "alice" in answer_text(b, PreparedTurn(key="q", user_text="What is my name?"), named).lower()


def test_history_rendering_and_turn_instruction(embedded_backend):
    """[embedded] history = "questions" leaves the earlier answers out; the turn instruction follows the newest turn
    only (never an earlier one), and an unknown rendering is refused at construction."""
    from assistant.backends.embedded import EmbeddedBackend

    b = embedded_backend
    other = EmbeddedBackend(b.lm, b.tokenizer, None, "SYS", history="questions", turn_instruction=" Be brief. ")
    history = [Exchange(PreparedTurn(key="h", user_text="I live in Oslo."), "Oslo is lovely.")]
    text = b.tokenizer.decode(other.build_prompt("", history, PreparedTurn(key="t", user_text="Where?"), 10_000).ids)
    expected = "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nI live in Oslo.<|im_end|>\n"
    expected += "<|im_start|>user\nWhere?\nBe brief.<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected
    with pytest.raises(ValueError, match="exchanges"):
        EmbeddedBackend(b.lm, b.tokenizer, None, "SYS", history="answers")


def test_ask_cli_answers_a_wav_without_model_flag(embedded_paths, embedded_questions, tmp_path):
    wav = tmp_path / "q.wav"
    synthesize(QUESTIONS[0][0], wav)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "assistant", "ask", "--audio", str(wav), "--greedy", "--json", "--max-new-tokens", "40"],
        capture_output=True,
        text=True,
        timeout=ASK_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "embedded" and "france" in result["transcript"].lower()
    assert "paris" in result["text"].lower() and result["output_token_ids"]


async def test_the_engine_tells_whisper_what_the_user_said_before(embedded_backend, tmp_path):
    """`[embedded] whisper_previous_text`: a spoken turn is prepared with the transcripts of the user's earlier turns
    (Whisper's previous-text prompt), its speculation is reused at the commit, and the words follow the context:
    the set's d06 ("What is the capital of Japan?", then "What about Italy?"), whose second turn Whisper base hears
    as "What about it, Ali?" alone (bench/results/asr_context-20261204-base-detect.json); a client's prompt does
    the same."""
    import asyncio

    from assistant.config import EngineConfig, GenerationConfig
    from assistant.engine.api import ResponseOptions
    from assistant.engine.engine import Engine
    from bench.quality_set import clip_audio, clip_for, load_set
    from tests.server_util import TIMEOUT_S, RecordingBackend

    [item] = [i for i in load_set() if i.id == "d06"]
    first_audio, second_audio = (clip_audio(clip_for(item.id, k, say), tmp_path) for k, say in enumerate(item.say))
    [alone] = embedded_backend.prepare([Utterance("alone", audio=second_audio)], [1])
    rec, recognisers = RecordingBackend(embedded_backend), embedded_backend.recognisers
    engine = Engine(rec, EngineConfig(), GenerationConfig(greedy=True, max_new_tokens=4))
    was, recognisers.previous_text = recognisers.previous_text, True
    await engine.start()
    try:
        engine.open_session("s")
        first = await engine.add_user_turn("s", Utterance("t0", audio=first_audio))
        await asyncio.wait_for(engine.respond("s", ResponseOptions(greedy=True)).wait_done(), TIMEOUT_S)
        engine.speculate_user_turn("s", Utterance("t1", audio=second_audio))
        await asyncio.to_thread(rec.wait_for_runs, 2)
        second = await engine.confirm_user_turn("s", Utterance("t1", audio=second_audio.copy()))
        recognisers.previous_text = False  # off (the default): the engine neither computes nor sends the text
        third = await engine.add_user_turn("s", Utterance("t2", audio=second_audio))
    finally:
        recognisers.previous_text = was
        await engine.stop()
    assert [u.previous_text for u in rec.utterances] == ["", first.transcript, ""]
    assert first.transcript == "What is the capital of Japan?" and second.speculative
    assert (alone.transcript, second.transcript, third.transcript) == (
        alone.transcript,
        "What about Italy?",
        alone.transcript,
    )
    assert alone.transcript == "What about it, Ali?"
    # A client's prompt (OpenAI `transcription.prompt`) is heard before the turn with the conversation's text off too
    [prompted] = embedded_backend.prepare([Utterance("p", audio=second_audio, prompt=first.transcript)], [1])
    assert not recognisers.previous_text and prompted.transcript == "What about Italy?"
