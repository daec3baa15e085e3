"""Command line: `python -m assistant {serve,ask,tls-cert,prepare,export-hf}`. Parses flags, loads the config, sets up
logging, dispatches. `serve` is `assistant.transport.server.serve`, `prepare` is `assistant.weights.cache.run_prepare`,
`export-hf` is `assistant.weights.export.run_export_hf` (the embedded LLM as a Hugging Face directory for vLLM),
`tls-cert` (and `serve --tls-self-signed`) is `assistant.transport.tls`, and
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

    s = sub.add_parser("serve", parents=[common], help="run the WebSocket/HTTP server (and MQTT, Wyoming)")
    s.add_argument("--host", help="interface to listen on (server.host)")
    s.add_argument("--port", type=int, help="TCP port, 0 = any free port (server.port, default 8765)")
    s.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory, or 'embedded'")
    s.add_argument("--mqtt", metavar="mqtt://HOST:PORT", help="also bridge MQTT devices through this broker")
    s.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve wss:// and https:// (server.tls_cert)")
    s.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (server.tls_key)")
    s.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="serve TLS with the self-signed certificate of `tls-cert` (made, or renewed, when needed)",
    )
    s.add_argument("--wyoming", metavar="tcp://HOST:PORT", help="also serve Home Assistant's Wyoming protocol here")

    a = sub.add_parser("ask", parents=[common], help="answer one spoken (or typed) question offline and exit")
    a.add_argument("--audio", metavar="FILE", help="audio file (WAV/FLAC/OGG/MP3..., any rate/channels)")
    a.add_argument("--text", metavar="TEXT", help="text of the question (with --audio: the instruction after it)")
    a.add_argument("--model", metavar="DIR|embedded", help="Qwen-Audio-Chat checkpoint directory (default: embedded)")
    a.add_argument("--greedy", action="store_true", help="greedy decoding (reproducible)")
    a.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens")
    a.add_argument("--json", action="store_true", help="print one JSON object (prompt/output token ids, text)")

    t = sub.add_parser(
        "tls-cert",
        parents=[common],
        help="make a self-signed TLS certificate and print how to serve with it and make clients trust it",
    )
    t.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME|IP",
        help="a host name or IP address clients connect to (repeatable; localhost, 127.0.0.1 and ::1 are always in)",
    )
    t.add_argument("--out", metavar="DIR", help="directory for cert.pem and key.pem (default: the config dir)")
    t.add_argument("--days", type=int, default=None, metavar="N", help="validity in days (default 825)")
    t.add_argument("--force", action="store_true", help="replace an existing certificate in that directory")

    pr = sub.add_parser(
        "prepare", parents=[common], help="verify and convert the embedded model weights into the cache (once)"
    )
    pr.add_argument("--force", action="store_true", help="convert again even if the cache is complete")

    ex = sub.add_parser(
        "export-hf",
        parents=[common],
        help="write the embedded LLM as a Hugging Face model directory (what vLLM serves for backend openai)",
    )
    ex.add_argument("dir", metavar="DIR", help="directory to write (config.json, model.safetensors, tokenizer files)")
    ex.add_argument("--force", action="store_true", help="replace DIR if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {"logging.level": getattr(args, "log_level", None)}
    if args.command == "serve":
        overrides.update({"server.host": args.host, "server.port": args.port, "mqtt.url": args.mqtt})
        overrides.update({"server.tls_cert": args.tls_cert, "server.tls_key": args.tls_key})
        overrides["wyoming.uri"] = args.wyoming
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
    from assistant.transport.tls import TlsError

    try:
        if args.command == "serve":
            from assistant.transport.server import serve

            if args.tls_self_signed:
                cfg = use_self_signed(cfg)
            return serve(cfg)
        if args.command == "tls-cert":
            return run_tls_cert(cfg, args.host, args.out, args.days, args.force)
        if args.command == "ask":
            return run_ask(cfg, audio=args.audio, text=args.text, as_json=args.json)
        if args.command == "export-hf":
            from assistant.weights.export import run_export_hf

            return run_export_hf(cfg, args.dir, force=args.force)
        from assistant.weights.cache import run_prepare

        return run_prepare(cfg, force=args.force)
    except TlsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def use_self_signed(cfg: Config) -> Config:
    """`serve --tls-self-signed`: `cfg` serving the self-signed certificate (made now if missing or unfit)."""
    from assistant.transport.tls import TlsError, ensure_self_signed, read_cert, setup_text

    if cfg.server.tls_cert:
        raise TlsError("--tls-self-signed and server.tls_cert (--tls-cert) both name a certificate; use one")
    files, why_new = ensure_self_signed(cfg.server.host)
    if why_new is not None:
        print(f"Made a new self-signed certificate ({why_new}).")
        print(setup_text(files, read_cert(files.cert), cfg.server.port or 8765), flush=True)
    else:
        print(f"TLS: {files.cert} (clients trust it with NODE_EXTRA_CA_CERTS / SSL_CERT_FILE)", flush=True)
    return cfg.replace(**{"server.tls_cert": str(files.cert), "server.tls_key": str(files.key)})


def run_tls_cert(cfg: Config, hosts: list[str], out: str | None, days: int | None, force: bool) -> int:
    """`tls-cert`: make the certificate, print the config lines and how clients trust it."""
    from pathlib import Path

    from assistant.transport.tls import DEFAULT_DAYS, default_tls_dir, make_self_signed, read_cert, setup_text

    files = make_self_signed(
        hosts, Path(out) if out else default_tls_dir(), DEFAULT_DAYS if days is None else days, force
    )
    print(setup_text(files, read_cert(files.cert), cfg.server.port or 8765), end="")
    return 0


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
    if cfg.model.backend == "openai":
        print(
            "error: ask runs the model in this process; with backend openai the model is a server: use serve "
            "(or send a chat request to the server directly)",
            file=sys.stderr,
        )
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
