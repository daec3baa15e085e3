"""Desktop client (`python -m clients.desktop`) against a real server on a loopback port (tiny random model).

`--wav` mode with server VAD and with push-to-talk, the token, reconnecting with backoff to a server that starts
late, and the plain-words error when no microphone exists.
"""

from __future__ import annotations

import asyncio
import os
import sys
import wave
from pathlib import Path

import pytest

from assistant.transport.server import running_server
from tests.conftest import CLIENT_TIMEOUT_S, free_loopback_port
from tests.server_util import tiny_qwen_cfg

REPO = Path(__file__).resolve().parent.parent


def _cfg(tiny_qwen_dir, port: int = 0, token: str = ""):
    return tiny_qwen_cfg(tiny_qwen_dir, **{"server.port": port, "server.token": token})


async def run_desktop(*args: str) -> tuple[int, str, str]:
    """`python -m clients.desktop ARGS` as a real process; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.desktop",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"desktop client did not finish in {CLIENT_TIMEOUT_S} s: {out.decode()} {err.decode()}")
    return proc.returncode, out.decode(), err.decode()


async def test_wav_mode_with_server_vad_prints_states_and_the_answer(tiny_qwen_dir, server_tiny_backend, question_wav):
    cfg = _cfg(tiny_qwen_dir, token="s3cret")
    async with running_server(cfg, backend=server_tiny_backend) as server:
        rc, out, err = await run_desktop("--url", server.ws_url, "--token", "s3cret", "--wav", str(question_wav))
    assert rc == 0, err
    lines = out.splitlines()
    # State lines in protocol order: connected, speech heard, end of speech, the answer, back to listening.
    states = [ln for ln in lines if ln in ("[listening]", "[speech]", "[thinking]")]
    assert states[:3] == ["[listening]", "[speech]", "[thinking]"] and states[-1] == "[listening]"
    assert any(ln.startswith("[") and ("server" in ln or "incomplete" in ln) for ln in lines), out


async def test_wav_mode_push_to_talk_commits_and_asks(tiny_qwen_dir, server_tiny_backend, question_wav):
    async with running_server(_cfg(tiny_qwen_dir), backend=server_tiny_backend) as server:
        rc, out, err = await run_desktop("--url", server.ws_url, "--wav", str(question_wav), "--push-to-talk")
    assert rc == 0, err
    assert "[speech]" not in out  # no server VAD in push-to-talk
    assert "[thinking]" in out and out.rstrip().endswith("[listening]")


async def test_wrong_token_is_reported_after_the_retries(tiny_qwen_dir, server_tiny_backend, question_wav):
    async with running_server(_cfg(tiny_qwen_dir, token="right"), backend=server_tiny_backend) as server:
        rc, _, err = await run_desktop(
            "--url", server.ws_url, "--token", "wrong", "--wav", str(question_wav), "--max-retries", "1"
        )
    assert rc == 1
    assert "retrying" in err and "cannot reach the server" in err


async def test_reconnects_with_backoff_until_the_server_is_up(tiny_qwen_dir, server_tiny_backend, question_wav):
    port = free_loopback_port()
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    args = ["--url", url, "--wav", str(question_wav), "--speed", "4", "--quiet"]
    args += ["--reconnect-initial-s", "0.2", "--reconnect-max-s", "0.5"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.desktop", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    first = b""
    while b"server unavailable" not in first:  # nothing listens yet: it backs off (a note on the speaker may precede)
        first = await asyncio.wait_for(proc.stderr.readline(), CLIENT_TIMEOUT_S)
        assert first, "the client ended before reporting the unreachable server"
    assert "retrying in 0.2 s" in first.decode()
    async with running_server(_cfg(tiny_qwen_dir, port=port), backend=server_tiny_backend):
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    assert "[listening]" not in out.decode()  # --quiet: only transcripts and answers, no state lines


async def test_no_microphone_is_said_plainly():
    try:
        import sounddevice as sd

        sd.query_devices(kind="input")
    except Exception as e:  # OSError (no PortAudio), ImportError, or sounddevice.PortAudioError (no input device)
        print(f"no input device here, as expected: {e}")
    else:
        pytest.skip("this machine has a microphone; the no-device message cannot be provoked")
    rc, out, err = await run_desktop("--url", "ws://127.0.0.1:9/v1/realtime")
    assert rc == 2
    assert "microphone" in err and "--wav" in err


async def test_out_needs_a_voice_and_a_wav_and_says_so(tiny_qwen_dir, server_tiny_backend, question_wav, tmp_path):
    answer = tmp_path / "answer.wav"
    async with running_server(_cfg(tiny_qwen_dir), backend=server_tiny_backend) as server:  # no voice
        rc, _, err = await run_desktop("--url", server.ws_url, "--wav", str(question_wav), "--out", str(answer))
    assert rc == 1 and "the server has no voice" in err and not answer.exists()
    rc, _, err = await run_desktop("--out", str(answer))
    assert rc == 2 and "--out writes the answer to a question from --wav FILE" in err
    rc, _, err = await run_desktop("--wav", str(question_wav), "--duplex")
    assert rc == 2 and "--duplex is for talking over a spoken answer" in err


@pytest.mark.slow
async def test_wav_in_answer_wav_out_says_paris(embedded_backend, speech_pool, question_wav, tmp_path) -> None:
    """`--wav IN --out ANSWER.wav` against the real server and voice: the file holds the spoken answer, and the
    server's own recogniser hears "Paris" in it; the transcript is printed as the answer streams."""
    from tests.test_spoken_answers import spoken_cfg, transcribe

    answer = tmp_path / "answer.wav"
    async with running_server(spoken_cfg(), backend=embedded_backend, speech=speech_pool) as server:
        rc, out, err = await run_desktop("--url", server.ws_url, "--wav", str(question_wav), "--out", str(answer))
        assert rc == 0, err
        with wave.open(str(answer)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            pcm = w.readframes(w.getnframes())
        heard = await transcribe(server, pcm)
    assert len(pcm) > 2 * 24000  # more than a second of speech
    assert "paris" in heard.lower(), heard
    assert "assistant:" in out and "paris" in out.lower(), out
    assert f"written to {answer}" in err
