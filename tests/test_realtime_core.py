"""The sans-I/O session core without an event loop, a socket or a model: client events, audio and engine outputs go
in, server events and engine commands come out. `EngineSim` plays the engine's and the voice pool's side of the
command contract (turns are prepared, responses stream and end exactly once, cancels and resets end them, clauses
come back synthesised, in any order, unless cancelled) so the core's own rules can be checked on sequences no real
client would think of, including randomised ones (hypothesis), with text and with spoken answers."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.engine.api import ResponseDone, TurnInfo
from assistant.realtime import commands as C
from assistant.realtime.session import Session, SessionLimits
from assistant.realtime.settings import AudioOutput, SessionSettings, TurnDetection
from tests.server_util import silence, vowel

RATE_HZ = 16000


def done(rid: str, status: str = "completed", reason: str | None = None, text: str = "") -> ResponseDone:
    return ResponseDone(rid, status, reason, text, [1, 2], [3], 2, 1, {"total": 1.0})  # type: ignore[arg-type]


@dataclass
class EngineSim:
    """The engine's side of the contract, one step at a time (`step` delivers the oldest pending output)."""

    turns: list[str] = field(default_factory=list)  # keys waiting to be prepared
    responses: dict[str, list[C.EngineOutput]] = field(default_factory=dict)  # rid -> outputs still to deliver
    refuse_next: bool = False
    commands: list[C.EngineCommand] = field(default_factory=list)
    clauses: list[C.ClauseSpoken] = field(default_factory=list)  # synthesised clauses not delivered yet

    def run(self, outputs: list) -> list[dict]:
        events = []
        for out in outputs:
            if isinstance(out, dict):
                events.append(out)
            elif not isinstance(out, C.FirstText):
                self.commands.append(out)
                self.command(out)
        return events

    def command(self, cmd: C.EngineCommand) -> None:
        if isinstance(cmd, C.AddTurn):
            self.turns.append(cmd.utterance.key)
        elif isinstance(cmd, C.StartResponse):
            rid = cmd.response_id
            if self.refuse_next:
                self.refuse_next = False
                self.responses[rid] = [C.ResponseRefused(rid, "server_busy", "engine at capacity")]
            else:
                self.responses[rid] = [C.ResponseDelta(rid, "Hello"), C.ResponseDelta(rid, " there"), done_out(rid)]
        elif isinstance(cmd, C.Speak):  # 10 ms of 24 kHz audio per character
            self.clauses.append(C.ClauseSpoken(cmd.response_id, cmd.index, b"\x01\x00" * 240 * len(cmd.text), 5.0))
        elif isinstance(cmd, C.CancelSpeech):
            self.clauses = [c for c in self.clauses if c.response_id != cmd.response_id]
        elif isinstance(cmd, C.CancelResponse | C.ResetConversation | C.CloseConversation):
            reason = cmd.reason if isinstance(cmd, C.CancelResponse) else "conversation_reset"
            for rid, outs in self.responses.items():
                if (not isinstance(cmd, C.CancelResponse) or rid == cmd.response_id) and outs:
                    if isinstance(outs[-1], C.ResponseFinished):
                        outs[:] = [C.ResponseFinished(done(rid, "cancelled", reason))]

    def pending(self) -> bool:
        return bool(self.turns) or any(self.responses.values()) or bool(self.clauses)

    def step(self, fail_turn: bool = False, clause: int = 0) -> C.EngineOutput | None:
        """The next engine output; with `clause` > 0 a synthesised clause first (the clause-th one waiting, so
        clauses come back out of order)."""
        if clause and self.clauses:
            return self.clauses.pop(clause % len(self.clauses))
        if self.turns:
            key = self.turns.pop(0)
            return C.TurnFailed(key, "bad audio") if fail_turn else C.TurnPrepared(key, TurnInfo(key, "hi", "en", 1.0))
        for outs in self.responses.values():
            if outs:
                return outs.pop(0)
        return self.clauses.pop(0) if self.clauses else None


def done_out(rid: str) -> C.ResponseFinished:
    return C.ResponseFinished(done(rid, text="Hello there"))


NO_SPECULATION = TurnDetection(early_prepare_ms=0)


