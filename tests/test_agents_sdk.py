"""OpenAI's Agents SDK (`@openai/agents-realtime`, a `RealtimeSession` over `OpenAIRealtimeWebSocket`) holds a spoken
conversation with the embedded model and the server's voice, with the SDK's own default session: semantic VAD ends
each espeak-ng turn, `gpt-4o-mini-transcribe` maps to our recogniser, audio answers, a later `tracing: "auto"`. Every
answer holds the expected word and the server sends no `error` event. With the SDK's `tool()`, a spoken weather
question makes the model call it and the spoken answer uses the tool's result. tests/node/agents_conversation.cjs is the
client; its npm packages come from tests/node_env.py."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from assistant.transport.server import running_server
from tests.conftest import CLIENT_TIMEOUT_S
from tests.node_env import NODE_DIR, npm_packages, run_node
from tests.server_util import make_cfg

SCRIPT = NODE_DIR / "agents_conversation.cjs"


def espeak_pcm24k(text: str, out_dir) -> str:
    """`text` spoken by espeak-ng, as raw PCM16 mono 24 kHz (sox), with a short pause first."""
    wav, raw = out_dir / "q.wav", out_dir / f"q{abs(hash(text))}.raw"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), f"[[_:]] {text}"], check=True, timeout=CLIENT_TIMEOUT_S)
    cmd = ["sox", str(wav), "-r", "24000", "-c", "1", "-b", "16", "-e", "signed-integer", str(raw)]
    subprocess.run(cmd, check=True, timeout=CLIENT_TIMEOUT_S)
    return str(raw)


@pytest.mark.slow  # real weights, the voice, node and npm packages
async def test_agents_sdk_spoken_conversation(embedded_backend, speech_pool, tmp_path):
    npm_packages()  # installed (or found in the cache) before the server starts
    questions = [("What is the capital of France?", "paris"), ("What is the capital of Italy?", "rome")]
    pcms = [espeak_pcm24k(q, tmp_path) for q, _ in questions]
    cfg = make_cfg(**{"voice.name": "joe", "generation.max_new_tokens": 32})
    async with running_server(cfg, backend=embedded_backend, speech=speech_pool) as srv:
        r = await asyncio.to_thread(run_node, SCRIPT, [srv.ws_url, *pcms], {}, 6 * CLIENT_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    *answers, summary = (json.loads(line) for line in r.stdout.splitlines())
    assert summary["errors"] == [] and "error" not in summary["types"], summary
    assert "session.update" in summary["sent"], summary["sent"]
    for (question, word), answer in zip(questions, answers, strict=True):
        assert answer["status"] == "completed" and word in answer["text"].lower(), (question, answer)
        assert answer["audio_ms"] > 500, answer  # spoken
    assert summary["types"].count("session.updated") == summary["sent"].count("session.update")
    assert "rate_limits.updated" in summary["types"]


@pytest.mark.slow  # real weights, the voice, node and npm packages
async def test_agents_sdk_calls_a_tool_and_answers_with_its_result(embedded_backend, speech_pool, tmp_path):
    npm_packages()
    pcm = espeak_pcm24k("What is the weather in Paris?", tmp_path)
    cfg = make_cfg(**{"voice.name": "joe", "generation.max_new_tokens": 40})
    async with running_server(cfg, backend=embedded_backend, speech=speech_pool) as srv:
        env = {"AGENTS_TOOLS": "weather"}
        r = await asyncio.to_thread(run_node, SCRIPT, [srv.ws_url, pcm], env, 6 * CLIENT_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    answer, summary = (json.loads(line) for line in r.stdout.splitlines())
    assert summary["errors"] == [] and "error" not in summary["types"], summary
    assert [c["name"] for c in summary["tool_calls"]] == ["get_weather"], summary
    assert "paris" in summary["tool_calls"][0]["args"]["city"].lower(), summary["tool_calls"]
    assert "conversation.item.create" in summary["sent"], summary["sent"]  # the SDK sent the tool's output
    assert answer["status"] == "completed" and "31" in answer["text"], answer  # the tool's made-up temperature
    assert answer["audio_ms"] > 500, answer
