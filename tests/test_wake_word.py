"""The wake word: the detector (pymicro-wakeword, real models) on espeak-ng speech, and the session core's wake-word
stage with it: audio before the wake word never becomes a turn, the question said after it in one breath is the
turn, the follow-up window, barge-in, push-to-talk, the settings (echo, bad names) and randomised sequences."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import TypeAdapter

from assistant.audio.wake_word import WakeWordDetector, WakeWordSettings, installed_wake_words
from assistant.realtime import commands as C
from assistant.realtime.session import Session
from assistant.realtime.settings import SessionSettings, TurnDetection
from assistant.realtime.wake import LISTEN_AFTER_WAKE_MS
from assistant.schema import SettingError
from bench.wake_word import ORDINARY, speak
from tests.server_util import silence
from tests.test_realtime_core import EngineSim, run_until_quiet, types

RATE_HZ = 16000
QUESTION = "What is the capital of France?"
FOLLOW_UP_MS = 3000


@functools.cache
def said(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    return speak(text, voice, speed)


def pause(ms: int) -> np.ndarray:
    return silence(ms, RATE_HZ)


NO_SPECULATION = TurnDetection(early_prepare_ms=0)


def wake_session(name: str = "alexa", td: TurnDetection | None = NO_SPECULATION) -> Session:
    wake = WakeWordSettings(name, FOLLOW_UP_MS)
    st_ = SessionSettings(input_rate_hz=RATE_HZ, turn_detection=td, wake_word=wake)
    return Session("sess_w", st_, "ga", default_td=TurnDetection())


def send(s: Session, sim: EngineSim, pcm: np.ndarray, chunk_ms: int = 20) -> list[dict]:
    n = RATE_HZ * chunk_ms // 1000
    events = []
    for i in range(0, len(pcm), n):
        events += sim.run(s.receive_audio(pcm[i : i + n].astype("<i2").tobytes(), 1.0))
    return events


def turns(sim: EngineSim) -> list[np.ndarray]:
    return [c.utterance.audio for c in sim.commands if isinstance(c, C.AddTurn)]


# ---- the detector ------------------------------------------------------------------------------------------------
def test_installed_models_and_a_bad_name_lists_them():
    assert installed_wake_words() == ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")
    with pytest.raises(SettingError) as e:
        WakeWordDetector("siri")
    assert "alexa, hey_jarvis, hey_mycroft, okay_nabu" in str(e.value) and "'siri'" in str(e.value)


@pytest.mark.slow  # espeak-ng
def test_detector_results_do_not_depend_on_chunk_sizes():
    pcm = np.concatenate([pause(500), said(f"Alexa, {QUESTION}"), pause(500)])
    runs = []
    for chunk in (7, 320, 4801, len(pcm)):
        det = WakeWordDetector("alexa", stream_offset_ms=1000)
        runs.append([d for i in range(0, len(pcm), chunk) for d in det.process(pcm[i : i + chunk])])
        assert det.position_ms == 1000 + len(pcm) * 1000 // RATE_HZ
    assert len(runs[0]) == 1 and all(r == runs[0] for r in runs)
    d = runs[0][0]
    assert d.name == "alexa" and d.probability > 0.9 and 1000 + 500 < d.audio_end_ms < 1000 + 500 + 1500


@pytest.mark.slow  # espeak-ng
@pytest.mark.parametrize("voice", ["en-us", "en-gb+f3"])
def test_no_model_fires_on_ordinary_sentences(voice):
    pcm = np.concatenate([np.concatenate([said(t, voice), pause(300)]) for t in ORDINARY])
    for name in installed_wake_words():
        assert WakeWordDetector(name).process(pcm) == [], name


# ---- the session core's stage ----------------------------------------------------------------------------------
@pytest.mark.slow  # espeak-ng
def test_only_the_question_after_the_wake_word_becomes_the_turn():
    s, sim = wake_session(), EngineSim()
    sim.run(s.start(0.0))
    before = np.concatenate([pause(300), said(QUESTION), pause(1500)])  # no wake word: nothing happens
    spoken = np.concatenate([pause(500), said(f"Alexa, {QUESTION}"), pause(1000)])
    events = send(s, sim, before)
    assert events == [] and turns(sim) == []
    events = send(s, sim, spoken)
    t = types(events)
    assert t[:2] == ["input_audio_buffer.wake_word_detected", "input_audio_buffer.speech_started"], t
    wake, started = events[0], events[1]
    assert wake["name"] == "alexa" and wake["item_id"] == started["item_id"]
    assert started["audio_start_ms"] >= wake["audio_start_ms"]  # the turn starts at or after the detection
    assert t.count("input_audio_buffer.committed") == 1
    # The turn's audio is exactly the stream from the detection on: nothing from before the wake word.
    [audio] = turns(sim)
    at = wake["audio_start_ms"] * RATE_HZ // 1000 - len(before)
    assert 500 * RATE_HZ // 1000 < at < len(spoken)
    np.testing.assert_array_equal(np.round(audio * 32768).astype(np.int16), spoken[at : at + len(audio)])
    assert len(audio) > 1000 * RATE_HZ // 1000  # "... capital of France" is in it


@pytest.mark.slow  # espeak-ng
def test_follow_up_inside_the_window_is_a_turn_after_it_is_ignored():
    s, sim = wake_session(), EngineSim()
    sim.run(s.start(0.0))
    send(s, sim, np.concatenate([pause(500), said(f"Alexa, {QUESTION}"), pause(1000)]))
    events = run_until_quiet(s, sim, 2.0)
    assert types(events).count("response.done") == 1
    # inside the window (stream time from the answer's end), without the wake word
    events = send(s, sim, np.concatenate([pause(500), said("And of Germany?"), pause(1000)]))
    t = types(events)
    assert "input_audio_buffer.wake_word_detected" not in t and t.count("input_audio_buffer.committed") == 1, t
    events = run_until_quiet(s, sim, 3.0)
    assert types(events).count("response.done") == 1 and len(turns(sim)) == 2
    # the window passes in stream time (silence, no sleeping); then the same question is not heard
    events = send(s, sim, np.concatenate([pause(FOLLOW_UP_MS + 100), said("And of Germany?"), pause(1000)]))
    assert events == [] and len(turns(sim)) == 2
    # the wake word opens a turn again
    events = send(s, sim, np.concatenate([pause(500), said("Alexa, and of Italy?"), pause(1000)]))
    assert types(events)[0] == "input_audio_buffer.wake_word_detected" and len(turns(sim)) == 3


@pytest.mark.slow  # espeak-ng
def test_a_wake_word_without_speech_after_it_closes_again():
    s, sim = wake_session(), EngineSim()
    sim.run(s.start(0.0))
    events = send(s, sim, np.concatenate([pause(300), said("Alexa."), pause(LISTEN_AFTER_WAKE_MS + 200)]))
    assert types(events) == ["input_audio_buffer.wake_word_detected"]
    events = send(s, sim, np.concatenate([said(QUESTION), pause(1000)]))
    assert events == [] and turns(sim) == []


@pytest.mark.slow  # espeak-ng
def test_the_wake_word_barges_in_over_an_answer():
    s, sim = wake_session(), EngineSim()
    sim.run(s.start(0.0))
    send(s, sim, np.concatenate([pause(500), said(f"Alexa, {QUESTION}"), pause(1000)]))
    sim.run(s.engine_output(sim.step(), 1.1))  # turn prepared -> the answer starts
    [start] = [c for c in sim.commands if isinstance(c, C.StartResponse)]
    events = send(s, sim, np.concatenate([said("What time is it?"), pause(1000)]))  # no wake word: not heard
    assert events == [] and C.CancelResponse(start.response_id, "turn_detected") not in sim.commands
    events = send(s, sim, np.concatenate([said("Alexa, stop."), pause(300)]))
    assert types(events)[0] == "input_audio_buffer.wake_word_detected"
    assert C.CancelResponse(start.response_id, "turn_detected") in sim.commands


@pytest.mark.slow  # espeak-ng
def test_push_to_talk_reports_the_wake_word_and_the_commit_decides():
    s, sim = wake_session(td=None), EngineSim()
    sim.run(s.start(0.0))
    events = send(s, sim, np.concatenate([said("Hey Mycroft."), pause(300), said(QUESTION)]))
    assert events == []  # another model's phrase: nothing
    events = send(s, sim, np.concatenate([pause(300), said("Alexa."), pause(500)]))
    [wake] = events
    assert wake["type"] == "input_audio_buffer.wake_word_detected" and "item_id" not in wake
    sim.run(s.receive_event({"type": "input_audio_buffer.commit"}, 2.0))
    [audio] = turns(sim)  # the client's commit is the turn, all of it
    assert len(audio) > 3 * RATE_HZ


# ---- settings ------------------------------------------------------------------------------------------------------
def _update(s: Session, session: dict) -> dict:
    [event] = EngineSim().run(s.receive_event({"type": "session.update", "session": session}, 0.1))
    return event


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_session_update_sets_echoes_and_turns_off_the_wake_word(dialect):
    s = Session("sess_s", SessionSettings(), dialect, default_wake=WakeWordSettings("", 5000))
    created = s.start(0.0)[-1]

    def shown(ev: dict):
        session = ev["session"]
        return session["audio"]["input"]["wake_word"] if dialect == "ga" else session["wake_word"]

    def wake(value) -> dict:
        return {"audio": {"input": {"wake_word": value}}} if dialect == "ga" else {"wake_word": value}

    adapter = TypeAdapter(GAServerEvent if dialect == "ga" else BetaServerEvent)
    assert shown(created) is None
    ev = _update(s, wake({"name": "hey_mycroft"}))
    assert ev["type"] == "session.updated" and shown(ev) == {"name": "hey_mycroft", "follow_up_ms": 5000}
    adapter.validate_python(ev, strict=True)  # the extension rides along without breaking the SDK's models
    ev = _update(s, wake({"follow_up_ms": 0}))
    assert shown(ev) == {"name": "hey_mycroft", "follow_up_ms": 0}
    ev = _update(s, wake({"name": "siri"}))
    assert ev["type"] == "error" and ev["error"]["code"] == "invalid_event"
    assert "alexa, hey_jarvis, hey_mycroft, okay_nabu" in ev["error"]["message"] and "'siri'" in ev["error"]["message"]
    assert ev["error"]["param"].endswith("wake_word.name") and s.settings.wake_word.name == "hey_mycroft"
    ev = _update(s, wake(None))
    assert shown(ev) is None and s.settings.wake_word is None
    ev = _update(s, wake({"follow_up_ms": 100}))  # turning it on needs a name
    assert ev["type"] == "error" and "okay_nabu" in ev["error"]["message"]
    ev = _update(s, wake({"name": "okay_nabu", "follow_up_ms": -1}))
    assert ev["type"] == "error" and ev["error"]["param"].endswith("follow_up_ms")
    ev = _update(s, wake("alexa"))
    assert ev["type"] == "error" and "object" in ev["error"]["message"]
    json.dumps(ev, allow_nan=False)


# ---- randomised sequences ----------------------------------------------------------------------------------------
STEPS = st.lists(
    st.sampled_from(
        [
            "wake",
            "question",
            "pause",
            "long_pause",
            "commit",
            "clear",
            "create",
            "cancel",
            "engine",
            "off",
            "on",
            "ptt",
            "vad",
        ]
    ),  # fmt: skip
    max_size=25,
)


@pytest.mark.slow  # espeak-ng
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STEPS)
def test_no_sequence_with_a_wake_word_doubles_a_response_done_or_raises(steps):
    s, sim = wake_session(td=TurnDetection(early_prepare_ms=300)), EngineSim()
    events = sim.run(s.start(0.0))
    audio = {
        "wake": np.concatenate([said("Alexa, what time is it?"), pause(700)]),
        "question": said(QUESTION),
        "pause": pause(700),
        "long_pause": pause(FOLLOW_UP_MS + 500),
    }
    client = {
        "commit": {"type": "input_audio_buffer.commit"},
        "clear": {"type": "input_audio_buffer.clear"},
        "create": {"type": "response.create"},
        "cancel": {"type": "response.cancel"},
        "off": {"type": "session.update", "session": {"audio": {"input": {"wake_word": None}}}},
        "on": {"type": "session.update", "session": {"audio": {"input": {"wake_word": {"name": "alexa"}}}}},
        "ptt": {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}},
        "vad": {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {}}}}},
    }
    for step in steps:
        if step in audio:
            events += send(s, sim, audio[step], chunk_ms=100)
        elif step == "engine":
            if (out := sim.step()) is not None:
                events += sim.run(s.engine_output(out, 1.0))
        else:
            events += sim.run(s.receive_event(client[step], 1.0))
    events += run_until_quiet(s, sim, 2.0)
    created = [e["response"]["id"] for e in events if e["type"] == "response.created"]
    finished = [e["response"]["id"] for e in events if e["type"] == "response.done"]
    assert sorted(created) == sorted(finished) and len(set(finished)) == len(finished)
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) == len(turns(sim))
    assert s.idle
    for e in events:
        json.dumps(e, allow_nan=False)
