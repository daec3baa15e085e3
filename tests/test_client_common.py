"""Pure parts of the thin clients: the TurnView event renderer, WAV loading/resampling, pacing, backoff, URLs."""

from __future__ import annotations

import asyncio
import io
import wave

import numpy as np
import pytest

from clients.audio_source import blocks, load_wav_pcm16, paced, silence
from clients.cli import Backoff, Reconnects
from clients.common import NoAnswer, TurnView, WavOptions, session_update, wav_conversation
from clients.mqtt import parse_broker_url


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_turn_view_prints_transcript_streamed_answer_and_latency() -> None:
    out, clock = io.StringIO(), FakeClock()
    view = TurnView(out=out, clock=clock)
    view.handle({"type": "session.created", "session": {}})
    view.handle({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": "i1"})
    view.handle({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "i1"})
    clock.now_s += 0.25
    kind = "conversation.item.input_audio_transcription.completed"
    transcript = {"type": kind, "item_id": "i1", "transcript": " Hi "}
    view.handle(transcript)
    view.handle({"type": "response.created", "response": {"id": "r1"}})
    assert view.active_responses == 1 and view.state == "thinking"
    view.handle({"type": "response.output_text.delta", "delta": "Hel"})
    clock.now_s += 1.0  # later deltas do not change the latency: it is the time to the FIRST text
    view.handle({"type": "response.output_text.delta", "delta": "lo!"})
    view.handle({"type": "response.done", "response": {"id": "r1", "status": "completed", "timings_ms": {"total": 42}}})
    text = out.getvalue()
    assert text.splitlines() == [
        "[listening]",
        "[speech]",
        "[thinking]",
        "you: Hi",
        "assistant: Hello!",
        "[first text after 250 ms, server 42 ms]",
        "[listening]",
    ]
    assert view.answers == ["Hello!"] and view.transcripts == ["Hi"]
    assert view.latencies_ms == [pytest.approx(250.0)]
    assert view.responses_done == 1 and view.active_responses == 0


def test_turn_view_beta_deltas_errors_and_cancelled_status() -> None:
    out = io.StringIO()
    view = TurnView(out=out, show_state=False)
    view.handle({"type": "response.created", "response": {"id": "r1"}})
    view.handle({"type": "response.text.delta", "delta": "par"})
    view.handle({"type": "error", "error": {"code": "server_busy", "message": "try later"}})
    view.handle({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}})
    assert out.getvalue() == "assistant: par\n[error server_busy: try later]\n"
    assert view.answers == ["par"] and view.errors[0]["code"] == "server_busy"


def test_session_update_selects_rate_and_push_to_talk() -> None:
    vad = session_update(16000)
    assert vad["session"]["input_sample_rate"] == 16000 and "audio" not in vad["session"]
    ptt = session_update(44100, push_to_talk=True)
    assert ptt["session"]["audio"]["input"]["turn_detection"] is None
    assert ptt["session"]["input_sample_rate"] == 44100
    told = session_update(16000, language="de")["session"]["audio"]["input"]  # `--language de`
    assert told == {"transcription": {"model": "whisper-1", "language": "de"}}


def test_session_update_and_the_view_carry_the_wake_word() -> None:
    wake = session_update(16000, wake_word="alexa", follow_up_ms=3000)["session"]["audio"]["input"]
    assert wake == {"wake_word": {"name": "alexa", "follow_up_ms": 3000}}
    assert session_update(16000, wake_word="off")["session"]["audio"]["input"] == {"wake_word": None}
    both = session_update(16000, push_to_talk=True, wake_word="hey_mycroft")["session"]["audio"]["input"]
    assert both == {"turn_detection": None, "wake_word": {"name": "hey_mycroft"}}
    out = io.StringIO()
    view = TurnView(out=out)
    view.handle({"type": "input_audio_buffer.wake_word_detected", "name": "alexa", "audio_start_ms": 1280})
    assert view.wake_words == 1 and out.getvalue() == "[wake word: alexa]\n"


def _wav_bytes(samples: np.ndarray, rate_hz: int, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate_hz)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def test_load_wav_downmixes_and_resamples_to_16k(tmp_path) -> None:
    rate_hz, tone_hz = 48000, 440.0
    t = np.arange(rate_hz) / rate_hz  # one second
    left = (0.5 * np.sin(2 * np.pi * tone_hz * t) * 32767).astype("<i2")
    stereo = np.stack([left, left], axis=1)  # (frames, 2)
    path = tmp_path / "tone.wav"
    path.write_bytes(_wav_bytes(stereo, rate_hz, channels=2))
    pcm = np.frombuffer(load_wav_pcm16(path), "<i2").astype(np.float32) / 32767
    assert abs(len(pcm) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(pcm))
    peak_hz = np.argmax(spectrum) * 16000 / len(pcm)
    assert abs(peak_hz - tone_hz) < 2.0
    assert 0.45 < np.max(np.abs(pcm[100:-100])) < 0.55  # amplitude kept through downmix + resampling


def test_load_wav_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        load_wav_pcm16(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(SystemExit, match="not a PCM WAV"):
        load_wav_pcm16(bad)


def test_blocks_and_silence_sizes() -> None:
    pcm = silence(1000)
    assert len(pcm) == 32000
    chunks = blocks(pcm + b"\x00\x00", block_ms=20)
    assert [len(c) for c in chunks[:2]] == [640, 640] and len(chunks) == 51 and chunks[-1] == b"\x00\x00"


async def test_paced_is_never_faster_than_real_time() -> None:
    loop = asyncio.get_running_loop()
    chunks = blocks(silence(200), block_ms=20)  # 10 blocks, 200 ms of audio
    start_s = loop.time()
    got = [c async for c in paced(chunks)]
    # A lower bound only (the machine may be slow, never fast): the last block is due at 180 ms.
    assert loop.time() - start_s >= 0.175 and got == chunks


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(initial_s=0.5, max_s=3.0)
    assert [b.next_delay_s() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay_s() == 0.5


def test_parse_broker_url() -> None:
    b = parse_broker_url("mqtts://user:p%40ss@broker.local")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.local", 8883, True, "user", "p@ss")
    assert parse_broker_url("mqtt://127.0.0.1:1999").port == 1999
    with pytest.raises(ValueError, match="expected mqtt://"):
        parse_broker_url("http://x")


async def test_wav_conversation_push_to_talk_waits_for_the_answer() -> None:
    """The loop sends the file, commits, asks for the answer and returns only once response.done arrived."""
    view = TurnView(out=io.StringIO())
    sent_audio: list[bytes] = []
    sent_events: list[str] = []

    async def send_audio(chunk: bytes) -> None:
        sent_audio.append(chunk)

    async def send_event(event: dict) -> None:
        sent_events.append(event["type"])
        if event["type"] == "response.create":  # the "server" answers a little later
            loop.call_later(0.05, view.handle, {"type": "response.created", "response": {"id": "r"}})
            loop.call_later(0.1, view.handle, {"type": "response.done", "response": {"id": "r"}})

    loop = asyncio.get_running_loop()
    opts = WavOptions(push_to_talk=True, speed=50.0, wait_s=30.0)
    await wav_conversation(send_audio, send_event, view, silence(200), opts)
    assert b"".join(sent_audio) == silence(200)
    assert sent_events == ["input_audio_buffer.commit", "response.create"]
    assert view.responses_done == 1


async def test_wav_conversation_gives_up_when_nothing_answers() -> None:
    async def ignore(_: object) -> None:
        return None

    opts = WavOptions(speed=100.0, tail_ms=100, wait_s=0.2)
    with pytest.raises(NoAnswer, match="no answer within"):
        await wav_conversation(ignore, ignore, TurnView(out=io.StringIO()), silence(100), opts)


def test_new_connection_forgets_responses_of_the_lost_connection() -> None:
    out = io.StringIO()
    view = TurnView(out=out, show_state=False)
    view.handle({"type": "response.created", "response": {"id": "r1"}})
    view.handle({"type": "response.output_text.delta", "delta": "half an ans"})
    view.new_connection()  # the server went away mid-answer: its response.done will never come
    assert view.active_responses == 0 and view.state == "connecting"
    view.handle({"type": "response.created", "response": {"id": "r2"}})
    view.handle({"type": "response.output_text.delta", "delta": "whole"})
    view.handle({"type": "response.done", "response": {"id": "r2"}})
    assert out.getvalue() == "assistant: half an ans\nassistant: whole\n"
    assert view.active_responses == 0 and view.responses_done == 1


def test_both_clients_share_the_audio_options_and_parse_the_input_device() -> None:
    from clients import desktop, mqtt

    d = desktop.build_parser().parse_args(["--device", "3", "--wav", "x.wav", "--tail-ms", "200"])
    assert (d.device, d.wav, d.tail_ms, d.block_ms, d.max_retries) == (3, "x.wav", 200, 20, -1)
    m = mqtt.build_parser().parse_args(["--device", "kitchen", "--input-device", "USB Mic", "--push-to-talk"])
    assert (m.device, m.input_device, m.push_to_talk, m.wait_s) == ("kitchen", "USB Mic", True, 120.0)
    assert desktop.build_parser().parse_args([]).device is None  # the system default input
    w = mqtt.build_parser().parse_args(["--device", "d", "--wake-word", "okay_nabu", "--follow-up-ms", "5000"])
    assert (w.wake_word, w.follow_up_ms) == ("okay_nabu", 5000)
    assert desktop.build_parser().parse_args(["--wake-word", "alexa"]).wake_word == "alexa"


async def test_reconnects_give_up_after_max_retries_and_reset_on_success(capsys) -> None:
    r = Reconnects(Backoff(initial_s=0.0, max_s=0.0), max_retries=1)
    assert await r.wait_or_give_up("server", "ws://x", OSError("refused"), "OSError: refused")
    assert not await r.wait_or_give_up("server", "ws://x", OSError("refused"), "OSError: refused")
    err = capsys.readouterr().err
    assert "[server unavailable (OSError: refused); retrying in 0.0 s]" in err
    assert "error: cannot reach the server at ws://x (refused); is it running?" in err
    r.connected()
    assert r.failures == 0 and await r.wait_or_give_up("broker", "mqtt://x", OSError("lost"), "lost")