def new_session(td: TurnDetection | None = NO_SPECULATION, spoken: bool = False, **limits) -> Session:
    """A session as the hub opens it; `spoken`: the server has a voice, answers are audio by default."""
    voice = {"output_audio": True, "audio_out": AudioOutput.of_server(("joe",))} if spoken else {}
    st_ = SessionSettings(input_rate_hz=RATE_HZ, turn_detection=td, **voice)
    return Session("sess_t", st_, "ga", default_td=TurnDetection(), limits=SessionLimits(**limits))


def run_until_quiet(s: Session, sim: EngineSim, t: float) -> list[dict]:
    events = []
    while (out := sim.step()) is not None:
        events += sim.run(s.engine_output(out, t))
    return events


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def speech_pcm(ms: int) -> bytes:
    return vowel(ms, RATE_HZ).astype("<i2").tobytes()


def test_a_spoken_turn_is_committed_prepared_and_answered_once():
    s, sim = new_session(), EngineSim()
    events = sim.run(s.start(0.0))
    assert types(events) == ["session.created"] and isinstance(sim.commands[0], C.OpenConversation)
    events += sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    assert "input_audio_buffer.committed" in types(events)
    assert [type(c) for c in sim.commands[1:]] == [C.AddTurn]  # the answer waits for the turn's audio work
    events += run_until_quiet(s, sim, 2.0)
    t = types(events)
    assert t.index("conversation.item.input_audio_transcription.completed") < t.index("response.created")
    assert t.count("response.created") == t.count("response.done") == 1
    final = events[t.index("response.done")]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello there"
    assert s.idle


def test_barge_in_cancels_the_answer_and_the_next_turn_is_answered():
    s, sim = new_session(), EngineSim()
    sim.run(s.start(0.0))
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    sim.run(s.engine_output(sim.step(), 1.1))  # turn prepared -> response started
    [start] = [c for c in sim.commands if isinstance(c, C.StartResponse)]
    events = sim.run(s.receive_audio(speech_pcm(600), 1.2))  # the user talks over the answer
    assert "input_audio_buffer.speech_started" in types(events)
    assert C.CancelResponse(start.response_id, "turn_detected") in sim.commands
    events += sim.run(s.receive_audio(silence(900).tobytes(), 1.5))
    events += run_until_quiet(s, sim, 2.0)
    dones = [e["response"] for e in events if e["type"] == "response.done"]
    assert [d["status"] for d in dones] == ["cancelled", "completed"]
    assert dones[0]["status_details"]["reason"] == "turn_detected"


def test_push_to_talk_commit_then_create_and_a_refused_answer_still_ends():
    s, sim = new_session(td=None), EngineSim(refuse_next=True)
    sim.run(s.start(0.0))
    events = sim.run(s.receive_audio(speech_pcm(500), 0.5))
    assert events == []  # no VAD: nothing happens until the commit
    events += sim.run(s.receive_event({"type": "input_audio_buffer.commit"}, 1.0))
    events += sim.run(s.receive_event({"type": "response.create"}, 1.0))
    events += run_until_quiet(s, sim, 2.0)
    t = types(events)
    assert t.count("response.created") == t.count("response.done") == 1
    err = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in err] == ["server_busy"]
    final = events[t.index("response.done")]["response"]
    assert final["status"] == "failed" and final["status_details"]["error"]["code"] == "server_busy"


def test_a_failed_turn_still_gets_one_failed_response():
    s, sim = new_session(), EngineSim()
    sim.run(s.start(0.0))
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    events = sim.run(s.engine_output(sim.step(fail_turn=True), 1.1))
    t = types(events)
    assert t == ["error", "response.created", "response.done"] and events[0]["error"]["code"] == "turn_failed"
    assert events[2]["response"]["status"] == "failed" and s.idle


def test_the_job_queue_is_bounded_and_says_so():
    s, sim = new_session(td=None, max_jobs=2), EngineSim()
    sim.run(s.start(0.0))
    errors = []
    for i in range(4):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"q{i}"}]}
        events = sim.run(s.receive_event({"type": "conversation.item.create", "item": item}, 0.1))
        errors += [e["error"]["code"] for e in events if e["type"] == "error"]
    # one job runs, two wait, the fourth is refused with the documented code
    assert errors == ["server_busy"]
    assert [c.utterance.text for c in sim.commands if isinstance(c, C.AddTurn)] == ["q0"]


