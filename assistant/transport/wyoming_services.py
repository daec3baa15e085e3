"""The services behind the Wyoming port, each on the part the other transports already use: the `info` answer, `asr`
(one transcription = a realtime session in push-to-talk), `handle` (one realtime session per conversation id: a
text turn is `conversation.item.create` + `response.create`, so history, its token budget and KV-cache reuse are
exactly a realtime session's) and `tts` (the process's one `SpeechPool`, clause by clause).

    info = build_info(cfg, voice)                     # describe -> info (asr, handle, tts, wake)
    t = Transcription(hub, rate_hz, report, close); await t.open(); t.feed(pcm); text = await t.finish()
    reply = await conversations.answer(text, language, conversation_id)      # Handled | NotHandled, never raises
    s = SpeechStream(pool, cfg.voice, write); await s.feed(text) ...; await s.finish()

No sockets here: requests come in as calls, results go out as `wyoming` events through the transport's callbacks.
Refusals are `WyomingError`s with a code from `ERROR_CODES` (the realtime protocol's codes keep their meaning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, NotHandled
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
    WakeModel,
    WakeProgram,
)

import assistant
from assistant.audio.resample import StreamResampler
from assistant.audio.speech_text import language_code
from assistant.audio.voice import (
    ClauseSplitter,
    Speech,
    SpeechPool,
    has_words,
    unspeakable_reason,
    voice_language,
)
from assistant.audio.wake_word import Detection, WakeWordDetector, installed_wake_words, wake_phrase
from assistant.config import Config, VoiceConfig
from assistant.engine.api import new_id
from assistant.realtime.protocol import ERROR_CODES as REALTIME_ERROR_CODES
from assistant.transport.hub import SessionHub, SessionLimitReached

log = logging.getLogger("assistant.wyoming")

ASR_TRANSPORT = "wyoming"  # hub transport of transcriptions (capacity: wyoming.max_connections)
CONVERSATION_TRANSPORT = "wyoming_conversation"  # hub transport of conversations (wyoming.max_conversations)
# The name of every program in `info`: Home Assistant names its entities after it (stt.qwen_assistant,
# conversation.qwen_assistant, tts.qwen_assistant) and its integration entry after the first one.
PROGRAM = "qwen-assistant"
SAMPLES_PER_CHUNK = 1024  # audio-chunk size sent by tts (what wyoming-piper sends)
SPEECH_LOOKAHEAD = 2  # clauses of one stream queued in the shared pool at once (others' clauses interleave)

# Wyoming-only error codes; the realtime protocol's codes (`REALTIME_ERROR_CODES`) are used with their meaning.
WYOMING_ERROR_CODES: dict[str, str] = {
    "model_loading": "asr or handle before the model is loaded; retry when /healthz says ok",
    "service_unavailable": "a service this configuration does not offer (asr with qwen-audio, tts without a voice)",
    "unknown_voice": "synthesize names a voice this server does not have",
    "unspeakable_text": "text the voice cannot read (another script, e.g. Chinese for the English voice); skipped",
    "request_in_progress": "a second request of the same kind on one connection before the first one ended",
    "audio_not_started": "audio-chunk or audio-stop without audio-start first",
    "tts_failed": "the voice failed on a clause (logged); the rest is still spoken",
    "unknown_wake_word": "detect names a wake-word model this server does not have (the message lists them)",
}

# Whisper's language tokens (the multilingual models), what its language detection may return.
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
).split()
# Names the LLM understands in "Answer in <language>." (other codes are named by their code).
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch",
    "pt": "Portuguese", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "sv": "Swedish", "da": "Danish",
    "nb": "Norwegian", "no": "Norwegian", "fi": "Finnish", "cs": "Czech", "tr": "Turkish", "el": "Greek",
    "hu": "Hungarian", "ro": "Romanian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic",
    "he": "Hebrew", "hi": "Hindi", "vi": "Vietnamese", "th": "Thai", "id": "Indonesian",
}  # fmt: skip


class WyomingError(Exception):
    """A request this server refuses; the transport sends one `error` event (text, code) and goes on."""

    def __init__(self, code: str, text: str) -> None:
        if code not in WYOMING_ERROR_CODES and code not in REALTIME_ERROR_CODES:
            raise ValueError(f"undocumented Wyoming error code {code!r}; add it to WYOMING_ERROR_CODES")
        super().__init__(text)
        self.code, self.text = code, text


# ---- describe -> info ------------------------------------------------------------------------------------------------
def _artifact(name: str, description: str, by: str, url: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "attribution": Attribution(name=by, url=url),
        "installed": True,
        "version": assistant.__version__,
    }


def asr_available(cfg: Config) -> bool:
    """Transcripts exist only on the embedded backend (Qwen-Audio hears audio directly and writes none)."""
    return cfg.model.backend == "embedded"


def build_info(cfg: Config, voice: SpeechPool | None) -> Info:
    """Everything this port offers, built once at start (no model needed: `describe` is answered at once)."""
    info = Info()
    if asr_available(cfg):
        model = f"whisper-{cfg.embedded.whisper}"
        langs = ["en"] if model.endswith(".en") else list(WHISPER_LANGUAGES)
        asr = _artifact(
            model, f"Whisper {cfg.embedded.whisper}, embedded", "OpenAI", "https://github.com/openai/whisper"
        )
        info.asr.append(AsrProgram(**{**asr, "name": PROGRAM}, models=[AsrModel(**asr, languages=langs)]))
    if cfg.model.backend == "embedded":
        llm = _artifact(
            "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct", "Qwen", "https://qwenlm.github.io"
        )
    else:
        llm = _artifact("qwen-audio-chat", "Qwen-Audio-Chat", "Qwen", "https://github.com/QwenLM/Qwen-Audio")
    # A question arrives in any language Whisper hears (or typed); the LLM is told to answer in the one asked.
    # Home Assistant (2025.1) offers a conversation agent only for the languages listed here.
    handle_langs = list(WHISPER_LANGUAGES)
    info.handle.append(HandleProgram(**{**llm, "name": PROGRAM}, models=[HandleModel(**llm, languages=handle_langs)]))
    if voice is not None:
        name = voice.params.name
        tts = _artifact(name, f"Piper voice {name}", "Piper (rhasspy)", "https://github.com/rhasspy/piper")
        v = TtsVoice(**tts, languages=[voice_language(name)])
        info.tts.append(TtsProgram(**{**tts, "name": PROGRAM}, voices=[v], supports_synthesize_streaming=True))
    by = ("pymicro-wakeword (microWakeWord)", "https://github.com/OHF-Voice/pymicro-wakeword")
    models = [
        WakeModel(**_artifact(n, wake_phrase(n), *by), languages=["en"], phrase=wake_phrase(n))
        for n in installed_wake_words()
    ]
    info.wake.append(WakeProgram(**{**_artifact(PROGRAM, "Wake words, embedded", *by)}, models=models))
    return info


# ---- wake ------------------------------------------------------------------------------------------------------------
def wake_names(names: Any) -> list[str]:
    """The models a `detect {names}` asks for (every installed one for none/empty), or `WyomingError` naming them."""
    installed = installed_wake_words()
    if names is None or names == []:
        return list(installed)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WyomingError("invalid_event", f"detect: names must be a list of strings, got {str(names)[:200]}")
    unknown = [n for n in names if n not in installed]
    if unknown:
        shown_unknown = ", ".join(repr(n[:60]) for n in unknown[:8])
        msg = f"detect: wake word(s) {shown_unknown} not installed; installed: {', '.join(installed)}"
        raise WyomingError("unknown_wake_word", msg)
    return list(dict.fromkeys(names))


class WakeStream:
    """One `detect`: the named wake-word models (every installed one when none is named) listen to one audio stream
    (any rate, 16-bit mono: the transport converts width and channels). Detections are stamped in milliseconds of
    audio since `audio-start`, which is what a satellite reads. Pure computation (~4 ms of CPU per second of audio per
    model), so it runs on the event loop and needs no model loaded."""

    def __init__(self, names: list[str], rate_hz: int) -> None:
        wanted = names
        self._detectors = [WakeWordDetector(n) for n in wanted]
        self._resampler = StreamResampler(rate_hz)
        self.detected = False

    def feed(self, pcm: bytes) -> list[Detection]:
        if len(pcm) % 2:
            raise WyomingError("invalid_audio", f"audio-chunk of {len(pcm)} bytes is not whole 16-bit samples")
        samples = self._resampler.process(np.frombuffer(pcm, dtype=np.int16))
        found = sorted((d for det in self._detectors for d in det.process(samples)), key=lambda d: d.audio_end_ms)
        self.detected = self.detected or bool(found)
        return found


# ---- asr -------------------------------------------------------------------------------------------------------------
# A transcription: push-to-talk (audio-stop commits), no wake word (Home Assistant's satellites do that), text out.
_ASR_SESSION = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "output_modalities": ["text"],
        "audio": {"input": {"turn_detection": None, "wake_word": None}},
    },
}
# A conversation answers in text: Home Assistant speaks it with the tts it chose.
_CONVERSATION_SESSION = {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}}
# Session errors after which the transcript still comes (the turn was only shortened).
_ASR_WARNINGS = frozenset({"input_audio_buffer_truncated", "invalid_audio"})


class Transcription:
    """One `transcribe`: audio in, one transcript out, through a realtime session in push-to-talk (its buffer bound,
    resampling and checks). `report(error)` forwards the session's warnings; `close(code, reason)` ends the
    Wyoming connection when the hub ends the session (idle, shutdown). `language` (the `transcribe` event's, Home
    Assistant's pipeline language) is the session's transcription language: Whisper is told it, not left to guess;
    one the recogniser does not know is reported (`unknown_language`) and the language is detected."""

    def __init__(
        self,
        hub: SessionHub,
        rate_hz: int,
        report: Callable[[WyomingError], None],
        close: Callable[[int, str], Awaitable[None]],
        language: str | None = None,
    ) -> None:
        self.hub, self.rate_hz, self._report, self._close = hub, rate_hz, report, close
        self.language = language
        self._conn: Any = None
        self._result: asyncio.Future[str] | None = None

    async def open(self) -> None:
        try:
            self._conn = self.hub.open(ASR_TRANSPORT, self._on_event, self._close, "ga", self.rate_hz)
        except SessionLimitReached as e:
            raise WyomingError("server_busy", str(e)) from None
        await self._conn.start()
        self._conn.receive_event(_ASR_SESSION)
        if self.language and self.hub.languages:  # an update of its own: a language refused leaves push-to-talk on
            told = {"transcription": {"model": "whisper-1", "language": self.language}}
            self._conn.receive_event({"type": "session.update", "session": {"audio": {"input": told}}})

    def feed(self, pcm: bytes) -> None:
        self._conn.receive_audio(pcm)

    async def finish(self) -> str:
        """Commit the audio; the transcript (raises WyomingError when the turn could not be transcribed)."""
        self._result = asyncio.get_running_loop().create_future()
        self._conn.receive_event({"type": "input_audio_buffer.commit"})
        return await self._result

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind, result = ev.get("type"), self._result
        if kind == "conversation.item.input_audio_transcription.completed":
            if result is not None and not result.done():
                result.set_result(ev["transcript"])
        elif kind == "error":
            err = ev["error"]
            if result is not None and not result.done() and err["code"] not in _ASR_WARNINGS:
                result.set_exception(WyomingError(err["code"], err["message"]))
            else:
                self._report(WyomingError(err["code"], err["message"]))


# ---- handle ----------------------------------------------------------------------------------------------------------
@dataclass
class _Answer:
    done: asyncio.Future[tuple[str, str, str | None]]  # (status, text, why it failed)
    error: str | None = None  # the first error the session reported while answering


@dataclass
class _Conversation:
    conn: Any = None
    language: str | None = None
    answer: _Answer | None = None  # the request being answered (until its response.done, even if abandoned)


def language_instruction(base: str, language: str | None) -> str:
    """The system text of a conversation asked in `language` (None: the backend's default)."""
    if not language:
        return ""
    code = language_code(language)
    name = LANGUAGE_NAMES.get(code, f"the language with code '{code}'")
    return f"{base} Answer in {name}."


class Conversations:
    """`handle`: one realtime session per conversation id (hub transport `wyoming_conversation`: its capacity and
    idle expiry are `wyoming.max_conversations` / `wyoming.conversation_idle_s`). When all slots are taken, the least
    recently used conversation that is not answering is forgotten to make room. A transcript without a conversation
    id is a conversation of one turn."""

    def __init__(self, hub: SessionHub) -> None:
        self.hub = hub
        self._by_id: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    async def answer(self, text: str, language: str | None, conversation_id: str | None) -> Handled | NotHandled:
        if not text.strip():
            return NotHandled("Nothing to answer: the transcript is empty.")
        conv_id = conversation_id or new_id("conv")
        try:
            conv = await self._conversation(conv_id)
        except SessionLimitReached as e:
            return NotHandled(f"Sorry, the assistant is busy ({e}).")
        if conv.answer is not None:
            return NotHandled("Sorry, this conversation is still answering its previous request; ask again then.")
        self._set_language(conv, language)
        answer = conv.answer = _Answer(asyncio.get_running_loop().create_future())
        conn = conv.conn
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        conn.receive_event({"type": "conversation.item.create", "item": item})
        conn.receive_event({"type": "response.create"})
        try:
            status, reply, why = await answer.done
        except asyncio.CancelledError:  # the client left: stop the answer if it runs (it stays in the history)
            if conn.session.response_id is not None:
                conn.receive_event({"type": "response.cancel"})
            raise
        finally:
            if conversation_id is None:
                await self._forget(conv_id)
        context = {"conversation_id": conv_id} if conversation_id else None
        if status in ("completed", "incomplete") and reply:
            return Handled(reply, context)
        return NotHandled(f"Sorry, I could not answer: {why or status}.", context)

    async def close(self) -> None:
        for conv_id in list(self._by_id):
            await self._forget(conv_id)

    async def _conversation(self, conv_id: str) -> _Conversation:
        conv = self._by_id.get(conv_id)
        if conv is not None and not conv.conn.closed:
            self._by_id.move_to_end(conv_id)
            return conv
        if conv is not None:  # its session was closed under it (shutdown)
            del self._by_id[conv_id]
        conv = _Conversation()

        def on_event(ev: dict[str, Any]) -> None:
            self._on_event(conv, ev)

        async def on_close(code: int, reason: str) -> None:  # the hub ends it (idle expiry, shutdown)
            if self._by_id.get(conv_id) is conv:
                del self._by_id[conv_id]
            log.info("conversation %s forgotten: %s", conv_id, reason)

        while True:
            try:
                conv.conn = self.hub.open(CONVERSATION_TRANSPORT, on_event, on_close, "ga", None)
                break
            except SessionLimitReached:
                idle = next((cid for cid, c in self._by_id.items() if c.answer is None), None)
                if idle is None or self.hub.closing:
                    raise
                log.info("conversation %s forgotten to make room (wyoming.max_conversations)", idle)
                await self._forget(idle)
        if conv_id in self._by_id:  # opened by a request that arrived while this one made room: share it
            await conv.conn.close()
            return self._by_id[conv_id]
        self._by_id[conv_id] = conv
        await conv.conn.start()
        conv.conn.receive_event(_CONVERSATION_SESSION)
        return conv

    async def _forget(self, conv_id: str) -> None:
        conv = self._by_id.pop(conv_id, None)
        if conv is not None:
            await conv.conn.close()

    def _set_language(self, conv: _Conversation, language: str | None) -> None:
        if language == conv.language:
            return
        conv.language = language
        base = conv.conn.engine.backend.default_system_prompt
        update = {"type": "realtime", "instructions": language_instruction(base, language)}
        conv.conn.receive_event({"type": "session.update", "session": update})

    @staticmethod
    def _on_event(conv: _Conversation, ev: dict[str, Any]) -> None:
        answer, kind = conv.answer, ev.get("type")
        if answer is None:
            return
        if kind == "error" and answer.error is None:
            answer.error = ev["error"]["message"]
        elif kind == "response.done":
            r = ev["response"]
            text = " ".join(p["text"] for item in r["output"] for p in item["content"] if p.get("text")).strip()
            details = r.get("status_details") or {}
            why = answer.error or (details.get("error") or {}).get("message") or details.get("reason")
            conv.answer = None
            if not answer.done.done():
                answer.done.set_result((r["status"], text, why))


# ---- tts -------------------------------------------------------------------------------------------------------------
class SpeechStream:
    """One synthesis: text in (whole, or streamed in pieces), audio out as `audio-start`, `audio-chunk`...,
    `audio-stop`, each clause's audio sent as soon as it is synthesised. At most `SPEECH_LOOKAHEAD` clauses of a stream
    wait in the shared pool, so a long text cannot hold everyone else's speech back; `feed` waits while they do (the
    client's text backs up in its socket). A clause the voice cannot say or failed to synthesise gets an `error`
    event in its place and the rest is still spoken. `write(event)` sends one event to the client."""

    def __init__(self, pool: SpeechPool, voice: VoiceConfig, write: Callable[[Event], Awaitable[None]]) -> None:
        self.pool, self.voice, self._write = pool, voice, write
        self._splitter = ClauseSplitter(first_clause_chars=voice.first_clause_chars)  # the realtime answers' policy
        self._queue: asyncio.Queue[Future[Speech] | WyomingError | None] = asyncio.Queue(SPEECH_LOOKAHEAD)
        self._sender = asyncio.get_running_loop().create_task(self._send(), name="wyoming-tts")
        self._started = False

    async def feed(self, text: str) -> None:
        for clause in self._splitter.feed(text):
            await self._submit(clause)

    async def finish(self) -> None:
        """Speak what is left, then wait until `audio-stop` is sent."""
        for clause in self._splitter.flush():
            await self._submit(clause)
        await self._put(None)
        await self._sender

    async def cancel(self) -> None:
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Future):
                item.cancel()  # not started yet: the pool skips it

    async def _submit(self, clause: str) -> None:
        if not has_words(clause):  # punctuation, symbols: nothing to say, nothing to report
            return
        why = unspeakable_reason(clause, self.pool.params.name)
        if why is not None:
            await self._put(WyomingError("unspeakable_text", f"not spoken ({why}): {clause[:60]!r}"))
        else:
            await self._put(self.pool.submit(clause, self.voice.speed, self.voice.output_rate_hz))

    async def _put(self, item: Future[Speech] | WyomingError | None) -> None:
        """Queue `item`, or raise the sender's error if it ended (e.g. the peer stopped reading): never wait forever
        for a sender that is gone."""
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait([put, self._sender], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            if isinstance(item, Future):
                item.cancel()
            self._sender.result()  # raises what ended it
            raise ConnectionError("the speech stream ended")

    async def _send(self) -> None:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, WyomingError):
                await self._write(Error(text=item.text, code=item.code).event())
                continue
            try:
                speech = await asyncio.wrap_future(item)
            except Exception as e:  # this clause is lost; the rest is still spoken
                log.exception("tts: synthesis failed")
                await self._write(Error(text=f"the voice failed: {type(e).__name__}: {e}", code="tts_failed").event())
                continue
            await self._start()
            pcm = np.ascontiguousarray(speech.pcm, dtype="<i2").tobytes()
            step = SAMPLES_PER_CHUNK * 2
            for at in range(0, len(pcm), step):
                chunk = AudioChunk(rate=speech.rate_hz, width=2, channels=1, audio=pcm[at : at + step])
                await self._write(chunk.event())
        await self._start()  # nothing was spoken: the request still ends like every other one
        await self._write(AudioStop().event())

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._write(AudioStart(rate=self.voice.output_rate_hz, width=2, channels=1).event())
