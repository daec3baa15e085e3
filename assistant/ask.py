"""`python -m assistant ask`: answer one spoken (or typed) question offline, on either backend, and exit.

Loads the configured backend (`load_backend`), runs the same `prepare` -> `build_prompt` path as the server, then the
plain single-sequence loop of `assistant.generation` (no engine, no threads). Streams the answer to stdout, or with
`--json` prints one object: `prompt_token_ids`, `output_token_ids` (generated ids before the first stop id), `text`
(the response text rule of QWEN_AUDIO.md §6), `finish_reason` ("stop" or "length") and `backend`.
Sampling: `[generation]` of the config; on qwen-audio the checkpoint's chat generation config is the default while
the sampling keys are left at their shipped values (`generation.params_for`).
"""

from __future__ import annotations

import json
import logging
import sys

from assistant.config import Config

log = logging.getLogger(__name__)


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
    from assistant.backends.base import Utterance
    from assistant.generation import generate_stream, params_for, response_text
    from assistant.weights.sources import PrepareError

    try:
        backend = load_backend(cfg)
    # CheckpointError is a ValueError (bad checkpoint dir); PrepareError: embedded weights missing or corrupt.
    except (OSError, ValueError, PrepareError) as e:
        print(f"error: cannot load the {cfg.model.backend} model: {e}", file=sys.stderr)
        return 2
    try:
        # The file path names the audio span, as in the reference web demo (`Audio 1: <audio>{path}</audio>`).
        key = audio if audio and not any(c in audio for c in "<>") else "ask_1"
        [turn] = backend.prepare([Utterance(key=key, audio=samples, text=text)], [1])
    except ValueError as e:  # e.g. AudioTooShort
        print(f"error: {e}", file=sys.stderr)
        return 2
    window = cfg.engine.max_window_tokens or backend.max_window_tokens
    prompt = backend.build_prompt(backend.default_system_prompt, [], turn, window)
    params = params_for(cfg.generation, getattr(backend, "default_sampling", None))
    max_new = cfg.generation.max_new_tokens
    if turn.transcript is not None and not as_json:
        print(f"[heard] {turn.transcript}", file=sys.stderr)

    out_ids: list[int] = []
    started = False
    for step in generate_stream(backend, prompt, params, max_new):
        if step.token_id is not None:
            out_ids.append(step.token_id)
        if not as_json and step.text:
            piece = step.text if started else step.text.lstrip()
            started = started or bool(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        result = {
            "backend": backend.name,
            "prompt_token_ids": prompt.ids,
            "output_token_ids": out_ids,
            "text": response_text(backend.tokenizer, out_ids),
            "finish_reason": "length" if len(out_ids) >= max_new else "stop",
        }
        if turn.transcript is not None:
            result["transcript"] = turn.transcript
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0
