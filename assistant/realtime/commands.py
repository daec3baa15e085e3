"""What the session core asks of the engine and of the voice, and what their answers look like when they come back.

The core (`session.Session`) never calls the engine or the voice: it returns these commands among its outputs, and
the transport's driver (`assistant.transport.connection`) carries them out and feeds the results back in as the
`EngineOutput` values below. All are plain frozen dataclasses; nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from assistant.backends.base import Utterance
from assistant.engine.api import ResponseDone, ResponseOptions, ToolCallStarted, TurnInfo


# ---- core -> engine ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenConversation:
    instructions: str | None


@dataclass(frozen=True)
class CloseConversation:
    pass


@dataclass(frozen=True)
class ResetConversation:
    """Forget history, pending turns and cache; an outstanding response still ends with its ResponseFinished."""


@dataclass(frozen=True)
class SetInstructions:
    instructions: str | None  # None = the backend's default system prompt


@dataclass(frozen=True)
class AddTurn:
    """Prepare a committed user turn; `confirm`: reuse the speculation of the same key when it matches."""

    utterance: Utterance
    confirm: bool = False


@dataclass(frozen=True)
class Speculate:
    """Start the audio work of a turn that is not committed yet (fire and forget; with `heard`, its transcript
    comes back as `TurnHeard`, for semantic turn detection)."""

    utterance: Utterance
    heard: bool = False


@dataclass(frozen=True)
class Discard:
    """Forget the speculation of `key`."""

    key: str


@dataclass(frozen=True)
class StartResponse:
    response_id: str
    options: ResponseOptions


@dataclass(frozen=True)
class CancelResponse:
    response_id: str
    reason: str  # "client_cancelled" | "turn_detected"


@dataclass(frozen=True)
class TruncateReply:
    """The listener heard only `text` of the reply of `response_id`: the engine's history keeps just that (an empty
    text puts the answered turn back to pending, as for an answer cancelled before it said anything)."""

    response_id: str
    text: str


@dataclass(frozen=True)
class DeleteItem:
    """`conversation.item.delete`: the user turn `key`, or the reply of `response_id`, leaves the engine's history
    (and every later prompt)."""

    key: str | None = None
    response_id: str | None = None


@dataclass(frozen=True)
class Speak:
    """Synthesise clause `index` of the answer `response_id` (in the shared voice pool); the result comes back as
    `ClauseSpoken` or `SpeechFailed` with the same ids. Clauses of one answer may finish in any order."""

    response_id: str
    index: int
    text: str
    voice: str
    speed: float
    rate_hz: int


@dataclass(frozen=True)
class CancelSpeech:
    """Drop the clauses of `response_id` not synthesised yet (the one being synthesised finishes and is ignored)."""

    response_id: str


EngineCommand = (
    OpenConversation
    | CloseConversation
    | ResetConversation
    | SetInstructions
    | AddTurn
    | Speculate
    | Discard
    | StartResponse
    | CancelResponse
    | TruncateReply
    | DeleteItem
    | Speak
    | CancelSpeech
)


# ---- engine -> core ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurnPrepared:
    key: str
    info: TurnInfo


@dataclass(frozen=True)
class TurnHeard:
    """The transcript of a speculation asked with `Speculate(heard=True)`: None when the backend gives none or the
    speculation did not run (discarded, failed, engine busy closing)."""

    key: str
    transcript: str | None


@dataclass(frozen=True)
class TurnFailed:
    key: str
    message: str
    code: str = "turn_failed"  # a protocol error code (`turn_too_long` when the turn is over the token limit)


@dataclass(frozen=True)
class ResponseRefused:
    """`respond` refused at once (admission control); the core still ends the response it announced."""

    response_id: str
    code: str  # "server_busy" | "conversation_already_has_active_response"
    message: str


@dataclass(frozen=True)
class ResponseDelta:
    response_id: str
    text: str


@dataclass(frozen=True)
class ResponseFinished:
    done: ResponseDone


@dataclass(frozen=True)
class ClauseSpoken:
    """The audio of one clause: PCM16 LE mono at the rate `Speak` asked for."""

    response_id: str
    index: int
    pcm: bytes
    synth_ms: float  # how long the synthesis took (latency breakdown)


@dataclass(frozen=True)
class SpeechFailed:
    response_id: str
    index: int
    message: str


EngineOutput = (
    TurnPrepared
    | TurnHeard
    | TurnFailed
    | ResponseRefused
    | ResponseDelta
    | ToolCallStarted  # the answer is a function call: its ResponseDeltas are the arguments
    | ResponseFinished
    | ClauseSpoken
    | SpeechFailed
)


# ---- core -> driver (facts worth a metric) -------------------------------------------------------------------------
@dataclass(frozen=True)
class FirstText:
    """The first answer text of a response left the core `latency_s` after the turn ended (commit or create)."""

    latency_s: float


@dataclass(frozen=True)
class FirstAudio:
    """The first answer audio of a response left the core `latency_s` after the turn ended (commit or create)."""

    latency_s: float
