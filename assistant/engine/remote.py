"""Answers of a remote backend (`ChatBackend`, e.g. `openai`) on the engine's worker: started there, streamed elsewhere.

The worker treats a remote answer like a local one from admission to `ResponseDone` (it is a `Job` in
`worker.active`, so `max_active`, cancellation, close, reset and the history rules are the same), except that
`RemoteResponses.start` replaces prefill + decode: it asks the backend for the chat request (history trimmed to the
window), and the backend streams it on its own I/O thread into a `RemoteReply`. That reply pushes each delta straight
into the response's `ResponseStream` (no wait for the worker, which may be running Whisper), and posts a
`RemoteDoneCmd` to the worker when the answer ends; the worker then finishes the job as any other (`_finish` reads
the reply's text and closes it). A cancel closes the HTTP stream from `_finish`.

The text rule is the local one (`decoding.TokenStream`): leading whitespace is dropped and trailing whitespace held
back until more text follows, so the deltas concatenate exactly to the text that enters the history. Deltas and
`close` share one lock: whatever reached the client before the end is in the history, and nothing after it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from assistant.backends.base import ChatBackend, PreparedTurn
from assistant.backends.tools import ToolCall
from assistant.config import GenerationConfig
from assistant.engine.api import ResponseDone, TextDelta, ToolCallStarted
from assistant.engine.commands import Job, RemoteDoneCmd
from assistant.engine.sampling import sampling_params
from assistant.models.kv_cache import KVCache

log = logging.getLogger("assistant.engine")


def is_remote(backend: Any) -> bool:
    return callable(getattr(backend, "chat_request", None))


def empty_cache() -> KVCache:
    """A remote session's KV cache: the real one lives on the server (vLLM's prefix cache); this one has no layers
    and stays empty, so the engine's cache budget and eviction count nothing for it."""
    return KVCache(n_layers=0, n_kv_heads=0, head_dim=0, dtype=torch.bfloat16)


class RemoteReply:
    """One remote answer: the `upstream.ChatSink` its stream feeds (I/O thread) and what the worker reads at its end."""

    def __init__(self, job: Job, post: Callable[[RemoteDoneCmd], None], input_tokens: int):
        self._job, self._post = job, post
        self._lock = threading.Lock()
        self._sent: list[str] = []
        self._held = ""  # trailing whitespace, sent only when more text follows
        self._closed = False
        self.future: Any = None  # the stream; cancelling it closes the connection
        self.input_tokens = input_tokens  # counted here; the server's usage replaces it when reported
        self.output_tokens: int | None = None
        self.error_code: str | None = None

    # ---- the upstream's I/O thread --------------------------------------------------------------------------------
    def delta(self, text: str) -> None:
        with self._lock:
            if self._closed:
                return
            piece = self._held + text
            if not self._sent:
                piece = piece.lstrip()
            body = piece.rstrip()
            self._held = piece[len(body) :]
            if body and self._job.call is None:  # text after a call is not shown (the answer is the call)
                if not self._sent:
                    self._job.t["first_token"] = time.monotonic()
                self._sent.append(body)
                self._job.stream.push(TextDelta(body))

    def tool_call(self, call_id: str | None, name: str | None, arguments: str) -> None:
        """A piece of the server's first function call: its id and name come first, then its arguments in pieces.
        The worker finishes it as a local call (`Job.call`, `Job.call_text`)."""
        with self._lock:
            if self._closed:
                return
            job = self._job
            if job.call is None:
                if self._sent or not call_id or not name:  # text came first, or a call without its id and name
                    log.warning("response %s: ignored a function call after text or without an id", job.response_id)
                    return
                job.call = ToolCall(call_id, name, "")
                job.t.setdefault("first_token", time.monotonic())
                job.stream.push(ToolCallStarted(call_id, name))
            elif call_id and call_id != job.call.call_id:
                log.warning("response %s: ignored a second function call (%s)", job.response_id, name)
                return
            if arguments:
                job.call_text += arguments
                job.stream.push(TextDelta(arguments))

    def finished(self, finish_reason: str, usage: dict[str, Any] | None) -> None:
        with self._lock:
            if self._closed:
                return
            if usage:
                self.input_tokens = int(usage.get("prompt_tokens", self.input_tokens))
                self.output_tokens = usage.get("completion_tokens")
        length = finish_reason == "length"
        status, reason = ("incomplete", "max_output_tokens") if length else ("completed", None)
        self._post(RemoteDoneCmd(self._job.response_id, status, reason, None))

    def failed(self, code: str, message: str) -> None:
        with self._lock:
            if self._closed:
                return
            self.error_code = code
        self._post(RemoteDoneCmd(self._job.response_id, "failed", None, message))

    # ---- the worker -----------------------------------------------------------------------------------------------
    def close(self) -> str:
        """Stop the stream (a no-op once it ended) and return the text the client was sent."""
        with self._lock:
            self._closed = True
            text = "".join(self._sent)
        if self.future is not None:
            self.future.cancel()
        return text

    def amend(self, done: ResponseDone, tokenizer: Any) -> ResponseDone:
        """The worker's `ResponseDone` with this answer's token counts and error code."""
        output_tokens = self.output_tokens
        if not isinstance(output_tokens, int):  # no usage from the server: count the text here
            output_tokens = len(tokenizer.encode(done.text)) if done.text else 0
        return dataclasses.replace(
            done, input_tokens=self.input_tokens, output_tokens=output_tokens, error_code=self.error_code
        )


class RemoteResponses:
    """Starts remote answers for the worker (see the module docstring)."""

    def __init__(self, backend: ChatBackend, gen_cfg: GenerationConfig, post: Callable[[RemoteDoneCmd], None]):
        self.backend, self.gen_cfg, self._post = backend, gen_cfg, post

    def start(self, job: Job, turn: PreparedTurn, window_tokens: int) -> bool:
        """Send the chat request answering `turn`; the job stays active until its `RemoteDoneCmd` (or a cancel)."""
        conv = job.conv
        params = sampling_params(self.gen_cfg, job.options, None)
        max_new = job.options.max_new_tokens or self.gen_cfg.max_new_tokens
        opts = job.options
        args = (conv.system, conv.history, turn, window_tokens, params, max_new, opts.tools, opts.tool_choice)
        request = self.backend.chat_request(*args)
        conv.keep_window(request.history_kept)
        job.reply = RemoteReply(job, self._post, request.input_tokens)
        job.reply.future = self.backend.stream(request, job.reply)
        return True
