"""The Wyoming port measured by `wyoming-bench` 2026.10.0 (MIT): `python -m bench.wyoming_bench [--tts-rounds N]`.

Starts the real server (`running_server`, port 0, Wyoming on port 0) with the embedded default (Whisper base, then
Qwen2.5-Coder-0.5B-Instruct) and the joe voice, and runs wyoming-bench against it from its own venv
(`~/.cache/qwen-voice-assistant-bench/wyoming-bench-venv`, built on first use; not a project dependency):
- STT: the spoken question set of `bench/spoken_set.py` (16 espeak-ng questions, 16 kHz WAV + their text) as a
  wyoming-bench corpus; word and character error rates (wyoming-bench's normalisation: pooled edits / reference
  words), transcription time and real-time factor. Non-streaming only: Home Assistant ignores streamed transcripts.
- TTS: answers of one, two and four sentences, `synthesize` (non-streaming) and `synthesize-start/-chunk/-stop`
  (streaming): time to the first audio chunk, total time, real-time factor. Our server speaks clause by clause in
  both modes, so the first audio should not wait for the whole text.
The measurements are wyoming-bench's own functions (`bench_stt_server`, `bench_server`, their summaries), called by a
small driver in its venv that prints them as JSON; the tool's report tables are printed as well. Result:
`bench/results/wyoming_bench-YYYYMMDD.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from assistant.config import load_config
from assistant.engine.engine import Engine
from assistant.transport.server import running_server
from bench.results import Record
from bench.spoken_set import QUESTIONS, synthesize

WYOMING_BENCH = "wyoming-bench==2026.10.0"
VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-voice-assistant-bench"
VENV = VENV / "wyoming-bench-venv"
TTS_TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital of France. It is known for the Eiffel Tower and its museums.",
    "Paris is the capital and largest city of France. It lies on the river Seine, in the north of the country. "
    "About two million people live in the city itself. It is famous for its art, food and fashion.",
]
RUN_TIMEOUT_S = 3600.0

# Runs in wyoming-bench's venv: argv[1] is a JSON job; prints the tool's reports, then one JSON line (the result).
DRIVER = r"""
import asyncio, dataclasses, json, sys
from pathlib import Path
from wyoming.asr import Transcribe
from wyoming_bench.stt.bench import bench_stt_server
from wyoming_bench.stt.corpus import load_corpus
from wyoming_bench.stt.reporting import print_stt_server_report, summarize_stt_mode
from wyoming_bench.tts.bench import bench_server
from wyoming_bench.tts.reporting import print_server_report, summarize_mode

job = json.loads(sys.argv[1])
host, port, t = "127.0.0.1", job["port"], job["timeout_s"]

def rows(ms):
    return [{k: v for k, v in dataclasses.asdict(m).items() if k != "server"} for m in ms]

async def main():
    samples = load_corpus(Path(job["corpus"]))
    stt = await bench_stt_server(host, port, samples, ["non_streaming"], Transcribe(language="en"), job["stt_rounds"],
                                 1, False, 1024, 0.0, t, t, trailing_silence=0.5)
    print_stt_server_report(f"{host}:{port}", stt)
    tts = await bench_server(host, port, job["texts"], ["non_streaming", "streaming"], None, None, job["tts_rounds"],
                             1, False, 0.0, t, t, unique=True)
    print_server_report(f"{host}:{port}", tts)
    out = {"stt": {"summary": summarize_stt_mode(stt, "non_streaming"), "runs": rows(stt)},
           "tts": {"summary": {m: summarize_mode(tts, m) for m in ("non_streaming", "streaming")}, "runs": rows(tts)}}
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


def bench_python() -> Path:
    """wyoming-bench's own venv (built once; its stamp, written last, names the pinned version)."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "wyoming-bench-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == WYOMING_BENCH):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=RUN_TIMEOUT_S)
            pip = [str(python), "-m", "pip", "install", "--quiet", WYOMING_BENCH]
            subprocess.run(pip, check=True, timeout=RUN_TIMEOUT_S)
            stamp.write_text(WYOMING_BENCH)
    return python


def write_corpus(directory: Path) -> None:
    for i, (question, _) in enumerate(QUESTIONS):
        synthesize(question, directory / f"q{i:02d}.wav")
        (directory / f"q{i:02d}.txt").write_text(question + "\n", encoding="utf-8")


async def main(args: argparse.Namespace) -> dict:
    python = bench_python()
    cfg = load_config(
        overrides={"server.port": 0, "wyoming.uri": "tcp://127.0.0.1:0", "generation.greedy": True},
    )
    from assistant.backends import load_backend

    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    await engine.start()
    threads = await engine.call(lambda b: torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp)
        write_corpus(corpus)
        async with running_server(cfg, engine=engine) as srv:
            job = {
                "port": srv.wyoming.port,
                "corpus": str(corpus),
                "texts": TTS_TEXTS,
                "stt_rounds": args.stt_rounds,
                "tts_rounds": args.tts_rounds,
                "timeout_s": 300,
            }
            proc = await asyncio.create_subprocess_exec(
                str(python), "-c", DRIVER, json.dumps(job), stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)  # the server serves it meanwhile
    await engine.stop()
    text = out.decode()
    report = [line for line in text.splitlines() if not line.startswith("RESULT ")]
    print("\n".join(report))
    if proc.returncode != 0:
        raise SystemExit(f"wyoming-bench driver failed with status {proc.returncode}")
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    result["report"] = report
    result["engine_torch_threads"] = threads
    return result


def summary_line(result: dict) -> str:
    stt = result["stt"]["summary"]
    parts = [f"STT WER {stt['wer']:.3f} CER {stt['cer']:.3f} ({stt['ok']} ok, {stt['fail']} failed)"]
    for mode, s in result["tts"]["summary"].items():
        parts.append(f"TTS {mode}: first audio p50 {s['ttft']['median'] * 1000:.0f} ms, total p50 "
                     f"{s['total']['median'] * 1000:.0f} ms, RTF p50 {s['rtf']['median']:.3f}")  # fmt: skip
    return "; ".join(parts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stt-rounds", type=int, default=1, help="timed rounds over the 16 questions (+1 warm-up)")
    ap.add_argument("--tts-rounds", type=int, default=3, help="timed rounds per text and mode (+1 warm-up)")
    ap.add_argument("--notes", default="", help="written into the result file")
    args = ap.parse_args()
    record = Record("wyoming_bench", vars(args))
    numbers = asyncio.run(main(args))
    print(summary_line(numbers))
    record.write(numbers, torch_threads=numbers["engine_torch_threads"], notes=args.notes)
