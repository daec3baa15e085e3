"""The official `openai` Node SDK (`OpenAIRealtimeWS`, which always connects with wss://) holds a conversation with the
embedded model over TLS, trusting the `tls-cert` certificate through NODE_EXTRA_CA_CERTS: a typed turn and a spoken
(espeak-ng) turn, each answered with the expected word, and no `error` event. tests/node/realtime_conversation.cjs is
the client (README shows it); its npm packages come from tests/node_env.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from assistant.transport.server import running_server
from tests.conftest import CLIENT_TIMEOUT_S
from tests.node_env import NODE_DIR, npm_packages, run_node
from tests.server_util import make_cfg

TOKEN = "node-token"
SCRIPT = NODE_DIR / "realtime_conversation.cjs"
TYPED_QUESTION = "What is the capital of Japan?"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("node_tls")
    cmd = [sys.executable, "-m", "assistant", "tls-cert", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=CLIENT_TIMEOUT_S)
    return out / "cert.pem", out / "key.pem"


@pytest.fixture(scope="module")
def question_pcm24k(question_wav, tmp_path_factory):
    """The espeak-ng question as raw PCM16 mono 24 kHz (the GA default input format), converted by sox."""
    out = tmp_path_factory.mktemp("node_speech") / "question.raw"
    cmd = ["sox", str(question_wav), "-r", "24000", "-c", "1", "-b", "16", "-e", "signed-integer", str(out)]
    subprocess.run(cmd, check=True, timeout=CLIENT_TIMEOUT_S)
    return out


def test_readme_shows_the_script_that_runs():
    readme = (NODE_DIR.parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```js\n{SCRIPT.read_text(encoding='utf-8')}```" in readme


@pytest.mark.slow  # real weights, node and npm packages
async def test_node_sdk_conversation_over_tls(embedded_backend, tls_files, question_pcm24k):
    npm_packages()  # installed (or found in the cache) before the server starts
    cert, key = tls_files
    cfg = make_cfg(
        **{"server.tls_cert": str(cert), "server.tls_key": str(key), "server.token": TOKEN},
        **{"generation.max_new_tokens": 48},
    )
    async with running_server(cfg, backend=embedded_backend) as srv:
        base_url = srv.http_url + "/v1"  # https://127.0.0.1:PORT/v1; the SDK makes it wss://.../v1/realtime
        args = [base_url, TOKEN, str(question_pcm24k), TYPED_QUESTION]
        untrusted = await asyncio.to_thread(run_node, SCRIPT, args, {}, 3 * CLIENT_TIMEOUT_S)
        r = await asyncio.to_thread(run_node, SCRIPT, args, {"NODE_EXTRA_CA_CERTS": str(cert)}, 3 * CLIENT_TIMEOUT_S)
    assert untrusted.returncode == 1 and "self-signed certificate" in untrusted.stderr, untrusted.stderr
    assert r.returncode == 0, r.stderr
    typed, spoken, summary = (json.loads(line) for line in r.stdout.splitlines())
    assert summary["errors"] == [] and "error" not in summary["types"], summary
    assert typed["turn"] == "text" and typed["status"] == "completed" and "tokyo" in typed["text"].lower(), typed
    assert spoken["turn"] == "audio" and "france" in spoken["transcript"].lower(), spoken
    assert spoken["status"] == "completed" and "paris" in spoken["text"].lower(), spoken
    assert summary["types"][:2] == ["session.created", "session.updated"]
    assert summary["types"].count("response.done") == 2
