"""Protocol module without a server: parsing, session.update shapes (GA nested, beta flat, extensions), events."""

from __future__ import annotations

import base64
import json

import pytest
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import TypeAdapter

from assistant.realtime import protocol as P
from assistant.realtime import settings as S
from assistant.realtime.events import EventFactory

GA, BETA = TypeAdapter(GAServerEvent), TypeAdapter(BetaServerEvent)


def test_parse_events():
    audio = base64.b64encode(b"\x01\x00\x02\x00").decode()
    ev = P.parse_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": audio, "event_id": "e1"}))
    assert ev == P.AudioAppend("e1", b"\x01\x00\x02\x00")
    assert P.parse_client_event({"type": "response.cancel"}) == P.ResponseCancel(None, None)
    rc = P.parse_client_event({"type": "response.create", "response": {"max_output_tokens": 12}})
    assert rc.max_output_tokens == 12
    beta_rc = P.parse_client_event({"type": "response.create", "response": {"max_response_output_tokens": "inf"}})
    assert beta_rc.max_output_tokens is None
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_event({"type": "response.create", "response": {"max_output_tokens": 0}, "event_id": "x"})
    assert e.value.code == "invalid_event" and e.value.event_id == "x" and "max_output_tokens" in e.value.param
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_event(b"\xff\xfe")
    assert e.value.code == "invalid_json"


def test_ga_nested_update():
    st = S.SessionSettings()
    session = {
        "type": "realtime",
        "instructions": "Be nice.",
        "max_output_tokens": 50,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 800, "aggressiveness": 3},
            }
        },
    }
    new, warnings = S.apply_session_update(st, session)
    assert warnings == [] and new.instructions == "Be nice." and new.max_output_tokens == 50
    assert new.turn_detection.silence_duration_ms == 800 and new.turn_detection.aggressiveness == 3
    assert new.turn_detection.prefix_padding_ms == st.turn_detection.prefix_padding_ms  # untouched keys kept
    new2, _ = S.apply_session_update(new, {"audio": {"input": {"turn_detection": None}}, "input_sample_rate": 16000})
    assert new2.turn_detection is None and new2.input_rate_hz == 16000
    shown = EventFactory("ga").session(new2, "sess_1")
    GA.validate_python({"type": "session.updated", "event_id": "e", "session": shown}, strict=True)
    assert "rate" not in shown["audio"]["input"]["format"] and shown["input_sample_rate"] == 16000


def test_beta_flat_update_and_rendering():
    st = S.SessionSettings()
    session = {
        "modalities": ["text", "audio"],
        "input_audio_format": "pcm16",
        "voice": "alloy",
        "turn_detection": {"type": "server_vad", "create_response": False},
        "max_response_output_tokens": "inf",
        "temperature": 0.8,
    }
    new, warnings = S.apply_session_update(st, session)
    assert {w.code for w in warnings} == {"audio_output_unsupported"} and len(warnings) == 2
    assert new.turn_detection.create_response is False and new.temperature == 0.8
    shown = EventFactory("beta").session(new, "sess_1")
    BETA.validate_python({"type": "session.created", "event_id": "e", "session": shown}, strict=True)
    assert shown["modalities"] == ["text"]


def test_fatal_update_changes_nothing():
    st = S.SessionSettings()
    bad = {"instructions": "x", "turn_detection": {"min_speech_ms": -1}}
    with pytest.raises(P.ProtocolError) as e:
        S.apply_session_update(st, bad, "ev9")
    assert e.value.code == "invalid_event" and e.value.param == "session.turn_detection.min_speech_ms"
    assert e.value.event_id == "ev9"


def test_event_factory_ids_and_dialects():
    ga, beta = EventFactory("ga"), EventFactory("beta")
    ids = {ga.event("input_audio_buffer.cleared")["event_id"] for _ in range(1000)}
    assert len(ids) == 1000
    where = {"response_id": "r", "item_id": "i", "output_index": 0, "content_index": 0}
    assert ga.text_event("delta", **where, delta="a")["type"] == "response.output_text.delta"
    assert beta.text_event("delta", **where, delta="a")["type"] == "response.text.delta"
    err = ga.error(P.ProtocolError("unknown_event", "no", "type", "c1"))
    GA.validate_python(err, strict=True)
    assert err["error"] == {
        "type": "invalid_request_error",
        "code": "unknown_event",
        "message": "no",
        "param": "type",
        "event_id": "c1",
    }
    with pytest.raises(ValueError, match="undocumented"):
        P.ProtocolError("made_up_code", "x")
