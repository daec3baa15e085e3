"""Tool calling values shared by the session core, the engine and the backends, and how a text-only chat renders them.

- `ToolSpec`: one function a client defined (`session.tools`: name, description, JSON-schema parameters).
- `ToolChoice`: `auto` (the server decides), `none`, `required` (some function), or `function` (the named one).
- `ToolCall`: what the model called (`function_call` item): `call_id`, `name`, `arguments` (JSON object text).
- `ToolOutput`: what a client's `function_call_output` item returned for a `call_id`.

Rendering for text-only chat models (embedded Qwen2.5, Qwen-Audio): the history shows a call as the assistant saying
which function it called with which arguments, and a result as a user message that gives it and asks for the answer
in a sentence. Qwen2.5's own `<tool_response>` format made the 0.5B model repeat the JSON or call again instead of
answering (MODELS.md, "Tool calling with the embedded LLM"), so results are worded as a plain request. The
OpenAI-compatible backend sends real `tool_calls` / `tool` messages instead (`openai_chat.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ToolMode = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    parameters_json: str = "{}"  # `parameters` as canonical JSON: equality, hashing, prompts

    @classmethod
    def of(cls, name: str, description: str, parameters: dict[str, Any]) -> ToolSpec:
        return cls(name, description, parameters, json.dumps(parameters, sort_keys=True, ensure_ascii=False))

    def openai(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolMode = "auto"
    name: str | None = None  # mode "function": the function that must be called

    def openai(self) -> str | dict[str, Any]:
        """The Chat Completions `tool_choice` value."""
        return {"type": "function", "function": {"name": self.name}} if self.mode == "function" else self.mode


AUTO = ToolChoice()  # the default choice


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    name: str  # the function that was called (the session knows its calls)
    output: str


def call_text(call: ToolCall) -> str:
    """A call as a text-only chat's assistant message shows it in the history."""
    return f"(I called the function {call.name} with the arguments {call.arguments}.)"


def outputs_text(outputs: tuple[ToolOutput, ...]) -> str:
    """Function results as a text-only chat's user message: each result, then the request to answer with it."""
    lines = [f"The function {out.name} returned: {out.output}" for out in outputs]
    lines.append("Answer my request with this result in one short sentence.")
    return "\n".join(lines)
