"""The `openai` backend without vLLM: its chat requests (history budget, audio parts, sampling) and every way a model
server can fail (down, silent, HTTP errors, non-streams, garbage, dropped mid-answer) through the real server.

The servers here are real HTTP servers on loopback ports that misbehave in one scripted way each: no real model
server fails on demand. Each failure must reach the client as an `error` event with its stable code and a failed
`response.done`, with nothing left hanging, and the session must keep serving. Answers from a real vLLM server are
tested in test_vllm_backend.py and test_vllm_audio.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import wave

import numpy as np
import pytest
import websockets

from assistant.backends.base import Exchange, PreparedTurn, SamplingParams
from assistant.backends.openai_chat import AUDIO_TOKENS_PER_S, OpenAIBackend, sampling_fields, wav_base64
from assistant.backends.upstream import UPSTREAM_CODES, Timeouts, UpstreamPool
from assistant.models.tokenizer import QwenTokenizer
from assistant.realtime.protocol import ERROR_CODES
from assistant.transport.server import running_server
from tests.server_util import make_cfg, recv_event, recv_until, send_json

MODEL = "test-model"


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.for_qwen_audio()


def backend_for(urls: list[str], tokenizer, read_timeout_s: float = 30.0, audio_input: str = "transcript"):
    pool = UpstreamPool(urls, MODEL, "secret", Timeouts(2.0, read_timeout_s, 60.0, 0.5))
    pool.start()
    return OpenAIBackend(pool, tokenizer, None, "You are terse.", audio_input)


# ---- chat requests ------------------------------------------------------------------------------------------------
def test_requests_keep_the_newest_history_that_fits(tokenizer):
    pool = UpstreamPool(["http://127.0.0.1:9/v1"], MODEL, "", Timeouts(1, 1, 1, 1))  # never started: no I/O here
    backend = OpenAIBackend(pool, tokenizer, None, "You are terse.")
    history = [Exchange(PreparedTurn(f"k{i}", f"question {i} " * 20), f"answer {i} " * 20) for i in range(6)]
    turn = PreparedTurn("k6", "the last question")
    params = SamplingParams(greedy=True)
    full = backend.chat_request("", history, turn, 100_000, params, 32)
    assert full.history_kept == 6
    msgs = full.body["messages"]
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 6 + ["user"]
    assert msgs[0]["content"] == "You are terse." and msgs[-1] == {"role": "user", "content": "the last question"}
    assert msgs[1]["content"] == history[0].user.user_text and msgs[2]["content"] == history[0].reply.strip()
    # a window that holds about half: the newest exchanges stay, in order, and the count is what was sent
    half = backend.chat_request("Be brief.", history, turn, full.input_tokens // 2, params, 32)
    assert 0 < half.history_kept < 6 and half.input_tokens <= full.input_tokens // 2
    kept = half.body["messages"][1:-1]
    assert kept == msgs[1 + 2 * (6 - half.history_kept) : -1] and half.body["messages"][0]["content"] == "Be brief."
    # nothing fits but the system text and the turn
    bare = backend.chat_request("", history, turn, 10, params, 32)
    assert bare.history_kept == 0 and len(bare.body["messages"]) == 2


def test_spoken_turns_go_as_exact_wav_parts_and_count_by_duration(tokenizer):
    pool = UpstreamPool(["http://127.0.0.1:9/v1"], MODEL, "", Timeouts(1, 1, 1, 1))
    backend = OpenAIBackend(pool, tokenizer, None, "sys", audio_input="audio")
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, 16000 * 2, dtype=np.int16)
    from assistant.backends.base import Utterance

    [turn] = backend.prepare([Utterance("k1", audio=pcm.astype(np.float32) / 32768.0, text="Who speaks?")], [1])
    request = backend.chat_request("", [], turn, 10_000, SamplingParams(greedy=True), 8)
    parts = request.body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["input_audio", "text"] and parts[1]["text"] == "Who speaks?"
    assert parts[0]["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(parts[0]["input_audio"]["data"]))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), pcm)  # bit exact
    text_only = backend.chat_request("", [], PreparedTurn("k2", "Who speaks?"), 10_000, SamplingParams(), 8)
    assert request.input_tokens - text_only.input_tokens >= 2 * AUDIO_TOKENS_PER_S
    assert wav_base64(np.zeros(0, np.float32))  # an empty clip is still a valid WAV file
    # an audio-only turn in the history stays a user message (it has no text, but it is not a deleted turn)
    [spoken] = backend.prepare([Utterance("k0", audio=pcm.astype(np.float32) / 32768.0)], [1])
    later = backend.chat_request("", [Exchange(spoken, "Someone.")], turn, 10_000, SamplingParams(), 8)
    roles = [m["role"] for m in later.body["messages"]]
    assert roles == ["system", "user", "assistant", "user"] and later.history_kept == 1
    assert later.body["messages"][1]["content"][0]["type"] == "input_audio"


def test_tool_calls_and_results_go_as_tool_messages_and_deleted_items_are_left_out(tokenizer):
    from assistant.backends.tools import ToolCall, ToolChoice, ToolOutput, ToolSpec

    pool = UpstreamPool(["http://127.0.0.1:9/v1"], MODEL, "", Timeouts(1, 1, 1, 1))
    backend = OpenAIBackend(pool, tokenizer, None, "sys")
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    history = [
        Exchange(PreparedTurn("k0", ""), "an answer whose question was deleted"),
        Exchange(PreparedTurn("k1", "Weather in Oslo?"), "", "resp_1", (call,)),
    ]
    turn = PreparedTurn("k2", "", outputs=(ToolOutput("call_1", "get_weather", '{"sky": "grey"}'),))
    spec = ToolSpec.of("get_weather", "Get the weather", {"type": "object", "properties": {}})
    choice = ToolChoice("function", "get_weather")
    request = backend.chat_request("", history, turn, 10_000, SamplingParams(greedy=True), 8, (spec,), choice)
    msgs = request.body["messages"]
    assert [m["role"] for m in msgs] == ["system", "assistant", "user", "assistant", "tool"]
    assert msgs[3]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "grey"}'}
    assert request.body["tools"] == [{"type": "function", "function": {"name": "get_weather",
        "description": "Get the weather", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    assert request.body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    plain = backend.chat_request("", [], PreparedTurn("k3", "hi"), 10_000, SamplingParams(greedy=True), 8)
    assert "tools" not in plain.body and "tool_choice" not in plain.body


def test_streamed_tool_call_pieces_are_read_and_malformed_ones_refused():
    from assistant.backends.upstream import UpstreamFailure, _parse_chunk

    first = {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                    "function": {"name": "f", "arguments": ""}}]}}]}  # fmt: skip
    more = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
                         "finish_reason": "tool_calls"}]}  # fmt: skip
    assert _parse_chunk(first, "u")[3] == [("c1", "f", "")]
    assert _parse_chunk(more, "u")[1:] == ("tool_calls", None, [(None, None, '{"a": 1}')])
    second = {"choices": [{"delta": {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g"}}]}}]}
    assert _parse_chunk(second, "u")[3] == []  # parallel calls beyond the first are not used
    for bad in ({"tool_calls": 5}, {"tool_calls": [{"index": 0}]}, {"tool_calls": [{"function": {"arguments": 3}}]}):
        with pytest.raises(UpstreamFailure):
            _parse_chunk({"choices": [{"delta": bad}]}, "u")


def test_sampling_fields():
    greedy = sampling_fields(SamplingParams(greedy=True, seed=7), 16, extensions=True)
    assert greedy == {"max_tokens": 16, "temperature": 0.0, "repetition_penalty": 1.0, "seed": 7}
    sampled = sampling_fields(SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05), 9, True)
    assert sampled == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    plain = sampling_fields(SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05), 9, False)
    assert plain == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.8}


# ---- misbehaving servers --------------------------------------------------------------------------------------------
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj) -> bytes:
    return chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")


def text_chunk(text: str, finish: str | None = None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


class MisbehavingServer:
    """Serves `GET /v1/models` (listing MODEL) properly and answers every chat request in one bad `mode`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.chat_requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> MisbehavingServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")), 0)
                await reader.readexactly(length)
                if lines[0].startswith("GET /v1/models"):
                    body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                    writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                self.chat_requests += 1
                if not await self._chat(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def _chat(self, writer: asyncio.StreamWriter) -> bool:
        """Answer one chat request in `mode`; False when the connection is done with."""
        m = self.mode
        if m == "silent":
            await asyncio.sleep(3600)
        if m in ("http_500", "http_503"):
            body = b'{"error": {"message": "model exploded"}}'
            status = b"500 Internal Server Error" if m == "http_500" else b"503 Service Unavailable"
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
            )
            writer.write(body)
        elif m == "html":
            body = b"<html>It works!</html>"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            writer.write(SSE_HEAD)
            if m == "not_json":
                writer.write(sse(b"<<not json>>"))
            elif m == "error_event":
                writer.write(sse({"error": {"message": "out of KV cache", "type": "InternalServerError"}}))
            elif m == "no_finish":
                writer.write(sse(text_chunk("Hello")) + sse(b"[DONE]"))
            elif m == "drop_mid":
                writer.write(sse(text_chunk("The capital")) + sse(text_chunk(" of France")))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.transport.abort()  # the server dies mid-answer
                return False
            writer.write(chunk(b""))
        await writer.drain()
        return True


