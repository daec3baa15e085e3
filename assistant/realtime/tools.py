"""Tools on the wire: `session.tools` / `tool_choice` parsed and echoed, and the events of a `function_call` answer.

Pure code, no I/O. The values (`ToolSpec`, `ToolChoice`, `ToolCall`) are `assistant/backends/tools.py`'s; how the
engine decides on a call is `assistant/engine/tool_calls.py`'s. The event shapes are OpenAI's (same names in GA and
beta): `response.output_item.added` with a `function_call` item, `response.function_call_arguments.delta` / `.done`,
`response.output_item.done`, and the item in `response.done`'s output.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from assistant.backends.tools import ToolCall, ToolChoice, ToolSpec
from assistant.realtime.protocol import ProtocolError
from assistant.schema import shown

if TYPE_CHECKING:
    from assistant.realtime.events import EventFactory

MAX_TOOLS = 16  # the embedded model scores every function before an answer: each costs a short prefill
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's function name rule
_MODES = ("auto", "none", "required")


def parse_tools(value: Any, eid: str | None) -> tuple[ToolSpec, ...]:
    """`session.tools`: a list of `{type: "function", name, description?, parameters?}` (GA and beta alike)."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        msg = f"session.tools must be a list of at most {MAX_TOOLS} function definitions, got {shown(value)}"
        raise ProtocolError("invalid_event", msg, "session.tools", eid)
    specs: list[ToolSpec] = []
    for i, tool in enumerate(value):
        param = f"session.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            got = tool.get("type") if isinstance(tool, dict) else tool
            expected = "{type: 'function', name, description, parameters} (only functions)"
            msg = f"{param} must be {expected}, got {shown(got)}"
            raise ProtocolError("invalid_event", msg, param, eid)
        name, desc, params = tool.get("name"), tool.get("description", ""), tool.get("parameters", {})
        if not isinstance(name, str) or not _NAME.match(name) or any(s.name == name for s in specs):
            msg = f"{param}.name must be a unique name of 1..64 letters, digits, _ or -, got {shown(name)}"
            raise ProtocolError("invalid_event", msg, f"{param}.name", eid)
        if not isinstance(desc, str):
            raise ProtocolError("invalid_event", f"{param}.description must be a string", f"{param}.description", eid)
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            msg = f"{param}.parameters must be a JSON schema of type 'object', got {shown(params)}"
            raise ProtocolError("invalid_event", msg, f"{param}.parameters", eid)
        specs.append(ToolSpec.of(name, desc, params))
    return tuple(specs)


def parse_tool_choice(value: Any, tools: tuple[ToolSpec, ...], eid: str | None) -> ToolChoice:
    """`tool_choice`: "auto" | "none" | "required" | {type: "function", name} naming one of `tools`."""
    if value in _MODES:
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        if any(t.name == value["name"] for t in tools):
            return ToolChoice("function", value["name"])
        names = ", ".join(t.name for t in tools) or "none defined"
        msg = f"session.tool_choice names the function {value['name']!r}, which session.tools lacks ({names})"
        raise ProtocolError("invalid_event", msg, "session.tool_choice", eid)
    msg = f"session.tool_choice must be 'auto', 'none', 'required' or {{type: 'function', name}}, got {shown(value)}"
    raise ProtocolError("invalid_event", msg, "session.tool_choice", eid)


def tool_settings(s: dict[str, Any], tools: tuple[ToolSpec, ...], choice: ToolChoice, eid: str | None) -> dict:
    """The `tools` / `tool_choice` changes of a `session.update` payload (a named choice must stay defined)."""
    ch: dict[str, Any] = {}
    if "tools" in s:
        ch["tools"] = tools = parse_tools(s["tools"] if s["tools"] is not None else [], eid)
    if s.get("tool_choice") is not None:
        ch["tool_choice"] = parse_tool_choice(s["tool_choice"], tools, eid)
    elif choice.mode == "function" and not any(t.name == choice.name for t in tools):
        ch["tool_choice"] = ToolChoice()  # its function was removed
    return ch


def echo_tools(tools: tuple[ToolSpec, ...], choice: ToolChoice) -> dict[str, Any]:
    """`tools` and `tool_choice` as `session.created` / `.updated` show them."""
    listed = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
              for t in tools]  # fmt: skip
    shown_choice: Any = {"type": "function", "name": choice.name} if choice.mode == "function" else choice.mode
    return {"tools": listed, "tool_choice": shown_choice}


def call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "name": call.name,
        "call_id": call.call_id,
        "arguments": call.arguments,
    }


def call_start(events: EventFactory, rid: str, item_id: str, call: ToolCall) -> dict[str, Any]:
    item = call_item(item_id, ToolCall(call.call_id, call.name, ""), "in_progress")
    return events.event("response.output_item.added", response_id=rid, output_index=0, item=item)


def call_delta(events: EventFactory, rid: str, item_id: str, call_id: str, delta: str) -> dict[str, Any]:
    where = {"response_id": rid, "item_id": item_id, "output_index": 0, "call_id": call_id}
    return events.event("response.function_call_arguments.delta", **where, delta=delta)


def call_end(
    events: EventFactory, rid: str, item_id: str, call: ToolCall, body: dict[str, Any], status: str = "completed"
) -> list[dict[str, Any]]:
    """Arguments done, item done, and the one `response.done` whose output is the call (`body`: the response as
    `events.response` builds it, its output replaced here). A call cut short (cancelled, or arguments that are not
    a JSON object) ends `incomplete` with what was streamed."""
    item = call_item(item_id, call, status)
    where = {"response_id": rid, "item_id": item_id, "output_index": 0, "call_id": call.call_id}
    return [
        events.event("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments),
        events.event("response.output_item.done", response_id=rid, output_index=0, item=item),
        events.event("response.done", response={**body, "output": [item]}),
    ]
