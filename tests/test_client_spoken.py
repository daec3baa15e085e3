"""Spoken answers in the thin clients, without a sound card: the playout's jitter buffer and what-was-heard
accounting, the event glue (barge-in and the interrupt key -> response.cancel + conversation.item.truncate), the
answer recorder, the view's speaking state, half duplex and the interrupt key in the microphone loop, and WebRTC's
echo canceller on a synthetic echo path (the real pywebrtc-audio). The sound card's place is taken by calling the
callbacks PortAudio would call, with the buffers it would pass."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import wave

import numpy as np
import pytest

from clients.audio_source import ECHO_WARMUP_MS, DuplexAudio, Microphone, Speaker
from clients.common import MicOptions, TurnView, mic_conversation
from clients.playback import AnswerRecorder, NoAnswerAudio, Playout, SpokenAnswers

RATE = 24000


def tone(ms: int, rate_hz: int = RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(rate_hz * ms // 1000) / rate_hz
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def frames(ms: int, rate_hz: int = RATE) -> int:
    return rate_hz * ms // 1000


def delta(item_id: str, pcm: np.ndarray) -> dict:
    b64 = base64.b64encode(pcm.tobytes()).decode()
    return {"type": "response.output_audio.delta", "item_id": item_id, "delta": b64}


def test_playout_waits_for_the_jitter_buffer_then_plays_in_order() -> None:
    p = Playout(RATE, jitter_ms=80)
    a = tone(50)
    p.push("it1", a.tobytes(), RATE)
    assert p.speaking and not p.read(frames(20)).any()  # 50 ms < 80 ms buffered: still waiting
    b = tone(50, hz=880)
    p.push("it1", b.tobytes(), RATE)
    played = np.concatenate([p.read(frames(20)) for _ in range(5)])
    assert np.array_equal(played, np.concatenate([a, b]))  # no sample lost, none repeated, in order
    assert p.played_frames == frames(100) and not p.read(frames(20)).any()


def test_playout_plays_a_short_answer_at_once_when_its_audio_is_complete() -> None:
    p = Playout(RATE, jitter_ms=80)
    p.push("it1", tone(30).tobytes(), RATE)
    p.end("it1")  # all of it is here: nothing to wait for
    assert np.array_equal(p.read(frames(30)), tone(30))


def test_stop_says_what_was_heard_and_drops_what_was_still_coming() -> None:
    p = Playout(RATE, jitter_ms=0, tail_ms=100)
    p.set_card(RATE, latency_s=0.05)
    p.push("it1", tone(1000).tobytes(), RATE)
    for _ in range(15):
        p.read(frames(20))  # 300 ms handed to the card; 50 ms of it is still in the card's buffer
    assert p.heard_ms("it1") == 250
    assert p.stop() == [("it1", 250)]
    p.push("it1", tone(100).tobytes(), RATE)  # in flight when the listener cut it: never played
    assert not p.read(frames(20)).any()
    assert p.speaking  # the room still echoes what was just played (tail + latency)
    for _ in range(7):
        p.read(frames(20))
    assert not p.speaking
    assert p.stop() == []


def test_playout_resamples_to_the_card_rate_and_counts_in_answer_time() -> None:
    p = Playout(RATE, jitter_ms=0)
    p.set_card(48000, latency_s=0.0)
    p.push("it1", tone(500).tobytes(), RATE)
    p.end("it1")
    out = np.concatenate([p.read(960) for _ in range(30)])
    assert abs(np.count_nonzero(out) - 48000 // 2) < 200  # 500 ms of audio at the card's 48 kHz
    assert p.played_frames == pytest.approx(24000, abs=100)


def test_spoken_answers_barge_in_and_the_interrupt_key_send_what_was_heard() -> None:
    p = Playout(RATE, jitter_ms=0)
    spoken = SpokenAnswers(p)
    assert spoken.handle({"type": "session.created", "session": {"output_sample_rate": RATE}}) == []
    assert spoken.handle({"type": "input_audio_buffer.speech_started"}) == []  # nothing plays: not a barge-in
    spoken.handle(delta("it1", tone(1000)))
    assert spoken.speaking
    for _ in range(20):
        p.read(frames(20))
    cut = spoken.handle({"type": "input_audio_buffer.speech_started"})
    truncate = {"type": "conversation.item.truncate", "item_id": "it1", "content_index": 0, "audio_end_ms": 400}
    assert cut == [truncate] and not p.read(frames(20)).any()
    spoken.handle(delta("it2", tone(600)))
    spoken.handle({"type": "response.output_audio.done", "item_id": "it2"})
    spoken.handle({"type": "response.done", "response": {}})
    for _ in range(10):
        p.read(frames(20))
    events = spoken.interrupt(response_active=True)
    assert events[0] == {"type": "response.cancel"} and events[1]["item_id"] == "it2"
    assert events[1]["audio_end_ms"] == 200 and spoken.truncated == [("it1", 400), ("it2", 200)]
    assert spoken.interrupt(response_active=False) == []  # nothing left to cut


def test_mqtt_speech_topic_audio_belongs_to_the_announced_answer() -> None:
    rec = AnswerRecorder()
    spoken = SpokenAnswers(rec)
    spoken.raw_audio(b"\x01\x00")  # before any start event: not attributed, counted
    started = {"type": "response.output_audio.started", "item_id": "it1", "format": "pcm16", "sample_rate": 16000}
    spoken.handle(started)
    spoken.raw_audio(tone(100, 16000).tobytes())
    spoken.handle({"type": "response.output_audio.done", "item_id": "it1"})
    spoken.raw_audio(b"\x01\x00")
    assert rec.rate_hz == 16000 and rec.audio_ms == 100 and spoken.dropped_raw_bytes == 4
    with pytest.raises(NoAnswerAudio, match="pcm16 only"):
        spoken.handle({**started, "format": "g711_ulaw"})


def test_recorder_writes_the_answer_and_refuses_a_server_without_a_voice(tmp_path) -> None:
    rec = AnswerRecorder()
    spoken = SpokenAnswers(rec)
    spoken.handle({"type": "session.created", "session": {"output_sample_rate": 22050}})
    spoken.handle(delta("it1", tone(200, 22050)))
    assert spoken.interrupt(response_active=False) == []  # a file is never cut
    rec.write(tmp_path / "a.wav")
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels()) == (22050, frames(200, 22050), 1)
    with pytest.raises(NoAnswerAudio, match="no voice"):
        SpokenAnswers(AnswerRecorder()).handle({"type": "session.created", "session": {}})


def test_view_prints_the_spoken_transcript_the_speaking_state_and_why_text_was_not_spoken() -> None:
    out = io.StringIO()
    view = TurnView(out=out)
    view.handle({"type": "session.created", "session": {}})
    view.handle({"type": "response.created", "response": {"id": "r1"}})
    view.handle({"type": "response.output_audio_transcript.delta", "delta": "Paris is nice. "})
    view.set_speaking(True)
    note = {"code": "no_voice_for_language", "language": "zh", "message": "no installed voice speaks 'zh'"}
    view.handle({"type": "response.output_audio_transcript.delta", "delta": "巴黎。", "no_audio": note})
    view.handle({"type": "response.done", "response": {"id": "r1", "status": "completed"}})
    assert view.state == "speaking"  # the answer is done, its audio still plays
    view.set_speaking(False)
    assert out.getvalue().splitlines() == [
        "[listening]",
        "assistant: Paris is nice. 巴黎。",  # (speaking: no state line in the middle of the answer)
        "[shown as text, not spoken: no installed voice speaks 'zh']",
        "[listening]",
    ]
    assert view.answers == ["Paris is nice. 巴黎。"]


def test_speaker_callback_hands_the_playout_to_the_card() -> None:
    p = Playout(RATE, jitter_ms=0)
    p.push("it1", tone(20).tobytes(), RATE)
    buf = bytearray(2 * frames(20))
    Speaker(p).fill(memoryview(buf), frames(20), None, None)
    assert bytes(buf) == tone(20).tobytes()


async def test_half_duplex_mutes_the_microphone_while_speaking_and_enter_interrupts() -> None:
    """The real Microphone class fed as PortAudio's callback would; the playout read as the card would."""
    mic = Microphone(None, 20)
    p = Playout(RATE, jitter_ms=0, tail_ms=0)
    spoken = SpokenAnswers(p)
    keys: asyncio.Queue[str] = asyncio.Queue()
    view = TurnView(out=io.StringIO(), show_state=False)
    sent_audio: list[bytes] = []
    sent_events: list[dict] = []

    async def send_audio(block: bytes) -> None:
        sent_audio.append(block)

    async def send_event(event: dict) -> None:
        sent_events.append(event)

    opts = MicOptions(keys=keys, spoken=spoken, half_duplex=True)
    task = asyncio.create_task(mic_conversation(send_audio, send_event, view, mic, opts))
    try:
        await asyncio.sleep(0.01)  # the loop drains what was captured before it started
        mic._put(b"\x01\x00" * 320)
        await _until(lambda: len(sent_audio) == 1)
        view.handle({"type": "response.created", "response": {"id": "r1"}})
        spoken.handle(delta("it1", tone(1000)))
        p.read(frames(100))
        mic._put(b"\x02\x00" * 320)  # the assistant speaks: this block (its echo) is not sent
        await asyncio.sleep(0.05)
        assert len(sent_audio) == 1 and view.speaking
        keys.put_nowait("\n")
        await _until(lambda: len(sent_events) == 2)
        assert sent_events[0] == {"type": "response.cancel"}
        assert sent_events[1]["type"] == "conversation.item.truncate" and sent_events[1]["audio_end_ms"] == 100
        view.handle({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}})
        p.read(frames(20))
        mic._put(b"\x03\x00" * 320)  # silence again: the microphone is open
        await _until(lambda: len(sent_audio) == 2)
        assert sent_audio[-1] == b"\x03\x00" * 320 and not view.speaking
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(predicate) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), 10)


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x.astype(np.float64))) + 1e-9))


