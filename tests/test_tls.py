"""TLS in one step: `tls-cert` makes a certificate whose printed config serves wss://, and the clients told how to
trust it (Python openai SDK, websockets with SSL_CERT_FILE) connect; `serve --tls-self-signed` makes and reuses one.
The Node SDK over the same certificate is tests/test_node_sdk.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import websockets
from openai import AsyncOpenAI

from assistant.config import load_config
from assistant.transport.server import running_server
from assistant.transport.tls import (
    RENEW_BEFORE_DAYS,
    TlsError,
    ensure_self_signed,
    make_self_signed,
    read_cert,
    server_context,
)
from tests.server_util import TIMEOUT_S, recv_event

TOKEN = "tls-token"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "assistant", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def printed_server_section(stdout: str) -> dict:
    """The `[server]` lines `tls-cert` prints, parsed as the TOML a user pastes into the config file."""
    block = stdout.split("[server]\n", 1)[1].split("\nor pass the flags", 1)[0]
    return tomllib.loads("[server]\n" + "\n".join(line.strip() for line in block.splitlines()))["server"]


@pytest.fixture(scope="module")
def made_cert(tmp_path_factory):
    out = tmp_path_factory.mktemp("tls")
    r = cli("tls-cert", "--host", "myhost.test", "--host", "192.168.1.20", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_the_certificate_names_the_hosts_and_is_a_server_leaf(made_cert):
    out, stdout = made_cert
    info = read_cert(out / "cert.pem")
    assert info.hosts == ["localhost", "127.0.0.1", "::1", "myhost.test", "192.168.1.20"]
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text and "CA:TRUE" not in text
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert not list(out.glob(".new-*"))  # the temporary folder is gone
    section = printed_server_section(stdout)
    assert section["tls_cert"] == str((out / "cert.pem").resolve()) and section["tls_key"].endswith("key.pem")
    assert f"NODE_EXTRA_CA_CERTS={(out / 'cert.pem').resolve()}" in stdout
    assert "SSL_CERT_FILE=" in stdout and "wss://myhost.test:8765/v1/realtime" in stdout


def test_bad_requests_are_refused_with_the_fix(made_cert, tmp_path):
    out, _ = made_cert
    before = (out / "cert.pem").read_bytes()
    r = cli("tls-cert", "--host", "myhost.test", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and (out / "cert.pem").read_bytes() == before
    r = cli("tls-cert", "--host", "0.0.0.0", "--out", str(tmp_path))
    assert r.returncode == 2 and "every interface" in r.stderr
    r = cli("tls-cert", "--host", "https://myhost.test/", "--out", str(tmp_path))
    assert r.returncode == 2 and "expected a host name" in r.stderr
    r = cli("tls-cert", "--days", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--days" in r.stderr
    assert not (tmp_path / "cert.pem").exists()
    (tmp_path / "a-file").write_text("")
    r = cli("tls-cert", "--out", str(tmp_path / "a-file"))
    assert r.returncode == 2 and "cannot write the certificate" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
async def tls_server(made_cert, server_tiny_backend, tmp_path):
    """A server configured with the `[server]` lines `tls-cert` printed (pasted into a config file)."""
    out, stdout = made_cert
    section = printed_server_section(stdout)
    config = tmp_path / "config.toml"
    config.write_text(
        f"[server]\ntls_cert = {json.dumps(section['tls_cert'])}\ntls_key = {json.dumps(section['tls_key'])}\n"
    )
    overrides = {"server.host": "127.0.0.1", "server.port": 0, "server.token": TOKEN, "generation.greedy": True}
    cfg = load_config(config, {**overrides, "generation.max_new_tokens": 6})
    async with running_server(cfg, backend=server_tiny_backend) as srv:
        assert srv.ws_url.startswith("wss://127.0.0.1:")
        yield srv, Path(section["tls_cert"])


async def test_python_openai_sdk_over_wss(tls_server):
    srv, cert = tls_server
    ctx = ssl.create_default_context(cafile=cert)
    client = AsyncOpenAI(api_key=TOKEN, websocket_base_url=srv.ws_url.removesuffix("/realtime"))
    types = []
    async with client.realtime.connect(model="local", websocket_connection_options={"ssl": ctx}) as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
        await conn.conversation.item.create(item=item)
        await conn.response.create()
        async for event in conn:
            types.append(event.type)
            if event.type == "response.done":
                assert event.response.status in ("completed", "incomplete")
                break
    assert types[0] == "session.created" and "response.output_text.delta" in types and "error" not in types


async def test_ssl_cert_file_trusts_it_and_nothing_else_does(tls_server, monkeypatch):
    srv, cert = tls_server
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed"):
        await websockets.connect(srv.ws_url, additional_headers=headers)  # the system CAs do not know it
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by every default context made from now on
    async with websockets.connect(srv.ws_url, additional_headers=headers) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
    ctx = ssl.create_default_context(cafile=cert)
    async with websockets.connect(srv.ws_url, additional_headers=headers, ssl=ctx, server_hostname="myhost.test"):
        pass  # a name the certificate lists
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await websockets.connect(srv.ws_url, additional_headers=headers, ssl=ctx, server_hostname="other.test")


def test_ensure_self_signed_reuses_renews_and_widens(tmp_path):
    files, why = ensure_self_signed("127.0.0.1", tmp_path)
    assert why == "none made yet" and "127.0.0.1" in read_cert(files.cert).hosts
    first = files.cert.read_bytes()
    assert ensure_self_signed("0.0.0.0", tmp_path) == (files, None) and files.cert.read_bytes() == first
    files, why = ensure_self_signed("10.1.2.3", tmp_path)  # a server address the old one lacks: it is added
    assert why == "it does not cover 10.1.2.3" and files.cert.read_bytes() != first
    assert {"10.1.2.3", "127.0.0.1", "localhost"} <= set(read_cert(files.cert).hosts)
    make_self_signed(["extra.test"], tmp_path, days=RENEW_BEFORE_DAYS - 1, force=True)
    files, why = ensure_self_signed("127.0.0.1", tmp_path)
    assert why is not None and why.startswith("it expires in")
    assert "extra.test" in read_cert(files.cert).hosts  # the hosts of the old certificate are kept
    files.key.write_text(files.key.read_text().replace("A", "B", 3))  # a damaged key: made anew
    files, why = ensure_self_signed("127.0.0.1", tmp_path)
    assert why is not None and "server.tls_key" in why
    server_context(files.cert, files.key)


def test_a_missing_certificate_file_is_a_clear_start_error(tmp_path):
    with pytest.raises(TlsError, match="tls-cert --host"):
        server_context(tmp_path / "nope.pem", tmp_path / "nope.key")
    r = cli("serve", "--port", "0", "--tls-cert", str(tmp_path / "a.pem"), "--tls-key", str(tmp_path / "a.key"))
    assert r.returncode == 2 and "server.tls_cert" in r.stderr and "Traceback" not in r.stderr
    r = cli("serve", "--port", "0", "--tls-cert", str(tmp_path / "a.pem"))
    assert r.returncode == 2 and "must be set together" in r.stderr
    r = cli("serve", "--port", "0", "--tls-self-signed", "--tls-cert", "a", "--tls-key", "b")
    assert r.returncode == 2 and "use one" in r.stderr


def test_serve_tls_self_signed_makes_the_certificate_and_serves_https(tiny_qwen_dir, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "assistant", "serve", "--port", "0", "--model", str(tiny_qwen_dir)]
    proc = subprocess.Popen(
        [*cmd, "--tls-self-signed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if line.startswith("Ready: "):
                break
        url = re.search(r"https://127\.0\.0\.1:(\d+)/", printed[-1])
        assert url, "".join(printed)
        cert = tmp_path / "qwen-voice-assistant" / "tls" / "cert.pem"
        assert f"NODE_EXTRA_CA_CERTS={cert}" in "".join(printed)
        conn = http.client.HTTPSConnection(
            "127.0.0.1", int(url.group(1)), timeout=TIMEOUT_S, context=ssl.create_default_context(cafile=cert)
        )
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
