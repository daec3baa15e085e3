"""Command line: `python -m assistant {serve,ask,prepare}`. Parses flags, loads the config, dispatches.

Heavy imports (torch, transformers, the server) happen inside the subcommand that needs them, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from assistant.config import ConfigError, load_config
from assistant.log import setup_logging

log = logging.getLogger("assistant")


def _model_overrides(model: str | None) -> dict[str, object]:
    """`--model DIR` selects the qwen-audio backend on DIR; `--model embedded` the embedded default."""
    if model is None:
        return {}
    if model == "embedded":
        return {"model.backend": "embedded"}
    return {"model.backend": "qwen-audio", "model.path": model}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m assistant",
        description="Real-time voice assistant server (OpenAI Realtime protocol), Qwen-Audio or embedded CPU model.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file overlaid on config/default.toml")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides logging.level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the WebSocket/HTTP server (and optionally the MQTT bridge)")
    s.add_argument("--host", help="interface to listen on (server.host)")
    s.add_argument("--port", type=int, help="TCP port, 0 = any free port (server.port, default 8765)")
    s.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory, or 'embedded'")
    s.add_argument("--mqtt", metavar="mqtt://HOST:PORT", help="also bridge MQTT devices through this broker")

    a = sub.add_parser("ask", help="answer one spoken (or typed) question offline and exit")
    a.add_argument("--audio", metavar="FILE", help="audio file (WAV/FLAC/OGG/MP3..., any rate/channels)")
    a.add_argument("--text", metavar="TEXT", help="text of the question (with --audio: the instruction after it)")
    a.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory (default: embedded)")
    a.add_argument("--greedy", action="store_true", help="greedy decoding (reproducible)")
    a.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens")
    a.add_argument("--json", action="store_true", help="print one JSON object (prompt/output token ids, text)")

    pr = sub.add_parser("prepare", help="verify and convert the embedded model weights into the cache (once)")
    pr.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {"logging.level": args.log_level}
    if args.command == "serve":
        overrides.update({"server.host": args.host, "server.port": args.port, "mqtt.url": args.mqtt})
        overrides.update(_model_overrides(args.model))
    elif args.command == "ask":
        overrides.update(_model_overrides(args.model))
        overrides["generation.max_new_tokens"] = args.max_new_tokens
        if args.greedy:
            overrides["generation.greedy"] = True
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level)
    try:
        if args.command == "serve":
            from assistant.transport.server import serve

            return serve(cfg)
        if args.command == "ask":
            from assistant.ask import run_ask

            return run_ask(cfg, audio=args.audio, text=args.text, as_json=args.json)
        from assistant.weights.cache import run_prepare

        return run_prepare(cfg, force=args.force)
    except KeyboardInterrupt:
        return 130
