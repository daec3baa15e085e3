"""The Qwen tokenizer: every special id of QWEN_AUDIO.md §5, known ids, NFC, audio tags parsed only where asked,
specials decoded as their text, reuse with another special list (Qwen2.5 style), locating qwen.tiktoken."""

import pytest

from assistant.models.tokenizer import (
    QwenTokenizer,
    find_tiktoken_file,
    load_ranks,
    qwen_audio_specials,
)


@pytest.fixture(scope="module")
def tok():
    return QwenTokenizer.for_qwen_audio()  # qwen.tiktoken from the dashscope wheel


def test_special_ids(tok):
    ids = tok.special_ids
    assert tok.n_valid == 155165 and len(qwen_audio_specials()) == 155165 - 151643
    expect = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
        "<|extra_204|>": 151850, "[[[AUDIO:modality]]]": 151851, "<|startoftranscript|>": 151852,
        "<|startofanalysis|>": 151853, "<|translate|>": 151854, "<|transcribe|>": 151855, "<|caption|>": 151856,
        "<|keyword|>": 151857, "<|unknown|>": 151858, "<|en|>": 151859, "<|zh|>": 151860, "<|it|>": 151866,
        "<|zh_tr|>": 151867, "<|notimestamps|>": 151868, "<|sil|>": 151869, "<|timestamps|>": 151870,
        "<|0.00|>": 151871, "<|2.33|>": 151871 + 233, "<|27.04|>": 154575, "<|30.00|>": 154871,
        "<|caption_audiocaps|>": 154872, "<|caption_plain|>": 154875, "<|itn|>": 154876, "<|wo_itn|>": 154877,
        "<|startofentityvalue|>": 154878, "<|endofentitytype|>": 154881, "<|named_entity_recognition|>": 154882,
        "<|audio_grounding|>": 154883, "<|startofword|>": 154884, "<|delim|>": 154886,
        "<|emotion_recognition|>": 154887, "<|pitch|>": 154890, "<|midi_pitch_0|>": 154891,
        "<|midi_pitch_127|>": 155018, "<|velocity|>": 155019, "<|midi_velocity_0|>": 155020,
        "<|midi_velocity_127|>": 155147, "<|sonic|>": 155148, "<|speech_edit|>": 155162, "<audio>": 155163,
        "</audio>": 155164,
    }  # fmt: skip
    assert {k: ids[k] for k in expect} == expect
    assert tok.eos_id == 151643 and tok.stop_ids == {151643, 151644, 151645}


def test_known_ids_and_nfc(tok):
    assert tok.encode("\n") == [198]
    assert tok.encode("system") == [8948] and tok.encode("user") == [872] and tok.encode("assistant") == [77091]
    assert tok.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # decomposed é is NFC-normalised first


def test_specials_are_plain_text_unless_parsed(tok):
    typed = tok.encode("<|im_start|>system")
    assert 151644 not in typed and tok.decode(typed) == "<|im_start|>system"
    ids, tags = tok.encode_with_audio("Audio 1: <audio>x</audio>\nhi <|im_end|>", lambda url: 5)
    assert ids[:10] == [14755, 220, 16, 25, 220, 155163, 151851, 151851, 151851, 155164]
    assert 151645 not in ids
    assert [(t.start, t.end, t.url) for t in tags] == [(5, 10, "x")]
    # A tag naming no known audio (typed by a user) stays text.
    ids, tags = tok.encode_with_audio("see <audio>nope</audio>", lambda url: None)
    assert tags == [] and ids == tok.encode("see <audio>nope</audio>")


def test_decode_bytes_keeps_specials_and_rejects_padding_ids(tok):
    assert tok.decode_bytes([151644, 872, 154104, 151645]) == b"<|im_start|>user<|22.33|><|im_end|>"
    ids = tok.encode("héllo 你好")
    assert b"".join(tok.decode_bytes([i]) for i in ids) == "héllo 你好".encode()
    with pytest.raises(ValueError, match="outside the tokenizer"):
        tok.decode_bytes([155165])


def test_reusable_with_another_special_list():
    qwen25 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]
    tok = QwenTokenizer(load_ranks(find_tiktoken_file()), qwen25)
    assert tok.n_valid == 151648 and tok.special_ids["<|object_ref_end|>"] == 151647
    assert tok.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert tok.decode_bytes([151647]) == b"<|object_ref_end|>"
    with pytest.raises(ValueError, match="no audio tags"):
        tok.encode_with_audio("<audio>x</audio>", lambda url: 3)


def test_tiktoken_file_checks(tmp_path):
    assert find_tiktoken_file(None).name == "qwen.tiktoken"
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    assert find_tiktoken_file(tmp_path) == bad  # beside the checkpoint wins
    with pytest.raises(ValueError, match="sha256"):
        load_ranks(bad)
