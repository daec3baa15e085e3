"""Spoken answers in the sans-I/O core: clause order, cancel, barge-in, truncate/retrieve, text without a voice and
the session settings, driven without an event loop (`EngineSim` plays the engine and the voice pool). Every event
is validated strictly against the openai SDK's models of its dialect."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import TypeAdapter

from assistant.audio import g711
from assistant.audio.speech_text import heard_text
from assistant.engine.api import TurnInfo
from assistant.realtime import commands as C
from assistant.realtime import protocol as P
from assistant.realtime.session import Session
from assistant.realtime.settings import AudioOutput, SessionSettings, apply_session_update
from tests.test_realtime_core import EngineSim, done, speech_pcm, types

ADAPTERS = {"ga": TypeAdapter(GAServerEvent), "beta": TypeAdapter(BetaServerEvent)}
VOICED = AudioOutput.of_server(("joe",))


def spoken_session(dialect: str = "ga", **audio) -> Session:
    st_ = SessionSettings(
        input_rate_hz=16000, turn_detection=None, output_audio=True, audio_out=AudioOutput.of_server(("joe",), **audio)
    )
    return Session("sess_s", st_, dialect)  # type: ignore[arg-type]


def validated(events: list[dict], dialect: str) -> list[dict]:
    for e in events:
        ADAPTERS[dialect].validate_python(e, strict=True)
    return events


def ask(s: Session, sim: EngineSim, text: str = "hi") -> str:
    """A typed turn and response.create; the turn is prepared. Returns the response id."""
    sim.run(s.receive_event({"type": "conversation.item.create", "item": _user(text)}, 0.1))
    sim.run(s.receive_event({"type": "response.create"}, 0.1))
    key = sim.turns.pop(0)
    sim.run(s.engine_output(C.TurnPrepared(key, TurnInfo(key, None, None, 0.0)), 0.2))
    [start] = [c for c in sim.commands if isinstance(c, C.StartResponse)][-1:]
    sim.responses.pop(start.response_id)  # the test streams the answer itself
    return start.response_id


def _user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def stream(s: Session, sim: EngineSim, rid: str, *deltas: str) -> list[dict]:
    events: list[dict] = []
    for d in deltas:
        events += sim.run(s.engine_output(C.ResponseDelta(rid, d), 0.3))
    return events


def finish(s: Session, sim: EngineSim, rid: str, text: str, status: str = "completed", reason=None) -> list[dict]:
    return sim.run(s.engine_output(C.ResponseFinished(done(rid, status, reason, text)), 0.4))


def deliver(s: Session, sim: EngineSim, order: list[int] | None = None) -> list[dict]:
    """Hand the synthesised clauses back, in `order` of their indices (default: as submitted)."""
    waiting = {c.index: c for c in sim.clauses}
    sim.clauses.clear()
    events: list[dict] = []
    for i in order if order is not None else sorted(waiting):
        events += sim.run(s.engine_output(waiting[i], 0.5))
    return events


ANSWER = ("The capital of France is Paris.", " It is on the Seine.", " Many people visit it")


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_clauses_are_spoken_in_order_and_the_response_ends_after_the_last_audio(dialect):
    s, sim = spoken_session(dialect), EngineSim()
    events = sim.run(s.start(0.0))
    rid = ask(s, sim)
    events += stream(s, sim, rid, *ANSWER)
    speaks = [c for c in sim.commands if isinstance(c, C.Speak)]
    assert [c.text for c in speaks] == list(ANSWER[:2])  # complete clauses go to the voice while decoding goes on
    events += finish(s, sim, rid, "".join(ANSWER))
    assert "response.done" not in types(events)  # the audio of the last clauses is still being made
    events += deliver(s, sim, order=[2, 0, 1])  # syntheses finish in any order; the client hears them in order
    validated(events, dialect)
    prefix = "response.output_audio" if dialect == "ga" else "response.audio"
    sent = [e for e in events if e["type"] in (f"{prefix}.delta", f"{prefix}_transcript.delta")]
    transcripts = [e["delta"] for e in sent if "transcript" in e["type"]]
    assert transcripts == list(ANSWER)
    kinds = ["t" if "transcript" in e["type"] else "a" for e in sent]
    assert "".join(kinds).replace("a", "") == "ttt" and kinds[0] == "t" and kinds[1] == "a"
    pcm = b"".join(base64.b64decode(e["delta"]) for e in sent if "transcript" not in e["type"])
    assert len(pcm) == 2 * 240 * sum(len(a) for a in ANSWER)  # every sample the voice made, nothing more
    chunk_bytes = {len(base64.b64decode(e["delta"])) for e in sent if "transcript" not in e["type"]}
    assert max(chunk_bytes) == 2 * 24000 // 10  # deltas of 100 ms
    t = types(events)
    end = [f"{prefix}.done", f"{prefix}_transcript.done", "response.content_part.done", "response.output_item.done"]
    assert [x for x in t if x in end + ["response.done"]] == end + ["response.done"]
    final = events[-1]["response"]
    part = final["output"][0]["content"][0]
    assert part == {"type": "output_audio" if dialect == "ga" else "audio", "transcript": "".join(ANSWER)}
    assert final["status"] == "completed" and final["timings_ms"]["audio"] > 0
    assert {"first_clause", "first_audio", "synthesis"} <= set(final["timings_ms"])
    assert s.idle and not any(isinstance(c, C.TruncateReply) for c in sim.commands)


def test_cancel_after_the_text_is_done_stops_the_audio_at_once_and_cuts_the_history():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    stream(s, sim, rid, *ANSWER)
    finish(s, sim, rid, "".join(ANSWER))
    events = deliver(s, sim, order=[0])  # the first clause is out; two more are in the pool
    events += sim.run(s.receive_event({"type": "response.cancel"}, 0.6))
    t = types(events)
    assert t[-1] == "response.done" and events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["status_details"]["reason"] == "client_cancelled"
    assert C.CancelSpeech(rid) in sim.commands
    # the engine decoded all three clauses; the listener got only the first: that is what the history keeps
    assert C.TruncateReply(rid, ANSWER[0]) in sim.commands
    late = sim.run(s.engine_output(C.ClauseSpoken(rid, 1, b"\x01\x00" * 2400, 1.0), 0.7))
    assert late == [] and s.idle  # a clause finishing after the cancel is never sent


def test_barge_in_during_decoding_stops_the_audio_and_ends_cancelled():
    st_ = SessionSettings(input_rate_hz=16000, output_audio=True, audio_out=VOICED)
    s, sim = Session("sess_b", st_, "ga"), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    stream(s, sim, rid, ANSWER[0], ANSWER[1], " More")
    second = sim.clauses.pop(1)  # the second clause is still in the voice pool
    deliver(s, sim)  # the first clause is heard
    events = sim.run(s.receive_audio(speech_pcm(600), 1.0))  # the user talks over the answer
    assert "input_audio_buffer.speech_started" in types(events)
    assert C.CancelResponse(rid, "turn_detected") in sim.commands and C.CancelSpeech(rid) in sim.commands
    events += stream(s, sim, rid, " text. And")  # decoding had not stopped yet: nothing of it is sent
    events += sim.run(s.engine_output(second, 1.1))  # nor the clause that finished after the barge-in
    assert not [e for e in events if e["type"].startswith("response.output_audio")]
    events += finish(s, sim, rid, "".join(ANSWER[:2]) + " More text. And", "cancelled", "turn_detected")
    final = events[-1]["response"]
    assert final["status"] == "cancelled" and final["status_details"]["reason"] == "turn_detected"
    assert final["output"][0]["content"][0]["transcript"] == ANSWER[0]
    assert C.TruncateReply(rid, ANSWER[0]) in sim.commands


def test_chinese_text_is_sent_with_the_reason_it_has_no_audio():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    events = stream(s, sim, rid, "法国的首都是", "巴黎。", "它很美")
    events += finish(s, sim, rid, "法国的首都是巴黎。它很美")
    events += deliver(s, sim)
    validated(events, "ga")
    assert not [c for c in sim.commands if isinstance(c, C.Speak)]
    deltas = [e for e in events if e["type"] == "response.output_audio_transcript.delta"]
    assert [d["delta"] for d in deltas] == ["法国的首都是巴黎。", "它很美"]
    for d in deltas:
        assert d["no_audio"]["code"] == "no_voice_for_language" and d["no_audio"]["language"] == "zh"
        assert "no installed voice speaks 'zh'" in d["no_audio"]["message"]
    assert events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "法国的首都是巴黎。它很美"


def test_a_failed_synthesis_sends_the_text_and_says_why():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    stream(s, sim, rid, "Hello there.")
    events = finish(s, sim, rid, "Hello there.")
    events += sim.run(s.engine_output(C.SpeechFailed(rid, 0, "onnxruntime error"), 0.5))
    [delta] = [e for e in events if e["type"] == "response.output_audio_transcript.delta"]
    assert delta["no_audio"]["code"] == "speech_failed" and "onnxruntime error" in delta["no_audio"]["message"]
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "completed"


def test_truncate_cuts_the_item_and_the_history_to_what_was_heard_and_retrieve_shows_it():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    stream(s, sim, rid, *ANSWER)
    finish(s, sim, rid, "".join(ANSWER))
    events = deliver(s, sim)
    item_id = events[-1]["response"]["output"][0]["id"]
    first_ms = 10 * len(ANSWER[0])  # EngineSim: 10 ms of audio per character
    # the listener heard the first clause and about half of the second
    heard_ms = first_ms + 10 * len(ANSWER[1]) // 2
    ev = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": heard_ms}
    events = validated(sim.run(s.receive_event(ev, 1.0)), "ga")
    assert events == [events[0]] and events[0]["type"] == "conversation.item.truncated"
    assert events[0]["audio_end_ms"] == heard_ms and events[0]["item_id"] == item_id
    [cut] = [c for c in sim.commands if isinstance(c, C.TruncateReply)]
    assert cut.response_id == rid and cut.text == "The capital of France is Paris. It is on"
    got = validated(sim.run(s.receive_event({"type": "conversation.item.retrieve", "item_id": item_id}, 1.1)), "ga")
    assert got[0]["type"] == "conversation.item.retrieved"
    assert got[0]["item"]["content"] == [{"type": "output_audio", "transcript": cut.text}]
    # past the end of the (now shorter) audio nothing changes
    sim.run(s.receive_event({**ev, "audio_end_ms": 99999}, 1.2))
    assert len([c for c in sim.commands if isinstance(c, C.TruncateReply)]) == 1


def test_truncate_and_retrieve_errors_name_the_item():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    events = sim.run(s.receive_event({"type": "conversation.item.create", "item": _user("hi")}, 0.1))
    user_id = events[0]["item"]["id"]
    bad = [
        ({"type": "conversation.item.truncate", "item_id": "item_nope", "audio_end_ms": 5}, "item_not_found"),
        ({"type": "conversation.item.retrieve", "item_id": "item_nope"}, "item_not_found"),
        ({"type": "conversation.item.truncate", "item_id": user_id, "audio_end_ms": 5}, "item_not_truncatable"),
        ({"type": "conversation.item.truncate", "item_id": user_id, "audio_end_ms": -5}, "invalid_event"),
        ({"type": "conversation.item.truncate", "audio_end_ms": 5}, "invalid_event"),
    ]
    for event, code in bad:
        [err] = validated(sim.run(s.receive_event({**event, "event_id": "e1"}, 0.2)), "ga")
        assert err["error"]["code"] == code and err["error"]["event_id"] == "e1", event
    [err] = sim.run(s.receive_event({"type": "conversation.item.retrieve", "item_id": "x" * 100000}, 0.2))
    assert err["error"]["code"] == "item_not_found" and len(err["error"]["message"]) < 400  # not echoed whole
    [user] = validated(sim.run(s.receive_event({"type": "conversation.item.retrieve", "item_id": user_id}, 0.3)), "ga")
    assert user["item"]["content"] == [{"type": "input_text", "text": "hi"}]


def test_truncate_during_the_answer_stops_it_there():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    events = stream(s, sim, rid, ANSWER[0], ANSWER[1])
    events += deliver(s, sim)
    item_id = events[0]["item_id"]
    ev = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 120}
    events = sim.run(s.receive_event(ev, 0.6))
    assert C.CancelResponse(rid, "client_cancelled") in sim.commands
    assert types(events) == ["conversation.item.truncated"]
    events += finish(s, sim, rid, "".join(ANSWER), "cancelled", "client_cancelled")
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "The capital"
    assert C.TruncateReply(rid, "The capital") in sim.commands


def test_a_text_response_on_a_voice_server_is_todays_text_response():
    s, sim = spoken_session(), EngineSim()
    sim.run(s.start(0.0))
    sim.run(s.receive_event({"type": "session.update", "session": {"output_modalities": ["text"]}}, 0.05))
    rid = ask(s, sim)
    events = stream(s, sim, rid, "Hello.", " There")
    events += finish(s, sim, rid, "Hello. There")
    assert types(events) == ["response.output_text.delta"] * 2 + [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    assert not [c for c in sim.commands if isinstance(c, C.Speak)]
    assert events[-1]["response"]["output_modalities"] == ["text"]


def test_g711_output_is_8khz_one_byte_a_sample():
    s, sim = spoken_session(format="g711_ulaw"), EngineSim()
    sim.run(s.start(0.0))
    rid = ask(s, sim)
    stream(s, sim, rid, "Hi there.")
    finish(s, sim, rid, "Hi there.")
    [speak] = [c for c in sim.commands if isinstance(c, C.Speak)]
    assert speak.rate_hz == 8000
    pcm = (np.sin(np.arange(1600) / 5) * 8000).astype("<i2")
    events = sim.run(s.engine_output(C.ClauseSpoken(rid, 0, pcm.tobytes(), 1.0), 0.5))
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert audio == g711.encode(pcm, "g711_ulaw")


def test_session_settings_voice_speed_and_formats_in_both_dialects():
    st_ = SessionSettings(output_audio=True, audio_out=VOICED)
    # what the Agents SDK sends: an OpenAI voice name and the PCM format; accepted, echoed, no warning
    output = {"voice": "ash", "speed": 1.2, "format": {"type": "audio/pcm", "rate": 24000}}
    ga = {"output_modalities": ["audio"], "audio": {"output": output}}
    new, warnings = apply_session_update(st_, ga)
    assert warnings == [] and new.audio_out.voice == "joe" and new.audio_out.voice_label == "ash"
    assert new.audio_out.speed == 1.2 and new.audio_out.rate_hz == 24000 and new.output_audio
    beta, warnings = apply_session_update(st_, {"modalities": ["text"], "output_audio_format": "g711_alaw"})
    assert warnings == [] and not beta.output_audio and beta.audio_out.rate_hz == 8000
    ext, _ = apply_session_update(st_, {"output_sample_rate": 16000})
    assert ext.audio_out.rate_hz == 16000
    with pytest.raises(P.ProtocolError) as e:
        apply_session_update(st_, {"voice": "darth"})
    assert e.value.code == "unknown_voice" and "installed: joe" in e.value.message
    with pytest.raises(P.ProtocolError) as e:
        apply_session_update(st_, {"audio": {"output": {"speed": 4.0}}})
    assert e.value.code == "invalid_event" and e.value.param == "session.audio.output.speed"
    with pytest.raises(P.ProtocolError) as e:
        apply_session_update(st_, {"audio": {"output": {"format": {"type": "audio/opus"}}}})
    assert e.value.code == "unsupported_audio_format"
    # without a voice, audio requests are warned about and answers stay text
    text_only, warnings = apply_session_update(SessionSettings(), ga)
    assert not text_only.output_audio and {w.code for w in warnings} == {"audio_output_unsupported"}


@given(
    st.lists(st.tuples(st.text(alphabet="ab 。", min_size=1, max_size=12), st.integers(0, 500)), max_size=6),
    st.integers(0, 4000),
)
def test_heard_text_is_a_prefix_that_grows_with_the_audio(pieces, end_ms):
    full = "".join(t for t, _ in pieces).strip()
    heard = heard_text(pieces, end_ms)
    assert full.startswith(heard)
    assert heard_text(pieces, end_ms + 100).startswith(heard)
    if end_ms >= sum(ms for _, ms in pieces) and end_ms > 0:
        assert heard == full


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FORMAT = JSON | st.fixed_dictionaries(
    {}, optional={"type": JSON | st.sampled_from(["audio/pcm", "audio/pcmu"]), "rate": JSON | st.just(16000)}
)
OUTPUT = st.fixed_dictionaries(
    {}, optional={"voice": JSON | st.sampled_from(["joe", "ash"]), "speed": JSON | st.just(1.2), "format": FORMAT}
)
BETA = st.fixed_dictionaries(
    {},
    optional={
        "voice": JSON | st.just("alloy"),
        "speed": JSON,
        "output_audio_format": JSON | st.just("g711_ulaw"),
        "output_sample_rate": JSON | st.just(16000),
        "modalities": JSON | st.just(["audio", "text"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(BETA, OUTPUT)
def test_any_audio_output_payload_is_applied_or_refused_with_a_protocol_error(beta, output):
    st_ = SessionSettings(output_audio=True, audio_out=VOICED)
    for payload in (beta, {"audio": {"output": output}}):
        try:
            new, _ = apply_session_update(st_, payload)
        except P.ProtocolError:
            continue
        assert new.audio_out.voice == "joe" and 8000 <= new.audio_out.rate_hz <= 48000
