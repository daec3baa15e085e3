"""Voice-to-voice latency through the real server: `python -m bench.voice_latency [--questions N] [--repeats R]`.

The end of the user's speech -> the first answer audio at the client, for the short spoken questions of
`bench/spoken_set.py` (espeak-ng, 1.7-3.1 s), with the real server (`running_server`, port 0), the embedded default
(Whisper base, then Qwen2.5-Coder-0.5B-Instruct, greedy, `ANSWER_TOKENS` at most) on the engine's worker thread and
the real voice (Piper, joe) in the shared pool. Each session streams its question as binary 16 kHz frames and then
silence paced in real time (20 ms every 20 ms), as a microphone would; server VAD ends the turn; the answer is
spoken by default. Each clip is cut where its speech ends (`assistant.audio.trim.speech_span`: espeak-ng leaves
0.38 s of silence after the words; the result files before `voice_latency-20261203-early.json` sent that too, so
they measured from 0.38 s after the end of speech). Measured on the client's clock from the moment the last speech
frame was sent:
- `vad_ms`: `input_audio_buffer.committed` (the VAD hang-over: `silence_duration_ms` minus webrtcvad's own),
- `asr_wait_ms`: the transcript after the commit (the recogniser's work not already done during the silence),
- `first_audio_ms`: the first `response.output_audio.delta` (the headline number),
and from the server's `response.done.timings_ms` (ms after the response started): `prefill`, `first_token`,
`first_clause` (the first clause complete), `synthesis` (the first clause's synthesis), `first_audio`.

Variants (`VARIANTS`) run alternately per question; those with the same Whisper model share one engine (one worker
thread, so one model load; its torch threads and speculative prefill are set before each turn), a variant with
another Whisper model has an engine of its own:
- `default`: the shipped settings (`[voice] threads = 1`, `[engine] threads = 0`: automatic);
- `torch2`: the engine on 2 torch threads beside the voice's 1 (torch's default before the budget: every core);
- `onnx2`: the voice on 2 onnxruntime threads (the engine's automatic budget is then 1);
- `first_clause`: `[voice] first_clause_chars = 24`: the first clause may end at a word boundary;
  `whole_first_clause`: 0, the first clause ends at punctuation only (the shipped default);
- `no_spec_prefill`: `[engine] speculative_prefill = false`: the answer prefills its turn after the commit (the
  default prefills it as soon as the speculative transcript is ready; switched on the worker between turns);
- `tiny_en`, `tiny_en_first_clause`: `[embedded] whisper = "tiny.en"` (English only), the second with
  `first_clause_chars = 24`;
- `told_en`: the client's session says its transcription `language` is "en" (as Home Assistant and many OpenAI
  clients do): the turn goes to `[embedded] whisper_english` (tiny.en) with no language detection; the rest shipped;
- `padded`, `told_en_padded`: the session's `turn_detection.early_prepare_ms` = 300 (the prefix padding): the turn's
  audio work starts only once its trailing padding is complete, as every backend did before Whisper's trimmed
  hearing let it start at 200 ms;
- `greedy`, `beam5`, `told_en_greedy`, `told_en_beam5`: `[embedded] whisper_beam_size` 1 or 5 (set on the worker
  between turns), detected or told English.
Three phases, each written to the result file when it ends (a long run killed midway keeps what it measured):
`one` (`--variants`, one session at a time, every question), `budget` (`--budget-variants`, one session at a time,
the first `--budget-questions` questions: the thread budget side by side), `four` (`--multi`, 4 sessions at once,
4 different questions started together). p50/p90 per phase, variant and session count; every turn is in
`bench/results/voice_latency-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import websockets

from assistant.audio.trim import speech_span
from assistant.audio.voice import SpeechPool, VoiceParams
from assistant.config import load_config
from assistant.engine.engine import Engine
from assistant.transport.server import running_server
from bench.results import Record
from bench.spoken_set import ANSWER_TOKENS, QUESTIONS, correct, synthesize

FRAME_MS = 20
TAIL_SILENCE_MS = 1500
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Variant:
    engine_threads: int = 0  # torch threads of the engine; 0 = the automatic budget
    onnx_threads: int = 1  # the voice's onnxruntime threads
    first_clause_chars: int | None = None  # [voice] first_clause_chars; None = the shipped default
    speculative_prefill: bool = True  # [engine] speculative_prefill
    whisper: str = "base"  # [embedded] whisper (each model gets its own engine: one worker thread each)
    language: str | None = None  # the client's transcription language (None: not sent, the language is detected)
    early_prepare_ms: int | None = None  # the session's turn_detection.early_prepare_ms (None: the server's)
    whisper_beam_size: int | None = None  # [embedded] whisper_beam_size (None: the shipped default)


VARIANTS = {
    "default": Variant(),
    "torch2": Variant(engine_threads=2),
    "onnx2": Variant(onnx_threads=2),
    "first_clause": Variant(first_clause_chars=24),
    "whole_first_clause": Variant(first_clause_chars=0),
    "no_spec_prefill": Variant(speculative_prefill=False),
    "tiny_en": Variant(whisper="tiny.en"),
    "tiny_en_first_clause": Variant(whisper="tiny.en", first_clause_chars=24),
    "told_en": Variant(language="en"),
    "padded": Variant(early_prepare_ms=300),
    "told_en_padded": Variant(language="en", early_prepare_ms=300),
    "greedy": Variant(whisper_beam_size=1),
    "beam5": Variant(whisper_beam_size=5),
    "told_en_greedy": Variant(language="en", whisper_beam_size=1),
    "told_en_beam5": Variant(language="en", whisper_beam_size=5),
}
SERVER_MS = ("encode", "prefill", "first_token", "first_clause", "synthesis", "first_audio")


def speech_only(audio: np.ndarray) -> np.ndarray:
    """`audio` up to the end of its speech: the silence after it is the client's to stream, paced in real time."""
    span = speech_span(audio)
    return audio if span is None else audio[: span[1]]


def pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(audio * 32768.0).clip(-32768, 32767).astype("<i2")


async def one_turn(url: str, pcm: np.ndarray, v: Variant = VARIANTS["default"]) -> dict:
    """One fresh session asks one question (the client's side of variant `v`); the client's marks in ms after its
    last speech frame."""
    frame = 16000 * FRAME_MS // 1000
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        session: dict = {"input_sample_rate": 16000}
        if v.language:
            session["input_audio_transcription"] = {"model": "whisper-1", "language": v.language}
        if v.early_prepare_ms is not None:
            session["turn_detection"] = {"type": "server_vad", "early_prepare_ms": v.early_prepare_ms}
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await ws.recv()
        for i in range(0, len(pcm), frame):
            await ws.send(pcm[i : i + frame].tobytes())
        t_end = time.monotonic()

        async def pace_silence() -> None:
            zero = np.zeros(frame, dtype=np.int16).tobytes()
            for k in range(TAIL_SILENCE_MS // FRAME_MS):
                await asyncio.sleep(max(0.0, t_end + (k + 1) * FRAME_MS / 1000 - time.monotonic()))
                await ws.send(zero)

        pacer = asyncio.create_task(pace_silence())
        marks: dict = {}
        while True:
            ev = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
            now_ms = round((time.monotonic() - t_end) * 1000, 1)
            kind = ev["type"]
            if kind == "input_audio_buffer.committed":
                marks.setdefault("committed", now_ms)
            elif kind == "conversation.item.input_audio_transcription.completed":
                marks.setdefault("transcribed", now_ms)
                marks["heard"] = ev["transcript"]
            elif kind == "response.output_audio.delta":
                marks.setdefault("first_audio_ms", now_ms)
            elif kind == "response.done":
                marks["done_ms"] = now_ms
                resp = ev["response"]
                marks["answer"] = resp["output"][0]["content"][0].get("transcript", "") if resp["output"] else ""
                marks["server_ms"] = resp.get("timings_ms", {})
                break
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
    row = {
        "vad_ms": marks.get("committed"),
        "asr_wait_ms": round(marks["transcribed"] - marks["committed"], 1) if "transcribed" in marks else None,
        "first_audio_ms": marks.get("first_audio_ms"),
        "done_ms": marks.get("done_ms"),
        "heard": marks.get("heard"),
        "answer": marks.get("answer", ""),
    }
    row.update({f"server_{k}_ms": marks.get("server_ms", {}).get(k) for k in SERVER_MS})
    return row


def quantiles(values: list[float]) -> dict:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"p50": None, "p90": None, "n": 0}
    p90 = vals[min(len(vals) - 1, int(round(0.9 * (len(vals) - 1))))]
    return {"p50": round(statistics.median(vals), 1), "p90": round(p90, 1), "n": len(vals)}


