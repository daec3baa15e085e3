"""The same audio gives the same words through `python -m assistant ask`, the server's push-to-talk and the server's
VAD, whatever silence surrounds it (real embedded weights, espeak-ng clips of bench/asr_set.py, a real server on
port 0). Push-to-talk hands the recogniser the whole buffer, the VAD its pre-roll to its hangover, `ask` the file:
three different cuts of the silence, one transcript."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import websockets

from assistant.transport.server import running_server
from bench.asr_set import VOICES, clips
from bench.spoken_set import write_wav
from tests.server_util import b64, chunks, make_cfg, recv_event, recv_until, send_json

pytestmark = pytest.mark.slow

ASK_TIMEOUT_S = 600.0
LEADS_S = (0.0, 1.0)  # the extremes of bench/asr_set.py's silences (the recogniser test covers all four)
APPEND_SAMPLES = 8000  # push-to-talk appends of 0.5 s, as a client streams them


def ask_transcript(wav) -> str:
    cmd = [sys.executable, "-m", "assistant", "ask", "--audio", str(wav), "--greedy", "--json", "--max-new-tokens", "1"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=ASK_TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS="2")
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["transcript"]


async def session(srv, turn_detection: bool):
    ws = await websockets.connect(srv.ws_url)
    assert (await recv_event(ws))["type"] == "session.created"
    settings: dict = {"input_sample_rate": 16000}
    if not turn_detection:
        settings["audio"] = {"input": {"turn_detection": None}}
    await send_json(ws, {"type": "session.update", "session": settings})
    await recv_until(ws, "session.updated")
    return ws


async def heard(ws) -> str:
    event = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
    await recv_until(ws, "response.done")
    return event["transcript"]


async def push_to_talk(srv, pcm: np.ndarray) -> str:
    ws = await session(srv, turn_detection=False)
    for at in range(0, len(pcm), APPEND_SAMPLES):
        await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(pcm[at : at + APPEND_SAMPLES])})
    await send_json(ws, {"type": "input_audio_buffer.commit"})
    await send_json(ws, {"type": "response.create"})
    text = await heard(ws)
    await ws.close()
    return text


async def server_vad(srv, pcm: np.ndarray) -> str:
    ws = await session(srv, turn_detection=True)
    for frame in chunks(pcm):
        await ws.send(frame)
    text = await heard(ws)
    await ws.close()
    return text


async def test_ask_push_to_talk_and_server_vad_hear_the_same_words(embedded_backend, tmp_path):
    picked = clips(2, VOICES[:2])[1:3]  # "What is the capital of France?" (British), "... of Japan?" (US)
    runs = []  # (clip name, lead, int16 samples, WAV path)
    for ci, clip in enumerate(picked):
        for lead in LEADS_S:
            audio = clip.with_silence(lead)  # 1.5 s of trailing silence: the VAD ends the turn
            wav = tmp_path / f"clip{ci}-{lead}.wav"
            write_wav(wav, audio)
            runs.append((clip.name, lead, np.round(audio * 32768).astype(np.int16), wav))
    heard_by = {(name, lead, "ask"): ask_transcript(wav) for name, lead, _, wav in runs}
    async with running_server(make_cfg(**{"generation.max_new_tokens": 1}), backend=embedded_backend) as srv:
        for name, lead, pcm, _ in runs:
            heard_by[(name, lead, "push-to-talk")] = await push_to_talk(srv, pcm)
            heard_by[(name, lead, "server VAD")] = await server_vad(srv, pcm)
    for clip in picked:
        texts = {k: v for k, v in heard_by.items() if k[0] == clip.name}
        assert len(set(texts.values())) == 1 and next(iter(texts.values())), texts
