"""The boundary between the engine and the model backends (`qwen-audio`, `embedded`; `openai` is the remote kind).

The engine sees token ids, embeddings and a `DecoderLM`; it knows nothing about Whisper, mel spectrograms or
checkpoint layouts. A backend turns utterances into `PreparedTurn`s (audio work, batched), renders the chat prompt
for a conversation, and owns the tokenizer. Everything here runs on the engine's worker thread.
"""

from __future__ import annotations

from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from assistant.audio import MODEL_RATE_HZ
from assistant.backends.tools import AUTO, ToolCall, ToolChoice, ToolOutput, ToolSpec, call_text, outputs_text

if TYPE_CHECKING:  # the server imports `Utterance` from here and must never import torch
    import torch

    from assistant.models.kv_cache import KVCache


@dataclass(frozen=True)
class Utterance:
    """One user turn as submitted: audio (16 kHz mono float32, values on the int16 grid / 32768), text, or both."""

    key: str  # unique id of this turn (the protocol's item_id); names its audio span in caches
    audio: np.ndarray | None = None
    text: str | None = None
    output: ToolOutput | None = None  # a client's function result (no audio, no text): `PreparedTurn.outputs`
    language: str | None = None  # the language the audio is spoken in, as the client said ("en"); None: detected
    prompt: str = ""  # the client's words for the recogniser (OpenAI `transcription.prompt`): heard before the turn
    # What the user said before this turn, as heard (the engine's `Conversation.said_before`), filled when the
    # backend `hears_previous_text` (`[embedded] whisper_previous_text`): Whisper's previous-text prompt (after
    # `prompt`).
    previous_text: str = ""

    @property
    def audio_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / MODEL_RATE_HZ


@dataclass
class AudioSpan:
    """Embeddings that replace the prompt positions start..start+len(embeds)-1 (`<audio>` .. `</audio>` inclusive)."""

    start: int
    embeds: torch.Tensor  # [span, hidden]
    key: str


@dataclass
class PreparedTurn:
    """A user turn after the backend's audio work: ready to be rendered into any later prompt."""

    key: str
    user_text: str  # the user message as it enters the chat (qwen-audio: "Audio k: <audio>key</audio>\n..." )
    transcript: str | None = None  # embedded: what Whisper heard (for the transcription event); qwen-audio: None
    language: str | None = None
    audio_s: float = 0.0
    audio_embeds: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [span, hidden] (qwen-audio)
    audio_wavs: tuple[str, ...] = ()  # openai backend, audio_input "audio": the turn's audio, base64 16 kHz WAV
    outputs: tuple[ToolOutput, ...] = ()  # function results the client sent (rendered before `user_text`)

    @property
    def chat_text(self) -> str:
        """The user message of a text-only chat: the function results (`tools.outputs_text`), then the user's text."""
        if not self.outputs:
            return self.user_text
        return "\n".join(s for s in (outputs_text(self.outputs), self.user_text) if s)


@dataclass
class Exchange:
    """One finished turn of history: the user turn and the assistant's reply text (stripped)."""

    user: PreparedTurn  # the answered turns merged (`conversation.merge_turns`); empty when all were deleted
    reply: str
    response_id: str | None = None  # the response that said `reply` (so what was heard can cut it later)
    calls: tuple[ToolCall, ...] = ()  # the functions the reply called (the model's function_call items)
    turns: list[PreparedTurn] = field(default_factory=list)  # the answered turns one by one (item deletion)

    @property
    def reply_text(self) -> str:
        """The assistant message of a text-only chat: the reply, then each call it made (`tools.call_text`)."""
        return "\n".join(s for s in (self.reply.strip(), *(call_text(c) for c in self.calls)) if s)


@dataclass
class Prompt:
    ids: list[int]
    audio: list[AudioSpan] = field(default_factory=list)
    history_kept: int = 0  # how many of the newest history exchanges fit in the window


