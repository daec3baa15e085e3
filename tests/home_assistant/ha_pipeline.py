"""An Assist pipeline in a real Home Assistant (2025.1.4, its own test harness) on our Wyoming port: the Wyoming
integration is added the way a user adds it (config flow: host and port), a pipeline is built from its speech-to-text,
conversation agent and text-to-speech, and run from a spoken question to the spoken answer.

Run by tests/test_home_assistant.py with Home Assistant's venv. Input and output through the environment:
WYOMING_HOST, WYOMING_PORT, QUESTION_PCM (16 kHz 16-bit mono raw PCM), RESULT_JSON (written: the texts of each
stage), ANSWER_AUDIO (written: the spoken answer as Home Assistant delivers it, WAV).
"""

import json
import os
from pathlib import Path

from homeassistant.components import assist_pipeline, stt, tts
from homeassistant.core import Context
from homeassistant.setup import async_setup_component

CHUNK_BYTES = 1024  # 32 ms of 16 kHz PCM16, as a voice satellite streams it


async def test_assist_pipeline_from_spoken_question_to_spoken_answer(hass, socket_enabled):
    host, port = os.environ["WYOMING_HOST"], int(os.environ["WYOMING_PORT"])
    for component in ("homeassistant", "media_source", "assist_pipeline"):
        assert await async_setup_component(hass, component, {})

    # Settings > Devices & services > Add integration > Wyoming Protocol > host, port
    flow = await hass.config_entries.flow.async_init("wyoming", context={"source": "user"})
    flow = await hass.config_entries.flow.async_configure(flow["flow_id"], {"host": host, "port": port})
    assert flow["type"] == "create_entry", flow
    await hass.async_block_till_done()
    entities = {s.domain: s.entity_id for s in hass.states.async_all() if s.domain in ("stt", "tts", "conversation")}
    assert {"stt", "tts"} <= entities.keys(), entities
    agents = [a for a in hass.states.async_entity_ids("conversation") if a != "conversation.home_assistant"]
    assert len(agents) == 1, hass.states.async_entity_ids("conversation")

    # Settings > Voice assistants > Add assistant: our speech-to-text, conversation agent and text-to-speech
    pipeline = await assist_pipeline.async_create_default_pipeline(
        hass, stt_engine_id=entities["stt"], tts_engine_id=entities["tts"], pipeline_name="Qwen voice assistant"
    )
    assert pipeline is not None, "Home Assistant refused our stt/tts for the pipeline's language"
    await assist_pipeline.async_update_pipeline(hass, pipeline, conversation_engine=agents[0])

    pcm = Path(os.environ["QUESTION_PCM"]).read_bytes()

    async def audio():
        for at in range(0, len(pcm), CHUNK_BYTES):
            yield pcm[at : at + CHUNK_BYTES]

    events = []
    await assist_pipeline.async_pipeline_from_audio_stream(
        hass,
        context=Context(),
        event_callback=events.append,
        stt_metadata=stt.SpeechMetadata(
            language=pipeline.stt_language,
            format=stt.AudioFormats.WAV,
            codec=stt.AudioCodecs.PCM,
            bit_rate=stt.AudioBitRates.BITRATE_16,
            sample_rate=stt.AudioSampleRates.SAMPLERATE_16000,
            channel=stt.AudioChannels.CHANNEL_MONO,
        ),
        stt_stream=audio(),
        pipeline_id=pipeline.id,
        tts_audio_output="wav",
    )
    by_type = {e.type: e.data for e in events}
    assert "error" not in by_type, by_type.get("error")
    heard = by_type["stt-end"]["stt_output"]["text"]
    response = by_type["intent-end"]["intent_output"]["response"]
    assert response["response_type"] == "action_done", response
    answer = response["speech"]["plain"]["speech"]
    media_id = by_type["tts-end"]["tts_output"]["media_id"]
    extension, wav = await tts.async_get_media_source_audio(hass, media_id)
    Path(os.environ["ANSWER_AUDIO"]).write_bytes(wav)
    stages = [str(e.type) for e in events]
    result = {"heard": heard, "answer": answer, "audio_extension": extension, "stages": stages}
    Path(os.environ["RESULT_JSON"]).write_text(json.dumps(result))
