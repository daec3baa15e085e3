"""Public surface of the inference engine as the asyncio side sees it (server, MQTT bridge, `ask`).

The engine (`assistant/engine/`) owns the device on one worker thread. The event loop calls the methods below and
never runs model code. This module holds only the typed values that cross that boundary; it imports no torch.

    engine = Engine(backend, cfg.engine, cfg.generation)   # assistant/engine/engine.py
    await engine.start()
    engine.open_session("s1", instructions=None)
    turn = await engine.add_user_turn("s1", Utterance(key="item_1", audio=pcm_16k))   # -> TurnInfo (transcript)
    stream = engine.respond("s1", ResponseOptions())    # raises ServerBusy at once when over admission limits
    async for ev in stream:                               # TextDelta ... then exactly one ResponseDone
        ...
    engine.cancel(stream.response_id)                     # or stream.cancel(); ends with ResponseDone(cancelled)
    engine.truncate_reply("s1", stream.response_id, "Paris is")   # the listener heard only that much of the reply
    await engine.stop()

Speculative turns (server VAD starts a turn's audio work during the silence that may end it):

    engine.speculate_user_turn("s1", Utterance(key="item_2", audio=pcm_so_far))   # returns at once
    turn = await engine.confirm_user_turn("s1", Utterance(key="item_2", audio=pcm_committed))   # -> TurnInfo
    engine.discard_user_turn("s1", "item_2")              # speech resumed, buffer cleared, ...: no trace left

`speculate_user_turn` runs the backend's audio work on the worker but puts nothing into the conversation (no
pending turn, no history, no cache, no "Audio k" number taken). `confirm_user_turn` is exactly `add_user_turn`
(same pending turn, same TurnInfo), except that it reuses the speculative result of the same key when the utterance
is identical (same samples, same text) and its "Audio k" number is still the next one; otherwise it discards that
result and does the audio work now. `TurnInfo.speculative` says whether the result was reused. `discard_user_turn`
forgets a speculation (unknown keys are ignored); `reset_session`/`close_session` forget all of a session's.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal

from assistant.backends.tools import ToolCall, ToolChoice, ToolSpec


def new_id(prefix: str) -> str:
    """The one id scheme (`resp_...`, `item_...`, `sess_...`, `event_...`): 80 random bits, unique per process and
    across restarts. Response ids are made by the caller of `respond` (the session core) or, when it passes none,
    by the engine, always here."""
    return f"{prefix}_{secrets.token_hex(10)}"


class ServerBusy(Exception):
    """Admission control refused the request (too many queued/active responses). Protocol code `server_busy`."""

    code = "server_busy"


class ConversationBusy(Exception):
    """The session already has a response queued or running (code `conversation_already_has_active_response`)."""

    code = "conversation_already_has_active_response"


class UnknownSession(KeyError):
    """The session id is not open (closed, or never opened)."""


class TurnTooLong(ValueError):
    """A user turn (typed text or transcript) over `engine.max_turn_tokens`: refused, nothing entered the
    conversation. Protocol code `turn_too_long`."""

    code = "turn_too_long"

    @classmethod
    def tokens(cls, n: int, limit: int) -> TurnTooLong:
        return cls(
            f"user turn of {n} tokens is over engine.max_turn_tokens = {limit}; send a shorter turn (or raise "
            "engine.max_turn_tokens in the server config)"
        )

    @classmethod
    def characters(cls, n: int, limit: int, chars_per_token: int) -> TurnTooLong:
        return cls(
            f"user turn of {n} characters is over engine.max_turn_tokens = {limit} (more than {limit * chars_per_token}"
            " characters is refused before tokenizing); send a shorter turn (or raise engine.max_turn_tokens)"
        )


@dataclass(frozen=True)
class ResponseOptions:
    max_new_tokens: int | None = None  # None = generation config
    greedy: bool | None = None
    temperature: float | None = None
    seed: int | None = None
    tools: tuple[ToolSpec, ...] = ()  # functions the answer may call (`engine/tool_calls.py`)
    tool_choice: ToolChoice = ToolChoice()


@dataclass(frozen=True)
class TurnInfo:
    item_id: str
    transcript: str | None  # embedded backend: what was heard; qwen-audio: None
    language: str | None
    audio_s: float
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, encode
    speculative: bool = False  # confirm_user_turn reused the audio work of speculate_user_turn


@dataclass(frozen=True)
class TextDelta:
    text: str  # never splits a UTF-8 character


@dataclass(frozen=True)
class ToolCallStarted:
    """The answer is a call of function `name` (not text): the `TextDelta`s that follow are its JSON arguments."""

    call_id: str
    name: str


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    status: Literal["completed", "cancelled", "failed", "incomplete"]
    reason: str | None  # cancelled: "client_cancelled" | "turn_detected" | ...; incomplete: "max_output_tokens"
    text: str  # full answer text (stripped), what enters the history
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids before the first stop id
    input_tokens: int
    output_tokens: int
    timings_ms: dict[str, float]  # queue, encode, prefill, first_token, decode, total
    error: str | None = None  # status "failed": what went wrong
    cached_tokens: int = 0  # leading prompt tokens served from the session's KV cache (not prefilled again)
    error_code: str | None = None  # status "failed": the protocol code (None = "response_failed")
    tool_calls: tuple[ToolCall, ...] = ()  # completed: the function calls the answer made (its text is then "")

    @classmethod
    def refused(cls, response_id: str, error: str, code: str | None = None) -> ResponseDone:
        """The end of a response that never started (refused, or its session was gone): failed, nothing generated."""
        return cls(response_id, "failed", None, "", [], [], 0, 0, {}, error=error, error_code=code)