class Tokenizer(Protocol):
    eos_id: int
    stop_ids: frozenset[int]  # generation ends at the first of these
    n_valid: int  # ids >= n_valid are padding rows and are never emitted

    def encode(self, text: str) -> list[int]: ...

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of `ids` with special tokens written as their text (e.g. `<|2.33|>`)."""
        ...


class DecoderLM(Protocol):
    """A decoder-only LM with an explicit per-conversation KV cache (see `assistant/models/kv_cache.py`)."""

    vocab_size: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    def new_cache(self) -> KVCache: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 -> [T, hidden] in the model dtype."""
        ...

    def rope_alpha_for(self, total_len: int) -> float:
        """Dynamic-NTK alpha a prefill of `total_len` tokens would use (1.0 for models without it). The engine
        rebuilds a cache whose `rope_alpha` differs from this for the new prompt's length."""
        ...

    def prefill(self, x: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append x [T, hidden] at positions cache.length.. (an empty cache first takes rope_alpha_for(T)).
        Returns float32 logits [T, vocab] if all_logits else [1, vocab] for the last position; commits T tokens."""
        ...

    def decode(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One token per conversation, batched: x [B, hidden] -> float32 logits [B, vocab]; each cache grows by 1."""
        ...


T = TypeVar("T")
# Audio work in bounded steps: a generator that yields (nothing) between pieces of work and returns its result, so the
# engine's worker can drain commands and run a decode step between them (see `Backend`).
Steps = Generator[None, None, "list[PreparedTurn]"]


def run_steps(steps: Generator[None, None, T]) -> T:
    """Run stepwise work to its end (for callers with nothing to do between its steps)."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class Backend(Protocol):
    name: str  # "qwen-audio" | "embedded"
    lm: DecoderLM
    tokenizer: Tokenizer
    default_system_prompt: str
    max_window_tokens: int  # history budget (qwen-audio: generation_config max_window_size)

    def prepare(self, utterances: list[Utterance], audio_numbers: list[int]) -> list[PreparedTurn]:
        """Batched audio work for several utterances (qwen-audio: encoder; embedded: Whisper). `audio_numbers[i]`
        is k in "Audio k:" (audios counted across the conversation)."""
        ...

    # Optional: `languages: tuple[str, ...]`, the codes an utterance's `language` may name (a recogniser told the
    # language skips detecting it; absent or empty: the backend takes no language); `prepare_batch: int`, the most
    # utterances the engine passes per call (default `assistant.engine.turns.PREPARE_BATCH`);
    # `prepare_steps(utterances, audio_numbers) -> Steps`, `prepare` in bounded steps, looked up on the backend's
    # class (a wrapper that overrides only `prepare` is used as it is); `hears_previous_text: bool`, the engine fills
    # each spoken utterance's `previous_text` (absent or false: it stays empty, and nothing is computed).

    def build_prompt(self, system: str, history: list[Exchange], turn: PreparedTurn, max_window_tokens: int) -> Prompt:
        """Chat prompt for `turn` after `history`, newest history first while it fits `max_window_tokens`."""
        ...


@dataclass
class ChatRequest:
    """One answer for a remote backend: the OpenAI chat request body (messages, sampling; the pool adds the model
    and streaming fields) and what the conversation needs to know about it."""

    body: dict
    history_kept: int  # how many of the newest history exchanges fit in the window
    input_tokens: int  # the prompt's size as counted here (when the server reports no usage)


class ChatBackend(Protocol):
    """A backend whose LLM is a remote chat server (`openai`). The worker keeps the conversation and runs the turn's
    audio work exactly as for `Backend` (`prepare`, optional `prepare_steps` and `prepare_batch`), but an answer
    streams from the server (`assistant/engine/remote.py`) instead of being decoded on the worker: no `lm`, no
    token prompt, no KV cache here."""

    name: str
    tokenizer: Tokenizer  # counts tokens: the history budget, the turn limit
    default_system_prompt: str
    max_window_tokens: int

    def prepare(self, utterances: list[Utterance], audio_numbers: list[int]) -> list[PreparedTurn]: ...

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
        """The request answering `turn` after the newest `history` that fits `max_window_tokens`, offering `tools`."""
        ...

    def stream(self, request: ChatRequest, sink: Any) -> Future:
        """Start streaming the answer into `sink` (an `upstream.ChatSink`, called on another thread); cancelling the
        returned future closes the stream."""
        ...

    def close(self) -> None: ...


# The Qwen-Audio-Chat generation config: the defaults of `SamplingParams` and of a checkpoint without its own.
CHAT_DEFAULTS = {"do_sample": True, "top_p": 0.5, "top_k": 0, "temperature": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.5
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = -1

    @classmethod
    def from_generation_config(cls, gc: dict, seed: int = -1) -> SamplingParams:
        """A checkpoint's generation_config.json (missing keys: the Qwen-Audio-Chat values)."""
        g = {**CHAT_DEFAULTS, **{k: v for k, v in gc.items() if k in CHAT_DEFAULTS and v is not None}}
        return cls(
            greedy=not g["do_sample"],
            temperature=float(g["temperature"]),
            top_p=float(g["top_p"]),
            top_k=int(g["top_k"]),
            repetition_penalty=float(g["repetition_penalty"]),
            seed=seed,
        )