async def ask(ws, text: str) -> list[dict]:
    """A typed turn and a response; every event up to and including response.done."""
    await send_json(
        ws,
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        },
    )
    await send_json(ws, {"type": "response.create"})
    log: list[dict] = []
    await recv_until(ws, "response.done", log)
    return log


def failure_of(log: list[dict]) -> tuple[str, str]:
    errors = [e["error"] for e in log if e["type"] == "error"]
    assert len(errors) == 1, errors
    done = log[-1]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == errors[0]["code"]
    return errors[0]["code"], errors[0]["message"]


CASES = {  # mode(s) of the servers in openai.base_urls -> the code the client gets, words its message has
    ("down",): ("upstream_unavailable", "connect failed"),
    ("silent",): ("upstream_timeout", "read_timeout_s"),
    ("http_500",): ("upstream_error", "model exploded"),
    ("html",): ("upstream_error", "event stream"),
    ("not_json",): ("upstream_error", "not JSON"),
    ("error_event",): ("upstream_error", "out of KV cache"),
    ("no_finish",): ("upstream_error", "finish_reason"),
    ("drop_mid",): ("upstream_unavailable", "mid-answer"),
    # before any text, a refused connect or a 503 moves on to the next server; its failure is what the client hears
    ("down", "silent"): ("upstream_timeout", "read_timeout_s"),
    ("http_503", "drop_mid"): ("upstream_unavailable", "mid-answer"),
    ("down", "down"): ("upstream_unavailable", "no server answered"),
}


