"""Tools and conversation items through the real server with the official `openai` SDK (GA and beta), every event
validated strictly against the SDK's models: a request makes a `function_call` item, the client's
`function_call_output` + `response.create` makes an answer that uses the result; created and deleted items reach
(or leave) the engine's next prompt. The model-quality parts use the embedded model (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI

from assistant.transport.server import running_server
from tests.server_util import b64, make_cfg, wav_pcm16, worker_conversation
from tests.test_openai_sdk import events_until

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIMER = {
    "type": "function",
    "name": "set_timer",
    "description": "Set a timer for a number of minutes",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "number"}}, "required": ["minutes"]},
}
LIGHT = {
    "type": "function",
    "name": "turn_on_light",
    "description": "Turn on the light in a room",
    "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]},
}
TOOLS = [WEATHER, TIMER, LIGHT]


def client(srv) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="unused", websocket_base_url=srv.ws_url.removesuffix("/realtime"))


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def spoken(text: str, tmp_path) -> np.ndarray:
    """`text` said by espeak-ng, 16 kHz int16."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: install Debian's espeak-ng (make system-deps)")
    path = tmp_path / "request.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True, timeout=60)
    return wav_pcm16(path)


def the_call(done: dict) -> dict:
    [item] = done["response"]["output"]
    assert item["type"] == "function_call" and item["status"] == "completed", item
    return item


@pytest.mark.slow
async def test_ga_spoken_request_calls_a_tool_and_the_answer_uses_its_result(embedded_backend, tmp_path):
    pcm24k = soxr.resample(spoken("What is the weather in Paris?", tmp_path), 16000, 24000)
    cfg = make_cfg(**{"generation.max_new_tokens": 48})
    async with running_server(cfg, backend=embedded_backend) as srv:
        log: list = []
        async with client(srv).realtime.connect(model="local") as conn:
            await events_until(conn, "ga", "session.created", log)
            session = {"type": "realtime", "output_modalities": ["text"], "tools": TOOLS, "tool_choice": "auto",
                       "audio": {"input": {"turn_detection": None}}}  # fmt: skip
            await conn.session.update(session=session)
            updated = await events_until(conn, "ga", "session.updated", log)
            assert [t["name"] for t in updated["session"]["tools"]] == ["get_weather", "set_timer", "turn_on_light"]
            await conn.input_audio_buffer.append(audio=b64(pcm24k))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            call = the_call(await events_until(conn, "ga", "response.done", log))
            assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"].lower() == "paris"
            deltas = [e["delta"] for e in log if e["type"] == "response.function_call_arguments.delta"]
            [args_done] = [e for e in log if e["type"] == "response.function_call_arguments.done"]
            assert json.loads("".join(deltas)) == json.loads(args_done["arguments"]) == json.loads(call["arguments"])
            assert args_done["call_id"] == call["call_id"] and args_done["name"] == "get_weather"
            result = {"type": "function_call_output", "call_id": call["call_id"],
                      "output": json.dumps({"temperature_c": 31, "sky": "sunny"})}  # fmt: skip
            await conn.conversation.item.create(item=result)
            added = await events_until(conn, "ga", "conversation.item.done", log)
            assert added["item"]["type"] == "function_call_output"
            await conn.response.create()
            done = await events_until(conn, "ga", "response.done", log)
        assert "error" not in [e["type"] for e in log]
        answer = done["response"]["output"][0]
        assert answer["type"] == "message", answer
        text = answer["content"][0]["text"].lower()
        assert "31" in text or "sunny" in text, text


@pytest.mark.slow
async def test_beta_typed_requests_call_the_right_tool_or_none(embedded_backend):
    """Beta: a light request calls turn_on_light with the room; a question that needs no tool gets words."""
    cfg = make_cfg(**{"generation.max_new_tokens": 32})
    async with running_server(cfg, backend=embedded_backend) as srv:
        log: list = []
        async with client(srv).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
            await events_until(conn, "beta", "session.created", log)
            await conn.session.update(session={"modalities": ["text"], "tools": TOOLS, "turn_detection": None})
            await events_until(conn, "beta", "session.updated", log)
            await conn.conversation.item.create(item=user_text("Turn on the light in the kitchen."))
            await conn.response.create()
            call = the_call(await events_until(conn, "beta", "response.done", log))
            assert call["name"] == "turn_on_light" and "kitchen" in json.loads(call["arguments"])["room"].lower()
            await conn.conversation.item.create(item=user_text("What is the capital of France?"))
            await conn.response.create()
            done = await events_until(conn, "beta", "response.done", log)
        assert "error" not in [e["type"] for e in log]
        assert done["response"]["output"][0]["type"] == "message"
        assert "paris" in done["response"]["output"][0]["content"][0]["text"].lower()


