"""The `openai` backend: conversations are kept here, answers stream from OpenAI-compatible servers (vLLM).

Why this shape: the engine's worker owns model state and decodes local models in batched steps; a remote model has
no state here to own and nothing to batch (vLLM batches across all its clients). So everything that belongs to the
conversation stays where it is for every backend: sessions, history and its token budget, instructions, pending
turns, admission control, cancellation, and a turn's audio work on the worker (Whisper, in transcript mode). Only
generation moves: `assistant/engine/remote.py` starts each answer as a request on the upstream pool
(`upstream.py`, its own I/O thread), whose deltas go straight into the response's stream (the same `TextDelta` ...
`ResponseDone` path as a local answer) and whose end comes back to the worker as a command that records the reply.

`openai.audio_input`:
- "transcript": Whisper (the embedded weights cache) runs here and the server gets text, so any chat model works
  (the embedded model exported with `export-hf`, Qwen2.5, ...);
- "audio": each spoken turn goes to the server as `input_audio` content parts (base64 16 kHz mono PCM16 WAV), then
  the typed text if any, for an audio LLM (Qwen2-Audio-7B-Instruct on vLLM); no Whisper here, so no transcript event.
  Past spoken turns are sent again as audio (vLLM's prefix cache makes that cheap), while they fit the budget.

The history budget is counted in tokens with Qwen's BPE (`qwen.tiktoken`, whose ids Qwen2, Qwen2.5 and Qwen2-Audio
share; other models count close to it): each message costs its text plus `MESSAGE_OVERHEAD_TOKENS`, each audio part
`AUDIO_TOKENS_PER_S` per second plus `AUDIO_PART_TOKENS`. The newest exchanges are kept while system + history +
turn fit the window, as the embedded backend does.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
import wave
from concurrent.futures import Future
from typing import Any

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.backends.base import ChatRequest, Exchange, PreparedTurn, SamplingParams, Steps, Utterance
from assistant.backends.embedded import DEFAULT_WINDOW_TOKENS
from assistant.backends.recognition import Recognisers, load_recognisers, transcribed_turns
from assistant.backends.tools import AUTO, ToolChoice, ToolSpec
from assistant.backends.upstream import ChatSink, Timeouts, UpstreamPool
from assistant.models.tokenizer import QwenTokenizer

log = logging.getLogger("assistant.openai")

MESSAGE_OVERHEAD_TOKENS = 5  # chatml: <|im_start|> role \n ... <|im_end|> \n
AUDIO_TOKENS_PER_S = 25  # Qwen2-Audio: 50 encoder frames per second, pooled by 2
AUDIO_PART_TOKENS = 8  # "Audio k: <|audio_bos|> ... <|audio_eos|>\n"


def wav_base64(samples: np.ndarray) -> str:
    """16 kHz float samples on the int16 grid -> base64 of a PCM16 mono WAV file (exact: no resampling, no dither)."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MODEL_RATE_HZ)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sampling_fields(params: SamplingParams, max_new_tokens: int, extensions: bool) -> dict[str, Any]:
    """The request's sampling fields: OpenAI's own, plus vLLM's `top_k` / `repetition_penalty` when `extensions`."""
    body: dict[str, Any] = {"max_tokens": max_new_tokens}
    if params.greedy:
        body["temperature"] = 0.0
    else:
        body.update(temperature=params.temperature, top_p=params.top_p)
        if extensions and params.top_k > 0:
            body["top_k"] = params.top_k
    if extensions:
        body["repetition_penalty"] = params.repetition_penalty
    if params.seed >= 0:
        body["seed"] = params.seed
    return body


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        pool: UpstreamPool,
        tokenizer: QwenTokenizer,
        recognisers: Recognisers | None,
        system_prompt: str,
        audio_input: str = "transcript",
        sampling_extensions: bool = True,
        max_window_tokens: int = DEFAULT_WINDOW_TOKENS,
    ):
        if audio_input not in ("transcript", "audio"):
            raise ValueError(f"openai.audio_input: expected 'transcript' or 'audio', got {audio_input!r}")
        self.pool, self.tokenizer, self.recognisers = pool, tokenizer, recognisers
        self.default_system_prompt = system_prompt
        self.audio_input = audio_input
        self.sampling_extensions = sampling_extensions
        self.max_window_tokens = max_window_tokens
        self.languages = recognisers.languages if recognisers is not None else ()  # what a turn may be told
        if audio_input == "transcript":  # Whisper hears the speech trimmed: the engine compares clips as it hears them
            self.heard_audio = Recognisers.heard_audio
        # transcript: Whisper's steps, one utterance per chunk as the embedded backend does on CPU; audio: WAV only
        self.prepare_batch = 1 if audio_input == "transcript" else 8

    @property
    def hears_previous_text(self) -> bool:
        """`[embedded] whisper_previous_text`, when Whisper hears the turns here (`audio_input` "transcript")."""
        return self.recognisers is not None and self.recognisers.previous_text

    @classmethod
    def from_config(cls, cfg) -> OpenAIBackend:
        o = cfg.openai
        t0 = time.perf_counter()
        recognisers = None
        if o.audio_input == "transcript":
            from assistant.models.device import resolve_device
            from assistant.weights.cache import prepare_recognisers

            device = resolve_device(cfg.model.device)
            recognisers = load_recognisers(*prepare_recognisers(cfg), device, cfg.embedded)
        timeouts = Timeouts(o.connect_timeout_s, o.read_timeout_s, o.response_timeout_s, o.health_interval_s)
        pool = UpstreamPool(list(o.base_urls), o.model, o.api_key, timeouts)
        pool.start()
        log.info(
            "openai backend ready in %.1f s: model %r on %s, audio_input %s",
            time.perf_counter() - t0,
            o.model,
            ", ".join(u.base_url + ("" if u.healthy else f" (unhealthy: {u.problem})") for u in pool.upstreams),
            o.audio_input,
        )
        system = cfg.model.system_prompt or cfg.embedded.system_prompt
        tokenizer = QwenTokenizer.for_qwen_audio()
        return cls(pool, tokenizer, recognisers, system, o.audio_input, o.sampling_extensions)

    # ------------------------------------------------------------------ audio work (worker thread)

    def prepare(self, utterances: list[Utterance], audio_numbers: list[int]) -> list[PreparedTurn]:
        from assistant.backends.base import run_steps

        return run_steps(self.prepare_steps(utterances, audio_numbers))

    def prepare_steps(self, utterances: list[Utterance], audio_numbers: list[int]) -> Steps:
        if self.audio_input == "transcript":
            return (yield from transcribed_turns(self.recognisers, utterances, self.name))
        turns = []
        for u in utterances:
            spoken = u.audio is not None and len(u.audio) > 0
            wavs = (wav_base64(u.audio),) if spoken else ()
            turns.append(PreparedTurn(key=u.key, user_text=(u.text or "").strip(), audio_s=u.audio_s, audio_wavs=wavs))
        return turns

    # ------------------------------------------------------------------ chat request (worker thread)

    def _user_message(self, turn: PreparedTurn) -> tuple[dict[str, Any], int]:
        """The user message of `turn` and its token count."""
        tokens = MESSAGE_OVERHEAD_TOKENS + len(self.tokenizer.encode(turn.user_text))
        if not turn.audio_wavs:
            return {"role": "user", "content": turn.user_text}, tokens
        parts: list[dict[str, Any]] = [
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}} for wav in turn.audio_wavs
        ]
        if turn.user_text.strip():  # merged turns join their (possibly empty) texts with newlines
            parts.append({"type": "text", "text": turn.user_text.strip()})
        tokens += len(turn.audio_wavs) * AUDIO_PART_TOKENS + math.ceil(turn.audio_s * AUDIO_TOKENS_PER_S)
        return {"role": "user", "content": parts}, tokens

    def _text_message(self, role: str, text: str) -> tuple[dict[str, Any], int]:
        return {"role": role, "content": text}, MESSAGE_OVERHEAD_TOKENS + len(self.tokenizer.encode(text))

    def _turn_messages(self, turn: PreparedTurn) -> tuple[list[dict[str, Any]], int]:
        """A user turn: a `tool` message per function result it carries, then its user message (if it has one)."""
        messages, tokens = [], 0
        for out in turn.outputs:
            messages.append({"role": "tool", "tool_call_id": out.call_id, "content": out.output})
            tokens += MESSAGE_OVERHEAD_TOKENS + len(self.tokenizer.encode(out.output))
        if turn.user_text or turn.audio_wavs or not turn.outputs:
            user, user_tokens = self._user_message(turn)
            messages.append(user)
            tokens += user_tokens
        return messages, tokens

    def _reply_messages(self, ex: Exchange) -> tuple[list[dict[str, Any]], int]:
        """An answer: its text and the function calls it made (`tool_calls`); nothing for a deleted one."""
        if not ex.reply.strip() and not ex.calls:
            return [], 0
        message, tokens = self._text_message("assistant", ex.reply.strip())
        if ex.calls:
            message["tool_calls"] = [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in ex.calls
            ]
            tokens += sum(len(self.tokenizer.encode(c.name + c.arguments)) for c in ex.calls)
        return [message], tokens

    def chat_request(
        self,
        system: str,
        history: list[Exchange],
        turn: PreparedTurn,
        max_window_tokens: int,
        params: SamplingParams,
        max_new_tokens: int,
        tools: tuple[ToolSpec, ...] = (),
        tool_choice: ToolChoice = AUTO,
    ) -> ChatRequest:
        """System, the newest history exchanges that fit the window with the turn (oldest dropped first; the system
        message always stays), then the turn. Function calls and results go as `tool_calls` and `tool` messages;
        `tools` (with `tool_choice`) as the Chat Completions fields (vLLM: `--enable-auto-tool-choice
        --tool-call-parser hermes` for `auto`)."""
        head, used = self._text_message("system", system or self.default_system_prompt)
        tail, turn_tokens = self._turn_messages(turn)
        used += turn_tokens
        kept: list[dict[str, Any]] = []
        n_kept = 0
        for ex in reversed(history):
            u = ex.user  # a deleted turn has no text, audio or results left: no message
            user, user_tokens = self._turn_messages(u) if u.user_text or u.audio_wavs or u.outputs else ([], 0)
            reply, reply_tokens = self._reply_messages(ex)
            if used + user_tokens + reply_tokens > max_window_tokens:
                break
            kept[:0] = [*user, *reply]
            used += user_tokens + reply_tokens
            n_kept += 1
        body = {"messages": [head, *kept, *tail], **sampling_fields(params, max_new_tokens, self.sampling_extensions)}
        if tools:
            body.update(tools=[t.openai() for t in tools], tool_choice=tool_choice.openai())
        return ChatRequest(body=body, history_kept=n_kept, input_tokens=used)

    def stream(self, request: ChatRequest, sink: ChatSink) -> Future:
        return self.pool.submit(request.body, sink)

    def health(self) -> str | None:
        """None while some server is healthy (the server's /healthz entry)."""
        return self.pool.health()

    def close(self) -> None:
        self.pool.close()