def test_close_cancels_the_answer_and_its_response_done_still_comes():
    s, sim = new_session(td=None), EngineSim()
    sim.run(s.start(0.0))
    sim.run(s.receive_event({"type": "response.create"}, 0.1))
    [start] = [c for c in sim.commands if isinstance(c, C.StartResponse)]
    sim.run(s.close())
    assert C.CancelResponse(start.response_id, "client_cancelled") in sim.commands
    assert isinstance(sim.commands[-1], C.CloseConversation)
    assert sim.run(s.receive_event({"type": "response.create"}, 0.2)) == []  # input after close is ignored
    events = run_until_quiet(s, sim, 0.3)
    assert types(events).count("response.done") == 1


def test_bad_input_gets_an_error_event_and_never_raises():
    s, sim = new_session(), EngineSim()
    sim.run(s.start(0.0))
    bad = ["{", "[]", '{"type": 5}', '{"type": "nope"}', '{"type": "session.update", "session": {"temperature": NaN}}']
    bad += ['{"type": "session.update", "session": {"turn_detection": {"silence_duration_ms": ' + "9" * 5000 + "}}}"]
    bad += ['{"type": "session.update", "session": ' + "[" * 5000 + "]" * 5000 + "}"]
    for frame in bad:
        events = sim.run(s.receive_text(frame, 0.1))
        assert types(events) == ["error"], frame
    assert sim.run(s.receive_audio(b"\x01\x02\x03", 0.1))[0]["error"]["code"] == "invalid_audio"
    digits = sim.run(s.receive_text(bad[-2], 0.1))[0]["error"]["message"]
    assert "digits" in digits and len(digits) < 300  # the 5,000-digit integer is named, not echoed


# ---- randomised sequences ----------------------------------------------------------------------------------------
def _item(text: str) -> dict:
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": text}]}}  # fmt: skip


CLIENT = st.sampled_from(
    [
        ("audio", speech_pcm(300)),
        ("audio", silence(400).tobytes()),
        ("audio", silence(700).tobytes()),
        ("event", {"type": "input_audio_buffer.append", "audio": base64.b64encode(speech_pcm(200)).decode()}),
        ("event", {"type": "input_audio_buffer.commit"}),
        ("event", {"type": "input_audio_buffer.clear"}),
        ("event", {"type": "response.create"}),
        ("event", {"type": "response.cancel"}),
        ("event", {"type": "conversation.reset"}),
        ("event", _item("what time is it")),
        ("event", _item("and tomorrow?")),
        ("event", _item("thanks")),
        ("event", {"type": "session.update", "session": {"turn_detection": None}}),
        ("event", {"type": "session.update", "session": {"turn_detection": {"type": "server_vad"}}}),
        (
            "event",
            {
                "type": "session.update",
                "session": {
                    "audio": {"input": {"turn_detection": {"create_response": False, "early_prepare_ms": 300}}}
                },
            },
        ),  # fmt: skip
        ("event", {"type": "session.update", "session": {"instructions": "Be brief."}}),
        ("text", "not json"),
    ]
)
ENGINE = st.tuples(st.just("engine"), st.booleans())  # deliver the engine's next output (True: a turn fails)
VOICE = st.tuples(st.just("voice"), st.integers(1, 3))  # deliver a synthesised clause (out of order)
SPOKEN_CLIENT = st.sampled_from(
    [
        ("event", {"type": "session.update", "session": {"output_modalities": ["text"]}}),
        ("event", {"type": "session.update", "session": {"output_modalities": ["audio"]}}),
        ("event", {"type": "response.create", "response": {"output_modalities": ["text"]}}),
        ("event", {"type": "conversation.item.truncate", "item_id": "last", "content_index": 0, "audio_end_ms": 70}),
        ("event", {"type": "conversation.item.retrieve", "item_id": "last"}),
    ]
)
STEP = st.one_of(CLIENT, CLIENT, CLIENT, ENGINE, ENGINE, st.tuples(st.just("refuse"), st.none()))
SPOKEN_STEP = st.one_of(STEP, VOICE, VOICE, SPOKEN_CLIENT)
AUDIO_EVENTS = ("response.output_audio.delta", "response.output_audio_transcript.delta")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, max_size=50), st.none() | st.integers(0, 50))
def test_no_sequence_doubles_a_response_done_loses_a_turn_or_raises(steps, close_at):
    check_random_sequence(steps, close_at, spoken=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SPOKEN_STEP, max_size=50), st.none() | st.integers(0, 50))