@pytest.mark.slow  # espeak-ng
async def test_duplex_echo_canceller_removes_the_answer_and_keeps_the_user() -> None:
    """--duplex's callback path at 24 kHz on a synthetic room: the microphone hears the speaker 40 ms later at
    -8 dB, then the user alone. AEC3 takes the echo down by more than 25 dB after its first second and leaves
    the user's speech within 3 dB."""
    import soxr

    from bench.wake_word import speak

    block = frames(20)
    answer = soxr.resample(speak("The capital of France is Paris, a large city on the river Seine."), 16000, RATE)
    answer = np.concatenate([answer, np.zeros(-len(answer) % block, np.int16)])
    user = soxr.resample(speak("Stop, please."), 16000, RATE)
    p = Playout(RATE, jitter_ms=0)
    duplex = DuplexAudio(None, None, 20, p)
    duplex.loop = asyncio.get_running_loop()
    duplex.start_echo_canceller(RATE, delay_ms=40)
    p.push("it1", answer.astype("<i2").tobytes(), RATE)
    p.end("it1")
    n = len(answer) + len(user) + frames(200)
    n -= n % block
    user_track = np.zeros(n, np.int16)  # the user speaks once the answer is over
    user_track[len(answer) : len(answer) + len(user)] = user
    delay = frames(40)  # from the speaker to the microphone
    played = np.zeros(n + delay, np.int16)
    heard = np.zeros(n, np.int16)
    for at in range(0, n, block):
        echo = (played[at : at + block].astype(np.float64) * 0.4).astype(np.int16)  # -8 dB
        near = echo + user_track[at : at + block]
        out = bytearray(2 * block)
        duplex.on_audio(near.tobytes(), memoryview(out), block, None, None)
        played[at + delay : at + delay + block] = np.frombuffer(out, "<i2")
        heard[at : at + block] = np.frombuffer(await duplex.queue.get(), "<i2")
    assert np.array_equal(played[delay : delay + len(answer)], answer)  # the speaker played the whole answer
    span = slice(frames(1000), len(answer))
    echo_db = _db((played[span].astype(np.float64) * 0.4).astype(np.int16))
    assert echo_db - _db(heard[span]) > 25, (echo_db, _db(heard[span]))
    user_span = slice(len(answer), len(answer) + len(user))
    assert abs(_db(heard[user_span]) - _db(user_track[user_span])) < 3


