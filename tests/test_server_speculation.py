"""Server VAD speculation through the real server on port 0 (tiny random Qwen-Audio model, recorded backend).

The client sends a turn's speech and part of its end-of-turn silence, waits (without sleeping: on the recorded
backend) until the speculative audio work ran, then sends the rest. Each result is compared with a server that has
speculation off (`vad.early_prepare_ms = 0`) receiving the same audio: same prompt size, same answer (greedy).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import websockets

from assistant.backends.base import Utterance
from assistant.config import load_config
from assistant.transport.server import running_server
from tests.server_util import (
    TIMEOUT_S,
    RecordingBackend,
    chunks,
    recv_event,
    recv_until,
    send_json,
    silence,
    vowel,
    worker_conversation,
)

# 450 ms of silence after speech: past the tentative end (300 ms: the prefix padding) plus webrtcvad's ~100 ms
# hangover, well short of the 600 ms that commits.
TENTATIVE_SILENCE_MS = 450


def make_cfg(early_prepare_ms: int):
    return load_config(
        overrides={
            "server.port": 0,
            "generation.max_new_tokens": 6,
            "generation.greedy": True,
            "vad.early_prepare_ms": early_prepare_ms,
            "voice.name": "",  # text answers: these tests count audio work, not speech
        }
    )


async def open_session(srv):
    ws = await websockets.connect(srv.ws_url)
    assert (await recv_event(ws))["type"] == "session.created"
    await send_json(ws, {"type": "session.update", "session": {"input_sample_rate": 16000}})
    await recv_until(ws, "session.updated")
    return ws


async def send_pcm(ws, pcm: np.ndarray) -> None:
    for frame in chunks(pcm):
        await ws.send(frame)


async def until_prepared(rec: RecordingBackend, count: int) -> None:
    await asyncio.to_thread(rec.wait_for_runs, count)


def summary(done: dict) -> tuple:
    r = done["response"]
    return r["status"], r["usage"]["input_tokens"], r["output"][0]["content"][0]["text"] if r["output"] else ""


async def gone(srv) -> None:
    while srv.hub.sessions:  # the server notices the close on its own loop
        await asyncio.sleep(0.01)


async def conversation(srv):
    """The engine conversation of the server's only session."""
    [session] = srv.hub.sessions.values()
    return await worker_conversation(srv.engine, session.id)


async def run_script(backend, early_prepare_ms: int, steps: list) -> tuple[dict, list[dict], RecordingBackend, dict]:
    """Run `steps` on one session: ("pcm", int16 array) | ("json", event, reply type or None) | ("speculated",)
    (wait until the speculative audio work ran; skipped with speculation off). Returns the response.done, the log,
    the recorded backend and the engine conversation's state once the answer is done."""
    rec = RecordingBackend(backend)
    log: list[dict] = []
    async with running_server(make_cfg(early_prepare_ms), backend=rec) as srv:
        ws = await open_session(srv)
        for step in steps:
            if step[0] == "pcm":
                await send_pcm(ws, step[1])
            elif step[0] == "json":
                await send_json(ws, step[1])
                if step[2]:
                    await recv_until(ws, step[2], log)
            elif early_prepare_ms:
                await until_prepared(rec, 1)
        done = await recv_until(ws, "response.done", log)
        conv = await conversation(srv)
        state = {"speculative": len(conv.speculative), "history": len(conv.history), "audios": conv.audio_count}
        await ws.close()
    return done, log, rec, state


def committed_item(log: list[dict]) -> str:
    [item] = [e["item_id"] for e in log if e["type"] == "input_audio_buffer.committed"]
    return item


async def test_confirmed_speculation_prepares_once_and_answers_the_same(server_tiny_backend):
    steps = [("pcm", np.concatenate([vowel(900), silence(TENTATIVE_SILENCE_MS)])), ("speculated",)]
    steps.append(("pcm", silence(800)))
    base_done, base_log, base_rec, _ = await run_script(server_tiny_backend, 0, steps)
    done, log, rec, state = await run_script(server_tiny_backend, 200, steps)
    [committed_len] = base_rec.runs(committed_item(base_log))
    # once, with exactly the committed audio, before the commit; nothing more at the commit
    assert rec.runs(committed_item(log)) == [committed_len] and len(rec.calls) == 1
    assert state == {"speculative": 0, "history": 1, "audios": 1}
    assert summary(done) == summary(base_done)