def test_spoken_answers_keep_the_same_rules_and_send_no_audio_after_done(steps, close_at):
    events = check_random_sequence(steps, close_at, spoken=True)
    open_responses: set[str] = set()
    for e in events:
        if e["type"] == "response.created":
            open_responses.add(e["response"]["id"])
        elif e["type"] == "response.done":
            open_responses.discard(e["response"]["id"])
        elif e["type"] in AUDIO_EVENTS:
            assert e["response_id"] in open_responses, "audio or transcript outside its response"


def check_random_sequence(steps, close_at, spoken: bool) -> list[dict]:
    s, sim = new_session(td=TurnDetection(early_prepare_ms=300), spoken=spoken), EngineSim()
    events = sim.run(s.start(0.0))
    committed: list[str] = []
    forgiven: set[str] = set()  # committed turns a later reset or a full queue legitimately dropped
    t = 0.0
    for i, (kind, arg) in enumerate(steps):
        if i == close_at:
            kind = "close"
        t += 0.05
        before = len(events)
        if kind == "audio":
            events += sim.run(s.receive_audio(arg, t))
        elif kind == "event":
            if arg.get("item_id") == "last":  # the newest item this session announced, or an unknown one
                items = [e.get("item", {}).get("id") for e in events if "item" in e] or ["item_unknown"]
                arg = {**arg, "item_id": items[-1]}
            events += sim.run(s.receive_event(arg, t))
        elif kind == "text":
            events += sim.run(s.receive_text(arg, t))
        elif kind in ("engine", "voice"):
            out = sim.step(fail_turn=arg is True) if kind == "engine" else sim.step(clause=arg)
            if out is not None:
                events += sim.run(s.engine_output(out, t))
        elif kind == "refuse":
            sim.refuse_next = True
        else:
            events += sim.run(s.close())
        new = events[before:]
        committed += [e["item"]["id"] for e in new if e["type"] == "conversation.item.added"]  # user turns
        if (
            kind == "event"
            and arg["type"] == "conversation.reset"
            or any(
                e["type"] == "error" and e["error"]["code"] == "server_busy" and "queued" in e["error"]["message"]
                for e in new
            )
        ):
            forgiven |= set(committed)
    events += run_until_quiet(s, sim, t + 1)
    created = [e["response"]["id"] for e in events if e["type"] == "response.created"]
    finished = [e["response"]["id"] for e in events if e["type"] == "response.done"]
    assert sorted(created) == sorted(finished) and len(set(finished)) == len(finished)
    turned = {c.utterance.key for c in sim.commands if isinstance(c, C.AddTurn)}
    lost = [k for k in committed if k not in turned and k not in forgiven and not s.closed]
    assert not lost, f"committed turns never handed to the engine: {lost}"
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    for e in events:
        json.dumps(e, allow_nan=False)  # never NaN in what we send
    if not s.closed:
        assert s.idle  # every job ran to its end
    return events


def test_push_to_talk_over_the_limit_keeps_the_newest_audio_and_says_so():
    s, sim = new_session(td=None, max_buffer_ms=1000), EngineSim()
    sim.run(s.start(0.0))
    sim.run(s.receive_audio(speech_pcm(1500), 0.5))
    events = sim.run(s.receive_event({"type": "input_audio_buffer.commit", "event_id": "c1"}, 1.0))
    [err] = [e["error"] for e in events if e["type"] == "error"]
    assert err["code"] == "input_audio_buffer_truncated" and err["event_id"] == "c1"
    assert "kept its newest 1000 ms" in err["message"] and "dropped the first 500 ms" in err["message"]
    [turn] = [c for c in sim.commands if isinstance(c, C.AddTurn)]
    assert len(turn.utterance.audio) == RATE_HZ  # exactly the newest second
    # the next turn starts clean: no stale truncation report
    sim.run(s.receive_audio(speech_pcm(300), 1.5))
    events = sim.run(s.receive_event({"type": "input_audio_buffer.commit"}, 2.0))
    assert "error" not in types(events)


def test_a_turn_refused_with_a_code_keeps_that_code():
    s, sim = new_session(), EngineSim()
    sim.run(s.start(0.0))
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 100}]}
    sim.run(s.receive_event({"type": "conversation.item.create", "item": item}, 0.1))
    events = sim.run(s.receive_event({"type": "response.create"}, 0.1))
    key = sim.step().key
    events += sim.run(s.engine_output(C.TurnFailed(key, "1200 tokens, the limit is 1024", "turn_too_long"), 0.2))
    events += run_until_quiet(s, sim, 0.3)
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["turn_too_long"]
    assert types(events).count("response.done") == 1  # the requested answer still ends