@pytest.mark.parametrize("modes", list(CASES), ids=["+".join(m) for m in CASES])
async def test_a_failing_model_server_is_an_error_event_and_the_session_goes_on(modes, tokenizer):
    assert {code for code, _ in CASES.values()} == set(UPSTREAM_CODES) <= set(ERROR_CODES)
    servers = [await MisbehavingServer(m).start() for m in modes]
    for s, m in zip(servers, modes, strict=True):
        if m == "down":
            await s.stop()  # the port is closed: connects are refused
    backend = backend_for([s.url for s in servers], tokenizer, read_timeout_s=0.5)
    code, words = CASES[modes]
    try:
        async with running_server(make_cfg(), backend=backend) as srv:
            async with websockets.connect(srv.ws_url) as ws:
                assert (await recv_event(ws))["type"] == "session.created"
                first = await ask(ws, "What is the capital of France?")
                got_code, message = failure_of(first)
                assert (got_code, words in message) == (code, True), message
                if modes[-1] == "drop_mid":  # what was streamed before the drop reached the client
                    deltas = "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta")
                    assert deltas == "The capital of France"
                # the session goes on: it still takes settings, and the next turn fails the same bounded way
                await send_json(ws, {"type": "session.update", "session": {"instructions": "Be brief."}})
                await recv_until(ws, "session.updated")
                assert failure_of(await ask(ws, "And of Japan?"))[0] == code
            tried = [s.chat_requests for s in servers]
            assert all(n >= 1 for n, m in zip(tried, modes, strict=True) if m != "down"), tried
    finally:
        for s in servers:
            await s.stop()


# ---- configuration and commands ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({}, "needs at least one server URL"),
        ({"openai.base_urls": ["http://127.0.0.1:8000/v1"]}, "the model name"),
        ({"openai.base_urls": ["127.0.0.1:8000"], "openai.model": "m"}, "expected http(s)://HOST"),
        ({"openai.base_urls": ["http://a/v1", "http://a/v1"], "openai.model": "m"}, "each server once"),
        ({"openai.base_urls": ["http://a/v1"], "openai.model": "m", "openai.audio_input": "mel"}, "transcript"),
    ],
)
def test_openai_config_is_checked_at_start(overrides, words):
    from assistant.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(overrides={"model.backend": "openai", **overrides})


def test_ask_and_export_refuse_clearly(tmp_path, capsys):
    from assistant.cli import main

    conf = tmp_path / "openai.toml"
    conf.write_text('[model]\nbackend = "openai"\n[openai]\nbase_urls = ["http://127.0.0.1:9/v1"]\nmodel = "m"\n')
    assert main(["ask", "--config", str(conf), "--text", "hi"]) == 2
    assert "use serve" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export-hf", str(tmp_path / "out")]) == 1
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
