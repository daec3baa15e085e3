"""The `openai` backend with `audio_input = "audio"` against a real vLLM server serving a tiny random Qwen2-Audio
checkpoint made here (transformers' `Qwen2AudioForConditionalGeneration` from a tiny config): our server sends each
spoken turn's audio as an `input_audio` WAV part and streams what vLLM answers.

The checkpoint has the real model's layout (`audio_tower.*`, `multi_modal_projector.*`, `language_model.*`; a
vocabulary of 156032 rows, larger than the tokenizer's 151668, as Qwen2-Audio-7B's) and the exported embedded
tokenizer plus Qwen2-Audio's three audio tokens. Its answers are random tokens; what is checked is the path: the WAV
we send is bit-exact what the client spoke, vLLM counts the audio's tokens (about 25 per second), and the text our
client receives is exactly what vLLM answers to that request.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
import wave

import numpy as np
import pytest
import websockets

from assistant.backends.openai_chat import AUDIO_TOKENS_PER_S
from assistant.transport.server import running_server
from tests.http_proxy import RecordingProxy
from tests.server_util import TIMEOUT_S, b64, make_cfg, recv_event, recv_until, send_json, wav_pcm16
from tests.vllm_env import INSTALL_TIMEOUT_S, START_TIMEOUT_S, VllmServer, exported_model

# the first test also waits for the module's vLLM server, and on a fresh machine for its venv and the export
pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_TIMEOUT_S + START_TIMEOUT_S)]

MODEL = "tiny-qwen2-audio"
AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")  # Qwen2-Audio's, names fixed by vLLM's prompt
VOCAB = 156032  # Qwen2-Audio-7B's embedding rows


def write_tiny_qwen2_audio(out_dir):
    """A tiny random Qwen2-Audio checkpoint vLLM can serve: weights, config, processor, tokenizer, chat template."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(exported_model()))
    first_special = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # every id from here on is special or padding
    tokenizer.add_tokens(list(AUDIO_TOKENS), special_tokens=True)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKENS[0])
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2AudioConfig(
        audio_config={
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "eos_token_id": eos,
        },
        audio_token_index=audio_id,
    )
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).to(torch.bfloat16)
    with torch.no_grad():  # only ordinary text tokens can win, so answers are printable text
        model.get_output_embeddings().weight[first_special:] = 0
    model.save_pretrained(str(out_dir))
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    processor = Qwen2AudioProcessor(
        feature_extractor=features, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    processor.save_pretrained(str(out_dir))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    return out_dir


@pytest.fixture(scope="module")
def vllm_audio(tmp_path_factory):
    model_dir = write_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_qwen2_audio"))
    server = VllmServer(model_dir, MODEL, tmp_path_factory.mktemp("vllm_audio") / "vllm.log").start()
    proxy = RecordingProxy(server.port).start()
    yield server, proxy
    proxy.close()
    server.stop()


def wav_samples(part: dict) -> tuple[int, np.ndarray]:
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def direct_answer(server: VllmServer, body: dict) -> dict:
    """The same request sent straight to vLLM, not streamed."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    req = urllib.request.Request(
        f"{server.api_url}/chat/completions", json.dumps(plain).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return json.loads(r.read())


async def test_spoken_turns_reach_qwen2_audio_as_wav_and_its_answer_streams_back(vllm_audio, question_wav):
    from assistant.backends.openai_chat import OpenAIBackend

    server, proxy = vllm_audio
    cfg = make_cfg(
        **{
            "model.backend": "openai",
            "openai.base_urls": [proxy.api_url],
            "openai.model": MODEL,
            "openai.audio_input": "audio",
            "openai.read_timeout_s": TIMEOUT_S,
            "generation.max_new_tokens": 8,
        }
    )
    backend = OpenAIBackend.from_config(cfg)
    assert backend.recognisers is None  # audio goes to the model: no Whisper here
    pcm = wav_pcm16(question_wav)
    async with running_server(cfg, backend=backend) as srv:
        ws = await websockets.connect(srv.ws_url)
        assert (await recv_event(ws))["type"] == "session.created"
        session = {"input_sample_rate": 16000, "audio": {"input": {"turn_detection": None}}}
        await send_json(ws, {"type": "session.update", "session": session})
        await recv_until(ws, "session.updated")
        dones, logs = [], []
        for clip in (pcm, pcm[: len(pcm) // 2]):
            await send_json(ws, {"type": "input_audio_buffer.append", "audio": b64(clip)})
            await send_json(ws, {"type": "input_audio_buffer.commit"})
            await send_json(ws, {"type": "response.create"})
            log: list[dict] = []
            dones.append(await recv_until(ws, "response.done", log))
            logs.append(log)
        await ws.close()

    first, second = proxy.chat_bodies[-2:]
    # turn 1: the WAV sent is exactly what the client spoke, at 16 kHz
    [part] = first["messages"][-1]["content"]
    rate, sent = wav_samples(part)
    assert rate == 16000 and np.array_equal(sent, pcm)
    assert all(e["type"] != "conversation.item.input_audio_transcription.completed" for e in logs[0])
    # what our client heard is exactly vLLM's answer to that request
    streamed = dones[0]["response"]["output"][0]["content"][0]["text"]
    direct = direct_answer(server, first)
    assert direct["choices"][0]["message"]["content"].strip() == streamed and streamed
    assert "".join(e["delta"] for e in logs[0] if e["type"] == "response.output_text.delta") == streamed
    # vLLM counted the audio: about 25 tokens per second of it, on top of the text
    audio_s = len(pcm) / 16000
    usage = dones[0]["response"]["usage"]
    assert usage["input_tokens"] == direct["usage"]["prompt_tokens"] > 0.9 * AUDIO_TOKENS_PER_S * audio_s
    assert dones[0]["response"]["status"] == "incomplete" and usage["output_tokens"] == 8
    # turn 2: the history keeps turn 1 as audio, then the answer vLLM gave
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second["messages"][1]["content"] == first["messages"][-1]["content"]
    assert second["messages"][2]["content"] == streamed
    assert np.array_equal(wav_samples(second["messages"][3]["content"][0])[1], pcm[: len(pcm) // 2])
    assert dones[1]["response"]["status"] in ("completed", "incomplete")
    assert dones[1]["response"]["usage"]["input_tokens"] > usage["input_tokens"]