async def test_created_and_deleted_items_reach_and_leave_the_next_prompt(server_tiny_backend):
    """Typed items enter the engine's history; deleting a user item and an answer takes them out of it, and the
    next answer's prompt (what the cache holds) lacks them while the kept ones stay."""
    async with running_server(make_cfg(), backend=server_tiny_backend) as srv:
        log: list = []
        async with client(srv).realtime.connect(model="local") as conn:
            created = await events_until(conn, "ga", "session.created", log)
            sid = created["session"]["id"]
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await events_until(conn, "ga", "session.updated", log)
            ids = {}
            for word in ("alpha", "bravo"):
                await conn.conversation.item.create(item=user_text(f"remember {word} please"))
                ids[word] = (await events_until(conn, "ga", "conversation.item.done", log))["item"]["id"]
                await conn.response.create()
                ids[word + "_answer"] = (await events_until(conn, "ga", "response.done", log))["response"]["output"][0]
            conv = await worker_conversation(srv.engine, sid)
            assert [ex.user.user_text for ex in conv.history] == ["remember alpha please", "remember bravo please"]
            await conn.conversation.item.delete(item_id=ids["alpha"])
            await events_until(conn, "ga", "conversation.item.deleted", log)
            await conn.conversation.item.delete(item_id=ids["alpha_answer"]["id"])
            await events_until(conn, "ga", "conversation.item.deleted", log)
            conv = await worker_conversation(srv.engine, sid)
            assert [ex.user.user_text for ex in conv.history] == ["remember bravo please"]
            await conn.conversation.item.create(item=user_text("and charlie"))
            await conn.response.create()
            await events_until(conn, "ga", "response.done", log)
            conv = await worker_conversation(srv.engine, sid)
            cache_ids = conv.cache.token_ids[: conv.cache.length]
            prompt = await srv.engine.call(lambda b: b.tokenizer.decode(cache_ids))
    assert "error" not in [e["type"] for e in log]
    assert "alpha" not in prompt and "remember bravo please" in prompt and "and charlie" in prompt
    assert ids["bravo_answer"]["content"][0]["text"].strip() in prompt


async def test_a_call_whose_arguments_are_not_json_fails_and_the_session_goes_on(server_tiny_backend):
    """`tool_choice: required` on the tiny random model: the call's arguments are not a JSON object, so the answer
    ends failed with the call item incomplete and an error saying why; the next answer works."""
    async with running_server(make_cfg(), backend=server_tiny_backend) as srv:
        log: list = []
        async with client(srv).realtime.connect(model="local") as conn:
            await events_until(conn, "ga", "session.created", log)
            session = {"type": "realtime", "tools": [WEATHER], "tool_choice": "required",
                       "audio": {"input": {"turn_detection": None}}}  # fmt: skip
            await conn.session.update(session=session)
            await events_until(conn, "ga", "session.updated", log)
            await conn.conversation.item.create(item=user_text("weather in Oslo?"))
            await conn.response.create()
            done = await events_until(conn, "ga", "response.done", log)
            assert done["response"]["status"] == "failed"
            [item] = done["response"]["output"]
            assert item["type"] == "function_call" and item["status"] == "incomplete" and item["name"] == "get_weather"
            [err] = [e for e in log if e["type"] == "error"]
            assert "no JSON object as the arguments of get_weather" in err["error"]["message"]
            await conn.session.update(session={"type": "realtime", "tool_choice": "none"})
            await events_until(conn, "ga", "session.updated", log)
            await conn.conversation.item.create(item=user_text("hello"))
            await conn.response.create()
            done = await events_until(conn, "ga", "response.done", log)
            assert done["response"]["status"] != "failed" and done["response"]["output"][0]["type"] == "message"
