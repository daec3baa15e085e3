"""Settings mean what they say, checked on the sans-I/O session core: every accepted `session.update` key is echoed
in `session.updated`; a key OpenAI's schema lacks gets `unknown_parameter` naming it, a key we cannot honour
`unsupported_parameter`, and neither changes anything; the Agents SDK's default session is accepted whole; semantic
VAD ends a turn by its words and eagerness; noise reduction cleans the audio the turn carries; beta sessions get
`conversation.created`; `rate_limits.updated` follows each `response.done`. Every server event here validates
strictly against the `openai` 3.57 SDK's own models."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from openai.types.beta.realtime import session_update_event_param as beta_params
from openai.types.realtime import (
    realtime_audio_config_input_param,
    realtime_audio_config_output_param,
    realtime_session_create_request_param,
)

from assistant.audio.semantic_vad import end_silence_ms, ending, max_silence_ms
from assistant.audio.vad import Committed, SpeechStopped, TurnDetection, VadSegmenter
from assistant.backends.base import Utterance
from assistant.config import EngineConfig, GenerationConfig
from assistant.engine.engine import Engine
from assistant.realtime import commands as C
from assistant.realtime import session_keys as K
from assistant.realtime.session import Session
from assistant.realtime.settings import AudioOutput, SessionSettings
from tests.server_util import TIMEOUT_S, golden_clips, silence
from tests.test_openai_sdk import strict
from tests.test_realtime_core import EngineSim, run_until_quiet, speech_pcm, types

# The Agents SDK's (`@openai/agents-realtime` 0.20.0) first session.update and its later one, as it sends them.
AGENTS_SDK_SESSION = {
    "type": "realtime",
    "instructions": "You are a helpful voice assistant.",
    "model": "local",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "noise_reduction": None,
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "semantic_vad"},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "speed": 1},
    },
}


def session(dialect: str = "ga", td: TurnDetection | None = None, **settings) -> tuple[Session, EngineSim, list]:
    st_ = SessionSettings(input_rate_hz=16000, audio_out=AudioOutput.of_server(("joe",)), **settings)
    if td is not None:
        st_ = SessionSettings(**{**st_.__dict__, "turn_detection": td})
    s, sim = Session("sess_k", st_, dialect, default_td=TurnDetection()), EngineSim()  # type: ignore[arg-type]
    return s, sim, sim.run(s.start(0.0))


def update(s: Session, sim: EngineSim, payload: dict, dialect: str = "ga") -> dict:
    """The one event a session.update answers with (session.updated or error), strictly validated."""
    [event] = sim.run(s.receive_event({"type": "session.update", "session": payload, "event_id": "u1"}, 0.5))
    strict(event, dialect)
    return event


# ---- the key tables are OpenAI's --------------------------------------------------------------------------------
def test_the_key_tables_are_the_sdks():
    assert set(realtime_session_create_request_param.RealtimeSessionCreateRequestParam.__annotations__) == (
        K.GA_SESSION_KEYS
    )
    assert set(beta_params.Session.__annotations__) == K.BETA_SESSION_KEYS
    ga_input = set(realtime_audio_config_input_param.RealtimeAudioConfigInputParam.__annotations__)
    assert ga_input | {"wake_word"} == K.AUDIO_INPUT_KEYS
    assert set(realtime_audio_config_output_param.RealtimeAudioConfigOutputParam.__annotations__) == (
        K.AUDIO_OUTPUT_KEYS
    )
    from openai.types.realtime import audio_transcription_param
    from openai.types.realtime import realtime_audio_input_turn_detection_param as td

    assert set(audio_transcription_param.AudioTranscriptionParam.__annotations__) == K.TRANSCRIPTION_KEYS
    assert set(td.ServerVad.__annotations__) == K.SERVER_VAD_KEYS
    assert set(td.SemanticVad.__annotations__) == K.SEMANTIC_VAD_KEYS


# ---- unknown and unsupported keys -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"foo": 1}, "session.foo"),
        ({"instructions": "x", "voices": "alloy"}, "session.voices"),
        ({"audio": {"inputs": {}}}, "session.audio.inputs"),
        ({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_ms": 500}}}}, None),
        ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}}}, None),
        ({"audio": {"input": {"transcription": {"model": "whisper-1", "lang": "en"}}}}, None),
        ({"audio": {"output": {"speed": 1, "pitch": 2}}}, "session.audio.output.pitch"),
        ({"input_audio_noise_reduction": {"type": "near_field", "level": 3}}, None),
        ({"tracing": {"workflow_name": "w", "trace_id": "t"}}, "session.tracing.trace_id"),
    ],
)
def test_an_unknown_key_gets_an_error_naming_it_and_changes_nothing(payload, param):
    s, sim, _ = session()
    before = s.settings
    event = update(s, sim, {**payload, "instructions": "changed?"} if "instructions" not in payload else payload)
    err = event["error"]
    assert event["type"] == "error" and err["code"] == "unknown_parameter" and err["event_id"] == "u1"
    assert err["message"].startswith(f"Unknown parameter: '{err['param']}'.")
    if param is not None:
        assert err["param"] == param
    assert s.settings == before


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": {"id": "pmpt_1"}}, "session.prompt"),
        ({"include": ["item.input_audio_transcription.logprobs"]}, "session.include"),
        ({"reasoning": {"effort": "low"}}, "session.reasoning"),
        ({"truncation": "disabled"}, "session.truncation"),
        ({"type": "transcription"}, "session.type"),
        ({"audio": {"input": {"transcription": {"model": "whisper-1", "languages": ["de"]}}}}, None),
        ({"audio": {"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}}}, None),
    ],
)
def test_a_setting_we_cannot_honour_is_refused_with_the_reason(payload, param):
    s, sim, _ = session()
    before = s.settings
    err = update(s, sim, payload)["error"]
    assert err["code"] == "unsupported_parameter" and "not supported by this server: " in err["message"]
    assert param is None or err["param"] == param
    assert s.settings == before


# ---- transcription language ----------------------------------------------------------------------------------
def test_a_transcription_language_is_echoed_and_every_turn_is_heard_in_it():
    s, sim, _ = session(languages=("en", "de", "zh"))
    tr = {"model": "whisper-1", "language": "de-DE"}
    got = update(s, sim, {"audio": {"input": {"transcription": tr}}})
    assert got["session"]["audio"]["input"]["transcription"] == {"model": "whisper-1", "language": "de"}
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    run_until_quiet(s, sim, 1.5)
    spoken = [c.utterance for c in sim.commands if isinstance(c, C.AddTurn | C.Speculate)]
    assert spoken and all(u.language == "de" for u in spoken)  # the speculation too: it must match the commit
    item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAAAA=="}]}
    sim.run(s.receive_event({"type": "conversation.item.create", "item": item}, 2.0))
    run_until_quiet(s, sim, 2.5)
    assert [c.utterance.language for c in sim.commands if isinstance(c, C.AddTurn)][-1] == "de"
    off = update(s, sim, {"input_audio_transcription": None})  # null (a beta key, either works): the server's choice
    assert off["session"]["audio"]["input"]["transcription"] is None
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 3.0))
    assert [c.utterance.language for c in sim.commands if isinstance(c, C.AddTurn)][-1] is None


def test_a_transcription_prompt_is_echoed_and_every_turn_is_heard_after_it():
    """`transcription.prompt` (names, spellings, the topic) goes with every spoken turn, speculations included, and
    with audio items; a non-string or a backend with no recogniser to prompt is refused."""
    s, sim, _ = session(languages=("en", "de"))
    tr = {"model": "whisper-1", "prompt": "Xavier, Kubernetes."}
    got = update(s, sim, {"audio": {"input": {"transcription": tr}}})
    assert got["session"]["audio"]["input"]["transcription"] == tr
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    run_until_quiet(s, sim, 1.5)
    spoken = [c.utterance for c in sim.commands if isinstance(c, C.AddTurn | C.Speculate)]
    assert spoken and all(u.prompt == "Xavier, Kubernetes." and u.language is None for u in spoken)
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    sim.run(s.receive_event({"type": "conversation.item.create", "item": item}, 2.0))
    run_until_quiet(s, sim, 2.5)
    assert [c.utterance.prompt for c in sim.commands if isinstance(c, C.AddTurn)][-1] == ""  # typed: nothing to hear
    err = update(s, sim, {"audio": {"input": {"transcription": {"model": "whisper-1", "prompt": ["x"]}}}})["error"]
    assert err["code"] == "invalid_event" and err["param"] == "session.audio.input.transcription.prompt"
    s, sim, _ = session(languages=())
    err = update(s, sim, {"audio": {"input": {"transcription": tr}}})["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == "session.audio.input.transcription.prompt"


@pytest.mark.parametrize(
    ("languages", "value", "code"),
    [
        (("en", "de"), "xx", "unknown_language"),
        (("en",), "de", "unknown_language"),  # an English-only recogniser (tiny.en)
        ((), "en", "unsupported_parameter"),  # a backend that hears audio as is (qwen-audio)
        (("en",), 7, "invalid_event"),
    ],
)
def test_a_language_the_recogniser_cannot_be_told_is_refused(languages, value, code):
    s, sim, _ = session(languages=languages)
    before = s.settings
    err = update(s, sim, {"audio": {"input": {"transcription": {"model": "whisper-1", "language": value}}}})["error"]
    assert err["code"] == code and err["param"] == "session.audio.input.transcription.language"
    if code == "unknown_language":
        assert "en" in err["message"] and "null to detect" in err["message"]
    assert s.settings == before


def test_off_values_of_unhonourable_keys_are_accepted():
    s, sim, _ = session()
    event = update(s, sim, {"prompt": None, "include": [], "reasoning": None, "truncation": "auto"})
    assert event["type"] == "session.updated"


# ---- accepted settings are echoed -------------------------------------------------------------------------------
def test_the_agents_sdk_session_is_accepted_whole_and_echoed():
    s, sim, _ = session()
    got = update(s, sim, AGENTS_SDK_SESSION)["session"]
    inp = got["audio"]["input"]
    assert inp["transcription"] == {"model": "gpt-4o-mini-transcribe"} and inp["noise_reduction"] is None
    assert inp["turn_detection"]["type"] == "semantic_vad" and inp["turn_detection"]["eagerness"] == "auto"
    assert got["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "joe", "speed": 1.0}
    assert got["output_modalities"] == ["audio"]
    later = update(s, sim, {"type": "realtime", "tracing": "auto"})["session"]
    assert later["tracing"] == "auto" and later["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"


def test_ga_settings_are_echoed_as_given():
    s, sim, _ = session()
    payload = {
        "parallel_tool_calls": False,
        "tracing": {"workflow_name": "voice"},
        "audio": {
            "input": {
                "noise_reduction": {"type": "far_field"},
                "transcription": {"model": "whisper-1"},
                "turn_detection": {"type": "semantic_vad", "eagerness": "high", "create_response": False},
            },
            "output": {"voice": "marin", "speed": 1.25, "format": {"type": "audio/pcmu"}},
        },
    }
    got = update(s, sim, payload)["session"]
    assert got["parallel_tool_calls"] is False and got["tracing"] == {"workflow_name": "voice"}
    inp = got["audio"]["input"]
    assert inp["noise_reduction"] == {"type": "far_field"} and inp["transcription"] == {"model": "whisper-1"}
    assert inp["turn_detection"]["eagerness"] == "high" and inp["turn_detection"]["create_response"] is False
    assert got["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.25}
    off = update(s, sim, {"audio": {"input": {"noise_reduction": None, "transcription": None}}, "tracing": None})
    assert off["session"]["audio"]["input"]["noise_reduction"] is None and "tracing" not in off["session"]
    assert off["session"]["audio"]["input"]["transcription"] is None


def test_beta_settings_are_echoed_as_given():
    s, sim, _ = session("beta")
    payload = {
        "input_audio_transcription": {"model": "gpt-4o-transcribe"},
        "input_audio_noise_reduction": {"type": "near_field"},
        "turn_detection": {"type": "semantic_vad", "eagerness": "low"},
        "tracing": "auto",
        "speed": 0.8,
        "voice": "alloy",
    }
    got = update(s, sim, payload, "beta")["session"]
    assert got["input_audio_transcription"] == {"model": "gpt-4o-transcribe"}
    assert got["input_audio_noise_reduction"] == {"type": "near_field"}
    assert got["turn_detection"]["eagerness"] == "low" and got["tracing"] == "auto"
    assert got["speed"] == 0.8 and got["voice"] == "alloy"


# ---- beta conversation.created, rate_limits.updated -------------------------------------------------------------
def test_beta_gets_conversation_created_after_session_created_and_ga_does_not():
    _, _, beta = session("beta")
    assert types(beta) == ["session.created", "conversation.created"]
    strict(beta[1], "beta")
    assert beta[1]["conversation"]["object"] == "realtime.conversation" and beta[1]["conversation"]["id"]
    _, _, ga = session("ga")
    assert types(ga) == ["session.created"]


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_rate_limits_follow_each_response_done(dialect):
    s, sim, _ = session(dialect, td=None, output_audio=False)
    events = sim.run(s.receive_event({"type": "response.create"}, 1.0))
    events += sim.run(s.receive_event({"type": "response.create"}, 1.0))  # refused: one is in progress
    events += run_until_quiet(s, sim, 1.1)
    t = types(events)
    assert t.count("rate_limits.updated") == t.count("response.done") == 1
    i = t.index("rate_limits.updated")
    assert t[i - 1] == "response.done"
    limits = strict(events[i], dialect)
    [rl] = limits.rate_limits
    assert rl.name == "requests" and rl.limit == s.limits.max_jobs and rl.remaining == s.limits.max_jobs
    assert rl.reset_seconds == 0.0


# ---- semantic VAD -----------------------------------------------------------------------------------------------
def test_words_decide_the_ending():
    assert ending("What is the capital of France?") == "complete"
    assert ending("Turn on the lights.") == "complete"
    assert ending("What is the capital of") == "incomplete"
    assert ending("I want to go to the...") == "incomplete"
    assert ending("Set a timer for ten minutes and,") == "incomplete"
    assert ending("Um.") == "incomplete"
    assert ending("Paris") == "unclear" and ending(None) == "unclear" and ending("  ") == "unclear"
    for e in ("low", "medium", "high"):
        waits = [end_silence_ms(t, e) for t in ("Hello there.", "Hello there", "Hello and")]
        assert waits == sorted(waits) and waits[0] < waits[2] == max_silence_ms(e)
    assert [max_silence_ms(e) for e in ("high", "medium", "low")] == [2000, 4000, 8000]  # OpenAI's longest waits
    assert end_silence_ms("Hi.", "auto") == end_silence_ms("Hi.", "medium")


def _speculated(sim: EngineSim) -> C.Speculate:
    [spec] = [c for c in sim.commands if isinstance(c, C.Speculate)][-1:]
    return spec


def _semantic_turn(eagerness: str, words: str | None, silence_before_words_ms: int = 450):
    """A semantic-VAD session hears 800 ms of speech and `silence_before_words_ms` of silence, then the words of
    the tentative audio. Returns the session, the engine, the events after the words, and the key."""
    td = TurnDetection(type="semantic_vad", eagerness=eagerness)  # type: ignore[arg-type]
    s, sim, _ = session(td=td, output_audio=False)
    events = sim.run(s.receive_audio(speech_pcm(800) + silence(silence_before_words_ms).tobytes(), 1.0))
    assert "input_audio_buffer.committed" not in types(events)
    spec = _speculated(sim)
    assert spec.heard and spec.utterance.key == events[0]["item_id"]  # the words are asked for
    return s, sim, sim.run(s.engine_output(C.TurnHeard(spec.utterance.key, words), 1.5)), spec.utterance.key


def _silence_until_commit(s: Session, sim: EngineSim, limit_ms: int) -> int:
    """Feed silence 30 ms at a time; the silence fed until the turn was committed (or `limit_ms`)."""
    for fed in range(30, limit_ms + 30, 30):
        if "input_audio_buffer.committed" in types(sim.run(s.receive_audio(silence(30).tobytes(), 2.0))):
            return fed
    return limit_ms + 30


def test_semantic_vad_ends_a_complete_question_at_once_when_eager():
    s, sim, events, key = _semantic_turn("high", "What is the capital of France?")
    assert types(events)[:2] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    add = [c for c in sim.commands if isinstance(c, C.AddTurn)][-1]
    assert add.utterance.key == key and add.confirm  # the speculation's audio is the turn: its work is reused


def test_semantic_vad_waits_longer_for_a_phrase_left_open():
    # medium: a complete question ends after 500 ms of silence, an open phrase only after 4000 ms
    s, sim, events, _ = _semantic_turn("medium", "What is the capital of France?")
    assert "input_audio_buffer.committed" not in types(events)
    complete_ms = 450 + _silence_until_commit(s, sim, 6000)
    s, sim, events, _ = _semantic_turn("medium", "What is the capital of")
    assert "input_audio_buffer.committed" not in types(events)
    open_ms = 450 + _silence_until_commit(s, sim, 6000)
    s, sim, events, _ = _semantic_turn("medium", None)  # a backend without words
    unclear_ms = 450 + _silence_until_commit(s, sim, 6000)
    # webrtcvad's own hang-over counts the first frames of silence as speech, hence the ranges
    assert 500 <= complete_ms < 700 and 1200 <= unclear_ms < 1400 and 4000 <= open_ms < 4200
    s, sim, _, _ = _semantic_turn("low", "What is the capital of")
    assert 8000 <= 450 + _silence_until_commit(s, sim, 9000) < 8200


def test_semantic_vad_ignores_the_words_of_a_turn_that_went_on():
    td = TurnDetection(type="semantic_vad", eagerness="high")
    s, sim, _ = session(td=td, output_audio=False)
    sim.run(s.receive_audio(speech_pcm(800) + silence(450).tobytes(), 1.0))
    old = _speculated(sim).utterance.key
    events = sim.run(s.receive_audio(speech_pcm(600), 1.2))  # speech resumed: that tentative audio is void
    assert any(isinstance(c, C.Discard) and c.key == old for c in sim.commands)
    events = sim.run(s.engine_output(C.TurnHeard(old, "What is it?"), 1.3))  # late words of the old audio
    assert events == [] and _silence_until_commit(s, sim, 600) > 600  # nothing ends the turn early


def test_server_vad_never_asks_for_words():
    s, sim, _ = session(td=TurnDetection(), output_audio=False)
    sim.run(s.receive_audio(speech_pcm(800) + silence(900).tobytes(), 1.0))
    assert not _speculated(sim).heard
    assert [c for c in sim.commands if isinstance(c, C.AddTurn)]


def test_the_segmenter_ends_a_turn_when_told():
    seg = VadSegmenter(TurnDetection(type="semantic_vad", early_prepare_ms=0))
    events = seg.feed(np.concatenate([np.frombuffer(speech_pcm(600), np.int16), silence(900)]))
    assert not any(isinstance(e, Committed) for e in events) and seg.in_speech  # 4000 ms until told
    ended = seg.end_turn_after(500)
    assert [type(e) for e in ended] == [SpeechStopped, Committed]
    assert seg.end_turn_after(100) == []  # no turn open


# ---- noise reduction --------------------------------------------------------------------------------------------
def test_noise_reduction_cleans_the_audio_the_turn_carries():
    rng = np.random.default_rng(0)
    hiss = (rng.standard_normal(16000 * 2) * 600).astype(np.int16)  # 2 s of noise, then speech over noise
    speech = np.frombuffer(speech_pcm(800), np.int16)
    noisy = np.concatenate([hiss[:16000], speech + hiss[16000 : 16000 + len(speech)], hiss[:16000]])

    def lead_rms(nr: dict | None) -> float:
        s, sim, _ = session(td=TurnDetection(early_prepare_ms=0, aggressiveness=3), output_audio=False)
        if nr is not None:
            assert update(s, sim, {"audio": {"input": {"noise_reduction": nr}}})["type"] == "session.updated"
        sim.run(s.receive_audio(noisy.tobytes(), 1.0))
        [add] = [c for c in sim.commands if isinstance(c, C.AddTurn)]
        lead = add.utterance.audio[: 16000 * 200 // 1000]  # the pre-roll: noise only
        return float(np.sqrt(np.mean(lead.astype(np.float64) ** 2)))

    plain, near, far = lead_rms(None), lead_rms({"type": "near_field"}), lead_rms({"type": "far_field"})
    assert far < near < plain / 2  # WebRTC NS: 18 dB and 12 dB of suppression once its noise estimate settled


# ---- the engine's side: a speculation reports what it heard -----------------------------------------------------
async def test_a_speculation_reports_its_words_and_always_resolves(server_tiny_backend):
    engine = Engine(server_tiny_backend, EngineConfig(), GenerationConfig(greedy=True, max_new_tokens=4))
    await engine.start()
    try:
        engine.open_session("s")
        clip = golden_clips()[0]
        heard = engine.speculate_user_turn("s", Utterance("a", audio=clip), heard=True)
        info = await asyncio.wait_for(asyncio.wrap_future(heard), TIMEOUT_S)
        assert info is not None and info.item_id == "a" and info.transcript is None  # Qwen-Audio hears no words
        assert engine.speculate_user_turn("s", Utterance("b", audio=clip)) is None  # fire and forget
        gone = engine.speculate_user_turn("s", Utterance("c", audio=clip), heard=True)
        engine.close_session("s")  # closed before or while it runs: its listener still hears (None or the words)
        await asyncio.wait_for(asyncio.wrap_future(gone), TIMEOUT_S)
    finally:
        await engine.stop()


@pytest.mark.slow  # the real Whisper base weights
def test_noise_reduction_helps_the_recogniser_on_noisy_speech(tmp_path):
    """One espeak-ng question in white noise at 5 dB SNR, as bench/noise_reduction.py makes it: the recogniser
    makes fewer word errors on the near_field-suppressed audio than on the raw audio, and no more on the far_field one
    (bench/noise_reduction.py has the full grid of noises, levels and voices)."""
    from bench.asr_set import word_errors
    from bench.noise_reduction import denoised, noisy, transcriber
    from bench.spoken_set import synthesize

    text = "What is the capital of France?"
    speech = synthesize(text, tmp_path / "q.wav")
    pcm = noisy(np.asarray(speech, np.float32), "white", 5.0, np.random.default_rng(1))
    run = transcriber()
    raw, near, far = (word_errors(text, run(denoised(pcm, mode))) for mode in ("none", "near_field", "far_field"))
    assert near < raw and far <= raw, (raw, near, far)