class RecordingView(TurnView):
    """The desktop's view, keeping every server event it was shown (for the assertions)."""

    def __init__(self) -> None:
        super().__init__(out=io.StringIO())
        self.log: list[dict] = []

    def handle(self, event: dict) -> None:
        self.log.append(event)
        super().handle(event)


@pytest.mark.slow
async def test_desktop_duplex_hears_the_user_not_the_answer_and_truncates_on_barge_in(
    embedded_backend, speech_pool
) -> None:
    """The desktop client's --duplex path against the real server and voice, the sound card simulated at its
    callback in real time: the microphone hears the answer 40 ms after the speaker plays it (-8 dB) plus the user.
    Echo cancellation keeps the answer from barging in on itself; the user's "Stop, please." (said once the
    canceller's warm-up has played and 2 s more wait in the jitter buffer) stops it at once and truncates it to
    what was played, which is all the model remembers of it."""
    import soxr
    import websockets

    from assistant.transport.server import running_server
    from bench.wake_word import clip, speak
    from clients import desktop
    from clients.cli import ClientAudio
    from tests.server_util import worker_conversation
    from tests.test_spoken_answers import spoken_cfg

    question = soxr.resample(clip(speak("Tell me a long story about a dragon and a knight.")), 16000, RATE)
    stop_please = soxr.resample(clip(speak("Stop, please.")), 16000, RATE)
    block, delay = frames(20), frames(40)
    playout = Playout(RATE)
    duplex = DuplexAudio(None, None, 20, playout)
    duplex.loop = asyncio.get_running_loop()
    duplex.start_echo_canceller(RATE, delay_ms=40)
    spoken = SpokenAnswers(playout)
    view = RecordingView()
    args = desktop.build_parser().parse_args(["--duplex"])
    said: dict[str, int] = {}  # event log index when the user started to talk over the answer

    async def sound_card() -> None:
        """PortAudio's part: every 20 ms one callback with the captured block; what it plays comes back as echo."""
        track, pos = question, 0  # what the user says, and where the microphone is in it
        played = np.zeros(delay, np.int16)  # the last 40 ms the speaker played, oldest first
        t0 = loop.time()
        for n in range(10**6):
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - loop.time()))
            learnt = playout.played_frames > frames(ECHO_WARMUP_MS + 500)  # the canceller knows the room
            if "at" not in said and learnt and playout.queued_ms > 2000:  # cut in
                said["at"] = len(view.log)
                track = np.concatenate([track[:pos], np.zeros(max(0, pos - len(track)), np.int16), stop_please])
            near = (played[:block].astype(np.float64) * 0.4).astype(np.int16)  # -8 dB echo
            voice = track[pos : pos + block]
            near[: len(voice)] += voice
            pos += block
            out = bytearray(2 * block)
            duplex.on_audio(near.tobytes(), memoryview(out), block, None, None)
            played = np.concatenate([played[block:], np.frombuffer(out, "<i2")])

    loop = asyncio.get_running_loop()
    async with running_server(spoken_cfg(**{"generation.max_new_tokens": 120}), backend=embedded_backend,
                              speech=speech_pool) as server:  # fmt: skip
        async with websockets.connect(server.ws_url) as ws:
            card = asyncio.create_task(sound_card())
            conv = asyncio.create_task(desktop._converse(ws, view, args, ClientAudio(duplex, spoken)))
            try:

                async def truncated() -> None:
                    while not {"conversation.item.truncated", "response.done"} <= {e["type"] for e in view.log}:
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(truncated(), 180)
            finally:
                for task in (card, conv):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            session_id = view.log[0]["session"]["id"]
            done_id = next(e["response"]["id"] for e in view.log if e["type"] == "response.done")

            async def remembered() -> list:
                """The exchange of the cut answer, once the worker has recorded it (the cancel ends the answer on
                the worker at its next decode step, after the response.done the client already has)."""
                while True:
                    conv = await worker_conversation(server.engine, session_id)
                    replies = [ex.reply for ex in conv.history if ex.response_id == done_id]
                    if replies:
                        return replies
                    await asyncio.sleep(0.1)

            replies = await asyncio.wait_for(remembered(), 60)
    types = [e["type"] for e in view.log]
    assert "at" in said, f"the answer stopped before the user spoke (did its own echo barge in?): {types}"
    first_audio = types.index("response.output_audio.delta")
    assert "input_audio_buffer.speech_started" not in types[first_audio : said["at"]]  # no echo barge-in
    assert "input_audio_buffer.speech_started" in types[said["at"] :]
    dones = [e["response"] for e in view.log if e["type"] == "response.done"]
    assert dones, types
    done = dones[0]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert len(spoken.truncated) == 1
    item_id, heard_ms = spoken.truncated[0]
    assert item_id == done["output"][0]["id"] and 1000 < heard_ms < 60000
    deltas = [e for e in view.log if e["type"] == "response.output_audio_transcript.delta"]
    sent = "".join(e["delta"] for e in deltas if e["item_id"] == item_id).strip()  # every clause the server sent
    assert len(replies) == 1
    heard = replies[0]
    assert heard and len(heard) < len(sent) and sent.startswith(heard)  # the model remembers what was played
    assert done["output"][0]["content"][0]["transcript"] == heard