async def main(args: argparse.Namespace, save) -> dict:
    from assistant.backends import load_backend

    base = {"server.port": 0, "generation.greedy": True, "generation.max_new_tokens": ANSWER_TOKENS}
    cfg = load_config(overrides=base)
    variants = [v for v in args.variants.split(",") if v]
    budget = [v for v in args.budget_variants.split(",") if v]
    multi = [v for v in args.multi.split(",") if v]
    every = list(dict.fromkeys(variants + budget + multi))
    engines: dict[str, Engine] = {}
    for whisper in dict.fromkeys(VARIANTS[v].whisper for v in every):
        wcfg = cfg.replace(**{"embedded.whisper": whisper})
        engines[whisper] = Engine.loading(lambda c=wcfg: load_backend(c), wcfg.engine, wcfg.generation)
        await engines[whisper].start()
    loaded_threads = await next(iter(engines.values())).call(lambda b: torch.get_num_threads())
    pools = {n: SpeechPool(VoiceParams(threads=n)) for n in {VARIANTS[v].onnx_threads for v in every}}
    for pool in pools.values():
        pool.load().result()
    rows: dict[str, list[dict]] = {}
    torch_threads: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            questions = [
                (q, kws, pcm16(speech_only(synthesize(q, Path(tmp) / f"q{i}.wav"))))
                for i, (q, kws) in enumerate(QUESTIONS[: args.questions])
            ]
            async with contextlib.AsyncExitStack() as stack:
                servers = {}
                for name in every:
                    v = VARIANTS[name]
                    over = {
                        "engine.threads": v.engine_threads,
                        "voice.threads": v.onnx_threads,
                        "voice.first_clause_chars": v.first_clause_chars,  # None: not overridden
                        "embedded.whisper": v.whisper,
                    }
                    vcfg = load_config(overrides={**base, **over})
                    torch_threads[name] = vcfg.engine_threads(speaking=True)
                    servers[name] = await stack.enter_async_context(
                        running_server(vcfg, engine=engines[v.whisper], speech=pools[v.onnx_threads])
                    )

                async def run(phase: str, name: str, sessions: int, i: int) -> None:
                    threads, spec_prefill = torch_threads[name], VARIANTS[name].speculative_prefill
                    beam = VARIANTS[name].whisper_beam_size or cfg.embedded.whisper_beam_size
                    engine = engines[VARIANTS[name].whisper]

                    def setup(b) -> None:  # on the worker thread, between turns: one engine serves several variants
                        torch.set_num_threads(threads)
                        engine._worker.speculative_prefill = spec_prefill
                        for transcriber in (b.recognisers.main, b.recognisers.english):
                            if transcriber is not None:
                                transcriber.beam_size = beam

                    await engine.call(setup)
                    picked = [questions[(i + k) % len(questions)] for k in range(sessions)]
                    got = await asyncio.gather(
                        *(one_turn(servers[name].ws_url, pcm, VARIANTS[name]) for _, _, pcm in picked)
                    )
                    for (q, kws, _), row in zip(picked, got, strict=True):
                        row.update(variant=name, sessions=sessions, question=q, correct=correct(row["answer"], kws))
                        rows.setdefault(f"{phase}:{name}@{sessions}", []).append(row)
                        print(json.dumps(row), flush=True)

                def result() -> dict:
                    used = {n: {"torch_threads": torch_threads[n], **asdict(VARIANTS[n])} for n in torch_threads}
                    summary = {key: summarize(rs) for key, rs in rows.items()}
                    return {"engine_torch_threads": loaded_threads, "variants": used, "summary": summary, "turns": rows}

                for name in every:  # kernels, each recogniser, the system-prompt snapshot: not reported
                    await run("warmup", name, 1, 0)
                rows.clear()
                for i in range(len(questions)):
                    for name in variants if i % 2 == 0 else variants[::-1]:  # alternate who goes first
                        await run("one", name, 1, i)
                if variants:
                    save(result())
                for i in range(min(args.budget_questions, len(questions))):
                    for name in budget if i % 2 == 0 else budget[::-1]:
                        await run("budget", name, 1, i)
                if budget:
                    save(result())
                for i in range(0, len(questions), 4):
                    for name in multi:
                        await run("four", name, 4, i)
                final = result()
    finally:
        for engine in engines.values():
            await engine.call(lambda b: torch.set_num_threads(loaded_threads))
            await engine.stop()
        for pool in pools.values():
            pool.close()
    for key, s in final["summary"].items():
        print("summary", key, json.dumps(s), flush=True)
    return final


def summarize(rs: list[dict]) -> dict:
    s = {k: quantiles([r[k] for r in rs]) for k in ("first_audio_ms", "vad_ms", "asr_wait_ms", "done_ms")}
    s.update({k: quantiles([r[f"server_{k}_ms"] for r in rs]) for k in SERVER_MS})
    s["correct"] = f"{sum(r['correct'] for r in rs)}/{len(rs)}"
    return s


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--variants", default="default,first_clause", help="phase one: one session at a time")
    ap.add_argument("--budget-variants", default="default,torch2,onnx2", help="phase budget: thread budgets")
    ap.add_argument("--budget-questions", type=int, default=6)
    ap.add_argument("--multi", default="default,first_clause", help="phase four: 4 sessions at once")
    ap.add_argument("--notes", default="", help="written into the result file")
    ap.add_argument("--tag", default="", help="appended to the result file's name (phases run separately)")
    args = ap.parse_args()
    record = Record("voice_latency", vars(args), tag=args.tag)

    def save(numbers: dict) -> None:
        record.write(numbers, torch_threads=numbers["engine_torch_threads"], notes=args.notes)

    save(asyncio.run(main(args, save)))
