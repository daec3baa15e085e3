"""Command line: `python -m assistant {serve,ask,prepare}`. Parses flags, loads the config, sets up logging,
dispatches. `serve` is `assistant.transport.server.serve`, `prepare` is `assistant.weights.cache.run_prepare`, and
`ask` is here: one spoken (or typed) question offline, on either backend, through the same `prepare` ->
`build_prompt` path as the server and the plain single-sequence loop (`engine.decoding.generate_stream`: no engine
thread). It streams the answer to stdout, or with `--json` prints one object: `prompt_token_ids`,
`output_token_ids` (generated ids before the first stop id), `text` (the response text rule of QWEN_AUDIO.md §6),
`finish_reason` ("stop" or "length") and `backend`. `ask_answer(backend, cfg, samples, text)` is that path on an
already-loaded backend (what `bench/quality.py` runs for its `ask` rows).

Heavy imports (torch, transformers, the server) happen inside the subcommand that needs them, so `--help` is fast.
Logging: one line per event that matters (session opened/closed, utterance committed, response done).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from assistant.config import Config, ConfigError, load_config

log = logging.getLogger("assistant")


def _model_overrides(model: str | None) -> dict[str, object]:
    """`--model DIR` selects the qwen-audio backend on DIR; `--model embedded` the embedded default."""
    if model is None:
        return {}
    if model == "embedded":
        return {"model.backend": "embedded"}
    return {"model.backend": "qwen-audio", "model.path": model}


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before and after the command (`--config F serve` and `serve --config F`);
    # SUPPRESS keeps a subcommand's absent option from overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML file overlaid on the defaults"
    )
    levels = ["debug", "info", "warning", "error"]
    common.add_argument("--log-level", choices=levels, default=argparse.SUPPRESS, help="overrides logging.level")
    p = argparse.ArgumentParser(
        prog="python -m assistant",
        description="Real-time voice assistant server (OpenAI Realtime protocol), Qwen-Audio or embedded CPU model.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the WebSocket/HTTP server (and the MQTT bridge)")
    s.add_argument("--host", help="interface to listen on (server.host)")
    s.add_argument("--port", type=int, help="TCP port, 0 = any free port (server.port, default 8765)")
    s.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory, or 'embedded'")
    s.add_argument("--mqtt", metavar="mqtt://HOST:PORT", help="also bridge MQTT devices through this broker")

    a = sub.add_parser("ask", parents=[common], help="answer one spoken (or typed) question offline and exit")
    a.add_argument("--audio", metavar="FILE", help="audio file (WAV/FLAC/OGG/MP3..., any rate/channels)")
    a.add_argument("--text", metavar="TEXT", help="text of the question (with --audio: the instruction after it)")
    a.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory (default: embedded)")
    a.add_argument("--greedy", action="store_true", help="greedy decoding (reproducible)")
    a.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens")
    a.add_argument("--json", action="store_true", help="print one JSON object (prompt/output token ids, text)")

    pr = sub.add_parser(
        "prepare", parents=[common], help="verify and convert the embedded model weights into the cache (once)"
    )
    pr.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {"logging.level": getattr(args, "log_level", None)}
    if args.command == "serve":
        overrides.update({"server.host": args.host, "server.port": args.port, "mqtt.url": args.mqtt})
        overrides.update(_model_overrides(args.model))
    elif args.command == "ask":
        overrides.update(_model_overrides(args.model))
        overrides["generation.max_new_tokens"] = args.max_new_tokens
        if args.greedy:
            overrides["generation.greedy"] = True
    try:
        cfg = load_config(getattr(args, "config", None), overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level)
    try:
        if args.command == "serve":
            from assistant.transport.server import serve

            return serve(cfg)
        if args.command == "ask":
            return run_ask(cfg, audio=args.audio, text=args.text, as_json=args.json)
        from assistant.weights.cache import run_prepare

        return run_prepare(cfg, force=args.force)
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party libraries are chatty at debug/info; keep them at warning unless we debug.
    for noisy in ("websockets", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def run_ask(cfg: Config, audio: str | None = None, text: str | None = None, as_json: bool = False) -> int:
    if not audio and not text:
        print("error: ask needs --audio FILE, --text TEXT, or both", file=sys.stderr)
        return 2
    samples = None
    if audio:
        from assistant.audio.io import load_audio

        try:
            samples = load_audio(audio)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    from assistant.backends import load_backend
    from assistant.weights.sources import PrepareError

    try:
        backend = load_backend(cfg)
    # CheckpointError is a ValueError (bad checkpoint dir); PrepareError: embedded weights missing or corrupt.
    except (OSError, ValueError, PrepareError) as e:
        print(f"error: cannot load the {cfg.model.backend} model: {e}", file=sys.stderr)
        return 2
    # The file path names the audio span, as in the reference web demo (`Audio 1: <audio>{path}</audio>`).
    key = audio if audio and not any(c in audio for c in "<>") else "ask_1"
    started = False

    def stream_out(piece: str) -> None:  # the answer as it is generated, its leading whitespace dropped
        nonlocal started
        piece = piece if started else piece.lstrip()
        started = started or bool(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def heard(transcript: str) -> None:
        print(f"[heard] {transcript}", file=sys.stderr)

    try:
        result = ask_answer(
            backend,
            cfg,
            samples,
            text,
            key,
            on_text=None if as_json else stream_out,
            on_heard=None if as_json else heard,
        )
    except ValueError as e:  # e.g. AudioTooShort
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"backend": backend.name, **result.as_json()}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


@dataclass(frozen=True)
class AskResult:
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated ids before the first stop id
    text: str  # the response text rule of QWEN_AUDIO.md §6
    finish_reason: str  # "stop" or "length"
    transcript: str | None  # what Whisper heard (embedded backend, spoken question)

    def as_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "transcript"}
        return out if self.transcript is None else {**out, "transcript": self.transcript}


def ask_answer(
    backend,
    cfg: Config,
    samples=None,
    text: str | None = None,
    key: str = "ask_1",
    on_text: Callable[[str], None] | None = None,
    on_heard: Callable[[str], None] | None = None,
) -> AskResult:
    """What `ask` does with a loaded backend: one question (16 kHz float32 `samples`, `text`, or both) without
    history, the default system prompt, the `[generation]` config. Also the `ask` path of `bench/quality.py`.
    Raises ValueError for audio the backend refuses (e.g. too short)."""
    from assistant.backends.base import Utterance
    from assistant.engine.decoding import generate_stream, response_text
    from assistant.engine.sampling import params_for

    [turn] = backend.prepare([Utterance(key=key, audio=samples, text=text)], [1])
    window = cfg.engine.max_window_tokens or backend.max_window_tokens
    prompt = backend.build_prompt(backend.default_system_prompt, [], turn, window)
    params = params_for(cfg.generation, getattr(backend, "default_sampling", None))
    max_new = cfg.generation.max_new_tokens
    if turn.transcript is not None and on_heard is not None:
        on_heard(turn.transcript)
    out_ids: list[int] = []
    for step in generate_stream(backend, prompt, params, max_new):
        if step.token_id is not None:
            out_ids.append(step.token_id)
        if step.text and on_text is not None:
            on_text(step.text)
    return AskResult(
        prompt_token_ids=prompt.ids,
        output_token_ids=out_ids,
        text=response_text(backend.tokenizer, out_ids),
        finish_reason="length" if len(out_ids) >= max_new else "stop",
        transcript=turn.transcript,
    )
