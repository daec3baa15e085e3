"""The typed commands the event loop sends to the engine's worker thread, and `Job`, one response on the worker.

Commands name sessions by id: the worker alone owns the `Conversation`s (history, KV cache, busy flags), creates
them on `OpenSessionCmd` and looks them up for every later command. A command for a session that is gone is
answered (a turn's reply gets `UnknownSession`) or ignored, never applied to stale state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from assistant.backends.base import PreparedTurn, Prompt, Utterance
from assistant.backends.tools import ToolCall
from assistant.engine.api import ResponseDone, ResponseOptions
from assistant.engine.conversation import Conversation
from assistant.engine.decoding import TokenStream
from assistant.engine.stream import ResponseStream


def ms_between(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000.0, 3)


def refuse_stopped(reply: Any) -> None:
    """Answer a command's reply (a concurrent future) when the engine stopped before running it."""
    if not reply.done():
        reply.set_exception(RuntimeError("the engine stopped before this command ran"))


@dataclass(frozen=True)
class OpenSessionCmd:
    session_id: str
    instructions: str | None  # None = the backend's default system prompt


@dataclass(frozen=True)
class CloseSessionCmd:
    session_id: str  # its outstanding response ends cancelled ("session_closed")


@dataclass(frozen=True)
class ResetSessionCmd:
    session_id: str  # history, pending turns, speculations and cache are dropped; the response is cancelled


@dataclass(frozen=True)
class InstructionsCmd:
    session_id: str
    instructions: str | None


@dataclass(frozen=True)
class TruncateReplyCmd:
    session_id: str
    response_id: str
    text: str  # what the listener heard of that reply


@dataclass(frozen=True)
class DeleteItemCmd:
    session_id: str
    key: str | None  # a user turn (item id)
    response_id: str | None  # or the reply of that response


@dataclass(frozen=True)
class PrepareCmd:
    session_id: str
    utterance: Utterance
    submitted_s: float
    reply: Any  # concurrent.futures.Future[TurnInfo]
    confirm: bool = False  # reuse a matching speculation of the same key (Engine.confirm_user_turn)


@dataclass(frozen=True)
class SpeculateCmd:
    session_id: str
    utterance: Utterance
    submitted_s: float
    heard: Any = None  # concurrent.futures.Future[TurnInfo | None]: its result (None when it did not run), or None


@dataclass(frozen=True)
class DiscardCmd:
    session_id: str
    key: str


@dataclass(frozen=True)
class RespondCmd:
    response_id: str
    session_id: str
    options: ResponseOptions
    stream: ResponseStream
    submitted_s: float
    on_finish: Callable[[str, str], None]  # (session id, response id), run on the worker before the ResponseDone


@dataclass(frozen=True)
class CancelCmd:
    response_id: str
    reason: str


@dataclass(frozen=True)
class CallCmd:
    """Run `fn(backend)` on the worker between two decode steps (model work that must share the worker's thread)."""

    fn: Callable[[Any], Any]
    reply: Any  # concurrent.futures.Future


@dataclass(frozen=True)
class StopCmd:
    pass


@dataclass(frozen=True)
class RemoteDoneCmd:
    """A remote answer ended (`engine/remote.py`; sent from the backend's I/O thread)."""

    response_id: str
    status: str  # "completed" | "incomplete" | "failed"
    reason: str | None
    error: str | None


Command = (
    OpenSessionCmd
    | CloseSessionCmd
    | ResetSessionCmd
    | InstructionsCmd
    | TruncateReplyCmd
    | DeleteItemCmd
    | PrepareCmd
    | SpeculateCmd
    | DiscardCmd
    | RespondCmd
    | CancelCmd
    | CallCmd
    | StopCmd
    | RemoteDoneCmd
)


@dataclass
class Job:
    """One response on the worker, from admission to `ResponseDone`."""

    cmd: RespondCmd
    conv: Conversation
    turns: list[PreparedTurn] = field(default_factory=list)
    encode_ms: float = 0.0
    prompt: Prompt | None = None
    cached_tokens: int = 0
    tokens: TokenStream | None = None
    next_id: int | None = None  # sampled, streamed, not yet fed to the model
    cancel_reason: str | None = None
    t: dict[str, float] = field(default_factory=dict)
    turns_before: int = 0  # `TurnQueue.mark()` at the respond: it waits for its session's turns queued before it
    reply: Any = None  # a remote backend's answer: the `remote.RemoteReply` it streams into (None: decoded here)
    call: ToolCall | None = None  # the answer is this function call (`tool_calls.py`); arguments: `call_text`
    call_end: Any = None  # `tool_calls.ArgumentsEnd` following the streamed arguments
    call_text: str = ""

    @property
    def response_id(self) -> str:
        return self.cmd.response_id

    @property
    def stream(self) -> ResponseStream:
        return self.cmd.stream

    @property
    def options(self) -> ResponseOptions:
        return self.cmd.options

    @property
    def submitted_s(self) -> float:
        return self.cmd.submitted_s

    def done(self, status: str, reason: str | None, text: str, error: str | None) -> ResponseDone:
        """The response's one `ResponseDone`, with its phase timings (queue, encode, prefill, first_token, decode)."""
        t, now = self.t, time.monotonic()
        admitted = t.get("admitted", now)
        timings = {"queue": ms_between(self.submitted_s, admitted), "encode": round(self.encode_ms, 3)}
        if "prefilled" in t:
            timings["prefill"] = ms_between(admitted, t["prefilled"])
        if "first_token" in t:
            timings["first_token"] = ms_between(self.submitted_s, t["first_token"])
            timings["decode"] = ms_between(t["first_token"], now)
        timings["total"] = ms_between(self.submitted_s, now)
        prompt_ids = list(self.prompt.ids) if self.prompt else []
        output_ids = list(self.tokens.output_ids) if self.tokens else []
        return ResponseDone(
            response_id=self.response_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            text=text,
            prompt_ids=prompt_ids,
            output_ids=output_ids,
            input_tokens=len(prompt_ids),
            output_tokens=len(output_ids),
            timings_ms=timings,
            error=error,
            cached_tokens=self.cached_tokens,
            tool_calls=(self.call,) if self.call is not None and status == "completed" else (),
        )
