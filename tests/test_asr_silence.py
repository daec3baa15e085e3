"""Speech recognition that does not depend on the silence around the words, with faster-whisper as the reference.

On espeak-ng clips (bench/asr_set.py: several voices and speeds; 0, 0.3, 0.5 and 1.0 s of leading and 1.5 s of
trailing silence) the embedded Whisper gives the same words for a clip whatever the silence, transcribing the
variants together (one batch) or alone; its word error rate against the text spoken is at most faster-whisper's
(int8, beam 1) on the same weights and the same audio; Whisper tiny.en prepares and transcribes; language detection
still names another language. The server test (push-to-talk, server VAD, `ask`) is tests/test_asr_server.py.
"""

from __future__ import annotations

import pytest

from assistant.backends.base import run_steps
from bench.asr_set import LEADS_S, VOICES, clips, word_error_rate

pytestmark = pytest.mark.slow

QUESTIONS_IN_TEST = 3  # x 4 voices x 4 silences = 48 transcriptions per system (faster-whisper's take minutes)


@pytest.fixture(scope="module")
def asr_clips():
    return clips(QUESTIONS_IN_TEST, VOICES)


@pytest.fixture(scope="module")
def base_transcriber(embedded_paths):
    from assistant.models.whisper import WhisperTranscriber

    return WhisperTranscriber.load(embedded_paths.whisper_dir)


@pytest.fixture(scope="module")
def base_heard(base_transcriber, asr_clips):
    """Per clip, the transcripts of its silence variants, transcribed together in one batch."""
    return [run_steps(base_transcriber.transcribe_steps([c.with_silence(s) for s in LEADS_S])) for c in asr_clips]


def test_words_do_not_depend_on_the_silence_around_them(base_transcriber, asr_clips, base_heard):
    for clip, heard in zip(asr_clips, base_heard, strict=True):
        texts = [t.text for t in heard]
        assert texts[0] and texts == [texts[0]] * len(LEADS_S), f"{clip.name}: {texts}"
        assert {t.language for t in heard} == {heard[0].language}
    # alone, not in a batch, with no trailing silence either: the same words
    clip, heard = asr_clips[0], base_heard[0]
    for lead in (0.0, 1.0):
        [alone] = run_steps(base_transcriber.transcribe_steps([clip.with_silence(lead, trail_s=0.0)]))
        assert alone.text == heard[0].text


def test_word_error_rate_at_most_faster_whispers(asr_clips, base_heard, tmp_path_factory):
    from bench.asr_peers import faster_whisper_dir, faster_whisper_transcriber

    reference = faster_whisper_transcriber(faster_whisper_dir("base", tmp_path_factory.mktemp("fw")), "int8", 2)
    texts, ours, theirs = [], [], []
    for clip, heard in zip(asr_clips, base_heard, strict=True):
        for lead, ours_t in zip(LEADS_S, heard, strict=True):
            texts.append(clip.text)
            ours.append(ours_t.text)
            theirs.append(reference(clip.with_silence(lead))[0])
    wer_ours, wer_theirs = word_error_rate(texts, ours), word_error_rate(texts, theirs)
    report = "\n".join(f"{t!r}: ours {o!r}, faster-whisper {f!r}" for t, o, f in zip(texts, ours, theirs, strict=True))
    print(f"WER ours {wer_ours:.3f}, faster-whisper int8 {wer_theirs:.3f}\n{report}")
    assert wer_ours <= wer_theirs, report


def test_tiny_en_prepares_and_transcribes(asr_clips, tmp_path):
    from assistant.config import load_config
    from assistant.models.whisper import WhisperTranscriber
    from assistant.weights.cache import ensure_prepared

    paths = ensure_prepared(load_config(overrides={"embedded.whisper": "tiny.en"}))
    assert paths.whisper_dir.name == "whisper-tiny.en"
    tr = WhisperTranscriber.load(paths.whisper_dir)
    assert not tr.multilingual and (tr.model.dims.d_model, tr.model.dims.encoder_layers) == (384, 4)
    clip = asr_clips[0]  # "What is the capital of France?", en-us
    heard = run_steps(tr.transcribe_steps([clip.with_silence(s) for s in LEADS_S]))
    assert [t.text for t in heard] == [heard[0].text] * len(LEADS_S)
    assert all(t.language == "en" and t.language_prob == 1.0 for t in heard)
    assert word_error_rate([clip.text], [heard[0].text]) <= 0.34, heard[0].text  # at most 2 of its 6 words wrong


def test_language_detection_still_names_other_languages(base_transcriber, tmp_path):
    """Not every turn is English: a German question (espeak-ng's de voice) is heard as German."""
    from bench.spoken_set import synthesize

    audio = synthesize("Was ist die Hauptstadt von Frankreich?", tmp_path / "de.wav", voice="de", wpm=140)
    [english] = run_steps(base_transcriber.transcribe_steps([clips(1, (("en-us", 150),))[0].with_silence(0.3)]))
    [german] = run_steps(base_transcriber.transcribe_steps([audio]))
    assert english.language == "en" and german.language == "de", (english, german)
