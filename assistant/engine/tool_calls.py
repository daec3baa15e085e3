"""Whether and how the engine's own LM calls a function (embedded and Qwen-Audio backends; worker thread only).

The 0.5B model cannot be left to choose freely (MODELS.md, "Tool calling with the embedded LLM": it calls a tool for
4/6 requests that need none and never closes `<tool_call>`), so the choice and the writing are separate:

1. Choice (`choose`), for `tool_choice: auto` / `required`: how much a function's description raises the model's
   likelihood of the user's words, per token, against no description (pointwise mutual information, one short
   prefill per function plus one without; `relevance`). `auto` calls the best function when that gain is above 0
   (the request is likelier said by someone who wants that function than by anyone), `required` calls the best one
   anyway, a named `tool_choice` calls that one. A turn that carries function results is answered in words under
   `auto` (the model already has what it asked for). Measured by `bench/tools.py`.
2. Arguments (`call_prompt`): the chat prompt with Qwen2.5's `<tools>` system block and the assistant turn prefilled
   up to `<tool_call>\n{"name": "<chosen>", "arguments": {`, so the name is the chosen one and the arguments are an
   object by construction (left unopened, the model wrote `10}` for `set_timer`); the model writes the object's
   keys, decoding greedily until its braces balance (`ArgumentsEnd`), then it must parse as a JSON object
   (`finish_arguments`) or the answer fails with a message saying so.
Cost on 2 CPU threads: the choice prefills (functions + 1) short texts; the call prompt differs from the plain one
in its system message, so the session's cache is rebuilt for it and again for the next plain answer.
"""

from __future__ import annotations

import json
import logging

import torch

from assistant.backends.base import Backend, Exchange, PreparedTurn, Prompt, SamplingParams
from assistant.backends.tools import ToolCall, ToolChoice, ToolSpec

__all__ = ["ToolCall", "ArgumentsEnd", "call_prompt", "choose", "finish_arguments", "relevance", "GREEDY"]

log = logging.getLogger("assistant.engine")

GREEDY = SamplingParams(greedy=True)  # arguments are facts taken from the request, not prose
MAX_ARGUMENT_TOKENS = 96  # a call's JSON arguments; a model that never closes the object stops here (then fails)
TOOL_CALL_TAG = "<tool_call>"
_TOOLS_SYSTEM = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)  # Qwen2.5's chat template, word for word
_BASE_CONTEXT = 'A user says to a voice assistant: "'
_TOOL_CONTEXT = 'A voice assistant can call the function {name}: {what}. A user who wants it to {want} says: "'


def _mean_logprob(backend: Backend, prefix: str, text: str) -> float:
    """Mean log-probability per token of `text` after `prefix` (the prefix's own positions need no logits)."""
    tok, lm = backend.tokenizer, backend.lm
    p, r = tok.encode(prefix), tok.encode(text)
    cache = lm.new_cache()
    first = lm.prefill(lm.embed(torch.tensor(p, dtype=torch.long, device=lm.device)), cache)
    if len(r) > 1:
        rest = lm.prefill(lm.embed(torch.tensor(r[:-1], dtype=torch.long, device=lm.device)), cache, all_logits=True)
        first = torch.cat([first, rest])
    logp = torch.log_softmax(first.float(), dim=-1)
    return float(logp.gather(1, torch.tensor(r, device=logp.device)[:, None]).mean())


def relevance(backend: Backend, request: str, tool: ToolSpec, base: float | None = None) -> float:
    """Mean log-likelihood gain per token of `request` (closed by a quote) when `tool`'s description comes first."""
    what = (tool.description or tool.name.replace("_", " ")).strip().rstrip(".")
    context = _TOOL_CONTEXT.format(name=tool.name, what=what, want=what[:1].lower() + what[1:])
    if base is None:
        base = _mean_logprob(backend, _BASE_CONTEXT, request + '"')
    return _mean_logprob(backend, context, request + '"') - base


def choose(backend: Backend, turn: PreparedTurn, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> ToolSpec | None:
    """The function this answer calls, or None for an answer in words (see the module docstring)."""
    if not tools or choice.mode == "none":
        return None
    if choice.mode == "function":
        return next((t for t in tools if t.name == choice.name), None)
    request = (turn.transcript or turn.user_text).strip()
    if not request or (turn.outputs and choice.mode == "auto"):
        return None
    base = _mean_logprob(backend, _BASE_CONTEXT, request + '"')
    scores = {t.name: relevance(backend, request, t, base) for t in tools}
    best = max(tools, key=lambda t: scores[t.name])
    log.info("tool choice for %r: %s", request[:80], " ".join(f"{k}={v:+.2f}" for k, v in scores.items()))
    return best if choice.mode == "required" or scores[best.name] > 0.0 else None


def tools_system(system: str, tools: tuple[ToolSpec, ...]) -> str:
    specs = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    return system + _TOOLS_SYSTEM.format(tools=specs)


def call_prompt(
    backend: Backend, system: str, history: list[Exchange], turn: PreparedTurn, tools: tuple[ToolSpec, ...],
    name: str, window_tokens: int,
) -> Prompt:  # fmt: skip
    """The chat prompt with the tools block, the assistant turn opened up to the chosen function's arguments."""
    prompt = backend.build_prompt(tools_system(system, tools), history, turn, window_tokens)
    tok = backend.tokenizer
    tag = getattr(tok, "special_ids", {}).get(TOOL_CALL_TAG)
    head = [tag] + tok.encode("\n") if tag is not None else tok.encode(TOOL_CALL_TAG + "\n")
    opened = json.dumps({"name": name, "arguments": None}, ensure_ascii=False).removesuffix("null}") + "{"
    return Prompt(prompt.ids + head + tok.encode(opened), prompt.audio, prompt.history_kept)


class ArgumentsEnd:
    """Follows streamed JSON text; `feed` returns how much of a piece belongs to the object (the rest: past its end)
    or None while the object is still open. Braces inside strings do not count."""

    def __init__(self) -> None:
        # the prompt already opened the object (`call_prompt`): the model writes its keys, never a bare value
        self.depth, self.in_string, self.escaped, self.started = 1, False, False, True

    def feed(self, piece: str) -> int | None:
        for i, ch in enumerate(piece):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.started and self.depth <= 0:
                    return i + 1
        return None


def finish_arguments(name: str, text: str) -> str:
    """The arguments as canonical JSON object text; ValueError naming what the model wrote otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"the model wrote no JSON object as the arguments of {name}: {text[:200]!r}")
    return json.dumps(value, ensure_ascii=False)
