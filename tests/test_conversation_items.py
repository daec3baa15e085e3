"""Conversation items and tool calls in the sans-I/O session core (no event loop, no model): `conversation.item.create`
(user text, user audio, `function_call_output`, `previous_item_id`), `conversation.item.delete`, and the events of an
answer that is a function call, each event validated strictly against the `openai` SDK's models (GA and beta). Bad
items get one `error` naming what was expected and the session goes on (also for random items, hypothesis)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.backends.tools import ToolCall
from assistant.engine.api import ResponseDone, ToolCallStarted
from assistant.realtime import commands as C
from assistant.realtime.session import Session, SessionLimits
from assistant.realtime.settings import SessionSettings
from tests.test_openai_sdk import strict
from tests.test_realtime_core import EngineSim, types, vowel

RATE_HZ = 24000
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


def session(dialect: str = "ga", tools: bool = False) -> tuple[Session, EngineSim, list[dict]]:
    s = Session("sess_t", SessionSettings(input_rate_hz=RATE_HZ, turn_detection=None), dialect, limits=SessionLimits())
    sim = EngineSim()
    log = sim.run(s.start(0.0))
    if tools:
        log += sim.run(s.receive_event({"type": "session.update", "session": {"tools": [WEATHER]}}, 0.0))
    return s, sim, log


def send(s: Session, sim: EngineSim, event: dict, dialect: str = "ga") -> list[dict]:
    events = sim.run(s.receive_event(event, 0.1))
    while (out := sim.step()) is not None:
        events += sim.run(s.engine_output(out, 0.2))
    for e in events:
        strict(e, dialect)
    return events


def create(item: dict, **extra) -> dict:
    return {"type": "conversation.item.create", "item": item, **extra}


def text_item(text: str, **extra) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **extra}


def call_answer(sim: EngineSim, rid: str, call_id: str, arguments: str) -> None:
    """The engine's side of an answer that is a call (as the worker streams it)."""
    half = len(arguments) // 2
    finished = ResponseDone(rid, "completed", None, "", [1], [2], 1, 1, {"total": 1.0},
                            tool_calls=(ToolCall(call_id, "get_weather", arguments),))  # fmt: skip
    sim.responses[rid] = [ToolCallStarted(call_id, "get_weather"), C.ResponseDelta(rid, arguments[:half]),
                          C.ResponseDelta(rid, arguments[half:]), C.ResponseFinished(finished)]  # fmt: skip


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_created_items_are_turns_and_show_as_items(dialect):
    s, sim, _ = session(dialect)
    added = "conversation.item.created" if dialect == "beta" else "conversation.item.done"
    events = send(s, sim, create(text_item("hi"), event_id="e1"), dialect)
    first = [e for e in events if e["type"] == added][0]
    assert first["item"]["content"] == [{"type": "input_text", "text": "hi"}] and first["previous_item_id"] is None
    pcm = vowel(500, RATE_HZ).astype("<i2").tobytes()
    audio = {"type": "message", "role": "user", "id": "mine",
             "content": [{"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}  # fmt: skip
    events = send(s, sim, create(audio, previous_item_id=first["item"]["id"]), dialect)
    item = [e for e in events if e["type"] == added][0]
    assert item["item"]["id"] == "mine" and item["previous_item_id"] == first["item"]["id"]
    assert "conversation.item.input_audio_transcription.completed" in types(events)  # its transcript, as for commits
    turns = [c for c in sim.commands if isinstance(c, C.AddTurn)]
    assert [t.utterance.key for t in turns] == [first["item"]["id"], "mine"]
    assert turns[0].utterance.text == "hi" and abs(len(turns[1].utterance.audio) - 8000) <= 16  # 500 ms at 16 kHz
    events = send(s, sim, {"type": "response.create"}, dialect)
    assert types(events)[-2:] == ["response.done", "rate_limits.updated"] and "error" not in types(events)


def test_delete_reaches_the_engine_and_forgets_the_item():
    s, sim, _ = session()
    user_id = send(s, sim, create(text_item("hi")))[0]["item"]["id"]
    answer = send(s, sim, {"type": "response.create"})[-2]["response"]["output"][0]
    for item_id in (user_id, answer["id"]):
        events = send(s, sim, {"type": "conversation.item.delete", "item_id": item_id})
        assert events == [{"type": "conversation.item.deleted", "event_id": events[0]["event_id"], "item_id": item_id}]
        retrieved = send(s, sim, {"type": "conversation.item.retrieve", "item_id": item_id, "event_id": "r"})
        assert retrieved[0]["error"]["code"] == "item_not_found"
    rid = [c for c in sim.commands if isinstance(c, C.StartResponse)][0].response_id
    deletes = [c for c in sim.commands if isinstance(c, C.DeleteItem)]
    assert deletes == [C.DeleteItem(key=user_id), C.DeleteItem(response_id=rid)]


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_an_answer_that_is_a_call_then_its_output_is_answered(dialect):
    s, sim, log = session(dialect, tools=True)
    updated = log[-1]["session"]
    assert updated["tools"][0]["name"] == "get_weather" and updated["tool_choice"] == "auto"
    send(s, sim, create(text_item("Weather in Paris?")), dialect)
    events = sim.run(s.receive_event({"type": "response.create"}, 0.1))
    assert types(events) == ["response.created"]  # with tools the item opens once the engine says what it is
    start = [c for c in sim.commands if isinstance(c, C.StartResponse)][-1]
    assert start.options.tools[0].name == "get_weather" and start.options.tool_choice.mode == "auto"
    call_answer(sim, start.response_id, "call_1", '{"city": "Paris"}')
    while (out := sim.step()) is not None:
        events += sim.run(s.engine_output(out, 0.2))
    for e in events:
        strict(e, dialect)
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    call = events[-2]["response"]["output"][0]
    assert call["type"] == "function_call" and call["call_id"] == "call_1" and call["arguments"] == '{"city": "Paris"}'
    assert "".join(e["delta"] for e in events[2:4]) == call["arguments"]
    out = {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "sunny"}'}
    events = send(s, sim, create(out), dialect)
    assert events[0]["item"]["type"] == "function_call_output" and "error" not in types(events)
    turn = [c for c in sim.commands if isinstance(c, C.AddTurn)][-1].utterance
    assert turn.output is not None and (turn.output.name, turn.output.output) == ("get_weather", '{"sky": "sunny"}')
    retrieved = send(s, sim, {"type": "conversation.item.retrieve", "item_id": call["id"]}, dialect)
    assert retrieved[0]["item"] == call
    events = send(s, sim, {"type": "response.create"}, dialect)  # a text answer: its message opens with the text
    assert types(events)[:4] == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta" if dialect == "ga" else "response.text.delta",
    ]


def test_tool_choice_none_sends_no_tools_and_a_named_choice_must_exist():
    s, sim, _ = session(tools=True)
    bad = send(s, sim, {"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "x"}}})
    assert bad[0]["error"]["param"] == "session.tool_choice" and "get_weather" in bad[0]["error"]["message"]
    ok = send(
        s, sim, {"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "get_weather"}}}
    )
    assert ok[0]["session"]["tool_choice"] == {"type": "function", "name": "get_weather"}
    send(s, sim, {"type": "session.update", "session": {"tool_choice": "none"}})
    send(s, sim, create(text_item("hi")))
    events = send(s, sim, {"type": "response.create"})
    assert types(events)[1] == "response.output_item.added"  # no tools: the message opens at once
    assert [c for c in sim.commands if isinstance(c, C.StartResponse)][-1].options.tools == ()


BAD_ITEMS = [
    (create({"type": "funky"}), "invalid_event", "item.type"),
    (create({"type": "function_call_output", "output": "x"}), "invalid_event", "item.call_id"),
    (create({"type": "function_call_output", "call_id": "c", "output": 5}), "invalid_event", "item.output"),
    (create({"type": "function_call_output", "call_id": "nope", "output": "x"}), "unknown_call_id", "item.call_id"),
    (create({"type": "function_call", "name": "f", "arguments": "{}"}), "invalid_event", "item.type"),
    (create({"type": "message", "role": "assistant", "content": []}), "unsupported_event", "item.role"),
    (create({"type": "message", "role": "user", "content": []}), "invalid_event", "item.content"),
    (create({"type": "message", "role": "user", "content": [{"type": "input_image"}]}), "invalid_event",
     "item.content[0]"),
    (create({"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAA"}]}),
     "invalid_audio", "audio"),
    (create(text_item("x"), previous_item_id="item_nope"), "item_not_found", "item_id"),
    (create(text_item("x", id="taken")), "invalid_event", "item.id"),
    (create(text_item("x"), previous_item_id="first"), "invalid_event", "previous_item_id"),
    (create(text_item("x"), previous_item_id="root"), "invalid_event", "previous_item_id"),
    ({"type": "conversation.item.delete", "item_id": "item_nope"}, "item_not_found", "item_id"),
    ({"type": "conversation.item.delete"}, "invalid_event", "item_id"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "code", "param"), BAD_ITEMS)
def test_a_bad_item_gets_one_error_naming_what_was_expected(event, code, param):
    s, sim, _ = session()
    send(s, sim, create(text_item("one", id="first")))
    send(s, sim, create(text_item("two", id="taken")))
    before = list(sim.commands)
    events = send(s, sim, {**event, "event_id": "bad"})
    assert types(events) == ["error"], events
    err = events[0]["error"]
    assert (err["code"], err["param"], err["event_id"]) == (code, param, "bad")
    assert sim.commands == before  # nothing reached the engine
    assert "error" not in types(send(s, sim, create(text_item("still here"))))


def test_deleting_the_answer_being_generated_is_refused():
    s, sim, _ = session()
    send(s, sim, create(text_item("hi")))
    events = sim.run(s.receive_event({"type": "response.create"}, 0.1))
    item_id = events[1]["item"]["id"]
    err = sim.run(s.receive_event({"type": "conversation.item.delete", "item_id": item_id}, 0.1))
    assert err[0]["error"]["code"] == "item_in_progress"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
ITEMS = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call_output", "function_call", "x"])},
    optional={"role": st.sampled_from(["user", "assistant", 3]), "content": JSON, "call_id": JSON, "output": JSON,
              "id": JSON},
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=ITEMS | JSON, previous=st.none() | JSON)
def test_random_items_never_raise_and_answer_with_an_item_or_one_error(item, previous):
    s, sim, _ = session(tools=True)
    event = create(item) if previous is None else create(item, previous_item_id=previous)
    events = send(s, sim, json.loads(json.dumps(event)))
    assert types(events)[:1] in (["error"], ["conversation.item.added"]), events
    if events[0]["type"] == "error":
        assert len(events) == 1 and events[0]["error"]["message"]


def test_a_created_item_follows_the_newest_item_and_may_name_it():
    s, sim, _ = session()
    send(s, sim, create(text_item("hi", id="u1")))
    answer_id = send(s, sim, {"type": "response.create"})[-2]["response"]["output"][0]["id"]
    events = send(s, sim, create(text_item("again", id="u2"), previous_item_id=answer_id))
    assert events[0]["previous_item_id"] == answer_id and events[0]["item"]["id"] == "u2"
    refused = send(s, sim, create(text_item("late"), previous_item_id="u1"))
    assert refused[0]["error"]["param"] == "previous_item_id" and "u2" in refused[0]["error"]["message"]
