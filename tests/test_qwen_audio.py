"""Audio in: file loading to 16 kHz mono on the int16 grid (any width/rate/channels), the 30 s window and length
rules, splitting long audio into windows, refusing clips under 30 ms, and the batched encoder matching each audio
encoded alone."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from assistant.audio.frontend import AudioTooShort, log_mel, mel_frames, split_windows
from assistant.audio.io import load_audio
from assistant.backends.base import Utterance
from assistant.backends.qwen_audio import QwenAudioBackend
from assistant.models.qwen_audio_encoder import span_tokens

DATA = Path(__file__).parent / "data" / "qwen_golden"


@pytest.fixture(scope="module")
def backend(tiny_qwen_dir):
    return QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu")


@pytest.fixture(scope="module")
def clip():
    return load_audio(DATA / "tiny.wav")  # 51236 samples, 16 kHz mono 16-bit


def test_lengths():
    assert span_tokens(mel_frames(51236)) == 82
    assert span_tokens(mel_frames(101932)) == 161  # odd mel_len 637
    assert span_tokens(mel_frames(480000)) == 752 and span_tokens(mel_frames(10**6)) == 752
    assert span_tokens(mel_frames(480)) == 3


def test_16k_mono_16bit_wav_is_read_exactly(clip):
    raw, rate = soundfile.read(DATA / "tiny.wav", dtype="int16")
    assert rate == 16000 and np.array_equal(clip, raw.astype(np.float32) / 32768)


@pytest.mark.parametrize("rate,channels,subtype", [(44100, 2, "PCM_24"), (8000, 1, "PCM_U8"), (48000, 1, "FLOAT")])
def test_any_wav_becomes_16k_mono_on_int16_grid(tmp_path, clip, rate, channels, subtype):
    t = np.arange(int(rate * 1.5)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([tone, tone], axis=1) if channels == 2 else tone
    path = tmp_path / "x.wav"
    soundfile.write(path, data, rate, subtype=subtype)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 24000) <= 1
    assert np.array_equal(np.round(x * 32768), x * 32768)  # on the int16 grid
    # The resampled tone keeps its level and frequency (mid-clip, away from resampler edges).
    mid = x[4000:20000]
    assert abs(np.sqrt(np.mean(mid**2)) - 0.5 / np.sqrt(2)) < 0.01
    spectrum = np.abs(np.fft.rfft(mid))
    assert abs(np.argmax(spectrum) * 16000 / len(mid) - 440) < 2


def test_flac_round_trip(tmp_path, clip):
    path = tmp_path / "x.flac"
    soundfile.write(path, clip, 16000, subtype="PCM_16")
    assert np.array_equal(load_audio(path), clip)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read audio file"):
        load_audio(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_too_short_is_refused(backend):
    with pytest.raises(AudioTooShort, match="at least 480 samples"):
        log_mel(np.zeros(479, dtype=np.float32))
    with pytest.raises(AudioTooShort):
        backend.prepare([Utterance(key="k", audio=np.zeros(100, dtype=np.float32))], [1])


def test_window_is_padded_before_the_stft():
    # A clip ending in sound: the last valid frames depend on the padding; padding first == the 30 s array.
    x = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    padded = np.zeros(480000, dtype=np.float32)
    padded[:16000] = x
    assert torch.equal(log_mel(x), log_mel(padded))


def test_long_audio_is_split_into_windows_never_cut(backend, clip):
    long = np.concatenate([np.tile(clip, 13), clip[:200]])  # 666268 samples: 30 s + 11.6 s
    windows = split_windows(long)
    assert [len(w) for w in windows] == [480000, len(long) - 480000]
    exact = np.zeros(960000 + 100, dtype=np.float32)
    assert [len(w) for w in split_windows(exact)] == [480000, 480000, 480]  # a 100-sample tail padded, not dropped
    [turn] = backend.prepare([Utterance(key="item_7", audio=long)], [3])
    assert (
        turn.user_text
        == "Audio 3: <audio>item_7</audio><audio>item_7#2</audio>\nAnswer the speaker's question briefly."
    )
    assert [e.shape[0] for e in turn.audio_embeds.values()] == [752, span_tokens(mel_frames(len(long) - 480000))]
    prompt = backend.build_prompt("", [], turn, backend.max_window_tokens)
    assert [s.key for s in prompt.audio] == ["item_7", "item_7#2"]
    assert prompt.audio[1].start == prompt.audio[0].start + 752


def test_batched_encoder_equals_each_alone(backend, clip):
    short, odd = clip[:20000], load_audio(DATA / "history_audio_2.wav")[:33999]
    together = backend.prepare([Utterance(key=f"u{i}", audio=a) for i, a in enumerate([short, clip, odd])], [1, 2, 3])
    for i, a in enumerate([short, clip, odd]):
        [alone] = backend.prepare([Utterance(key=f"u{i}", audio=a)], [i + 1])
        torch.testing.assert_close(together[i].audio_embeds[f"u{i}"], alone.audio_embeds[f"u{i}"], atol=1e-4, rtol=0)


def test_turn_text_and_instruction(tiny_qwen_dir, clip):
    b = QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu", system_prompt="Be terse.", turn_instruction="")
    spoken, typed, both = b.prepare(
        [Utterance(key="a", audio=clip), Utterance(key="b", text="hello"), Utterance(key="c", audio=clip, text="Q?")],
        [1, 1, 2],
    )
    assert spoken.user_text == "Audio 1: <audio>a</audio>\n"
    assert typed.user_text == "hello" and typed.audio_embeds == {}
    assert both.user_text == "Audio 2: <audio>c</audio>\nQ?"
    prompt = b.build_prompt("", [], typed, b.max_window_tokens)
    tok = b.tokenizer
    assert prompt.ids[: 3 + len(tok.encode("Be terse."))] == [151644, 8948, 198] + tok.encode("Be terse.")
    assert prompt.audio == []