async def test_speech_resuming_discards_the_speculation_and_keeps_the_full_turn(server_tiny_backend):
    steps = [("pcm", np.concatenate([vowel(700), silence(TENTATIVE_SILENCE_MS)])), ("speculated",)]
    steps.append(("pcm", np.concatenate([vowel(600), silence(1000)])))
    base_done, base_log, base_rec, _ = await run_script(server_tiny_backend, 0, steps)
    done, log, rec, state = await run_script(server_tiny_backend, 200, steps)
    [committed_len] = base_rec.runs(committed_item(base_log))
    assert committed_len >= 16 * (700 + TENTATIVE_SILENCE_MS + 600)  # one turn holding both bursts
    runs = rec.runs(committed_item(log))
    assert runs[0] < committed_len and runs[-1] == committed_len and runs.count(committed_len) == 1
    assert state == {"speculative": 0, "history": 1, "audios": 1}
    types = [e["type"] for e in log]
    assert types.count("response.done") == 1
    assert summary(done) == summary(base_done)


@pytest.mark.parametrize("how", ["clear", "reset"])
async def test_clear_or_reset_during_speculation_leaves_no_stale_turn(server_tiny_backend, how):
    event = (
        ("json", {"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared")
        if how == "clear"
        else ("json", {"type": "conversation.reset"}, None)
    )
    steps = [("pcm", np.concatenate([vowel(600), silence(TENTATIVE_SILENCE_MS)])), ("speculated",), event]
    steps.append(("pcm", np.concatenate([vowel(800), silence(1000)])))
    base_done, base_log, base_rec, _ = await run_script(server_tiny_backend, 0, steps)
    done, log, rec, state = await run_script(server_tiny_backend, 200, steps)
    assert len(base_rec.calls) == 1  # without speculation only the second turn is ever prepared
    assert state == {"speculative": 0, "history": 1, "audios": 1}
    types = [e["type"] for e in log]
    assert types.count("input_audio_buffer.committed") == 1 and types.count("response.created") == 1
    assert summary(done) == summary(base_done)  # the first audio never entered the conversation


async def test_close_during_speculation_forgets_it(server_tiny_backend):
    rec = RecordingBackend(server_tiny_backend)
    async with running_server(make_cfg(200), backend=rec) as srv:
        ws = await open_session(srv)
        [session] = srv.hub.sessions.values()
        conv = await worker_conversation(srv.engine, session.id)
        await send_pcm(ws, np.concatenate([vowel(600), silence(TENTATIVE_SILENCE_MS)]))
        await until_prepared(rec, 1)
        await ws.close()
        await ws.wait_closed()
        await asyncio.wait_for(gone(srv), TIMEOUT_S)
        # a later command on the worker runs after the close was handled
        srv.engine.open_session("probe")
        await srv.engine.add_user_turn("probe", Utterance("p", text="x"))
    assert conv.closed and not conv.speculative and not conv.pending and not conv.history


@pytest.mark.slow
async def test_whisper_reuses_a_speculation_made_before_the_trailing_padding_was_complete(
    embedded_backend, embedded_questions
):
    """The embedded backend hears speech trimmed (`hears_trimmed`): its speculation starts at `early_prepare_ms`
    (200) of silence, before the 300 ms padding is complete, and the commit, longer by that silence, reuses it: one
    transcription, the same transcript as without speculation."""
    speech = np.round(embedded_questions[0][2] * 32768).astype(np.int16)
    # 330 ms: past the tentative end (200 ms + webrtcvad's hangover), short of the whole padding (300 ms + hangover)
    steps = [("pcm", np.concatenate([speech, silence(330)])), ("speculated",), ("pcm", silence(800))]
    base_done, base_log, base_rec, _ = await run_script(embedded_backend, 0, steps)
    done, log, rec, state = await run_script(embedded_backend, 200, steps)
    [committed_len] = base_rec.runs(committed_item(base_log))
    [speculated_len] = rec.runs(committed_item(log))
    assert speculated_len < committed_len and len(rec.calls) == 1  # prepared once, on the shorter clip
    heard = [
        next(e["transcript"] for e in lg if e["type"].endswith("transcription.completed")) for lg in (base_log, log)
    ]
    assert heard[0] == heard[1] and "capital" in heard[0].lower()
    assert summary(done) == summary(base_done) and state["history"] == 1
