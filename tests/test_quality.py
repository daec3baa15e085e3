"""The answer-quality set (`bench/quality_set.toml`): the set file's shape and the scoring rules, and a quick subset
through the real server and `ask`'s function on the real embedded weights with a floor set from measurement."""

from __future__ import annotations

import pytest

from bench.quality import run_items, totals
from bench.quality_set import (
    SPLITS,
    VOICES,
    answer_correct,
    clip_audio,
    clip_for,
    load_set,
    select,
    word_errors,
)


def test_the_set_has_enough_items_of_each_kind_in_two_fixed_halves():
    items = load_set()
    singles = [i for i in items if i.kind == "single"]
    followups = [i for i in items if i.kind == "followup"]
    assert len(singles) >= 40 and len(followups) >= 20
    for kind_items in (singles, followups):
        # alternating per kind: the halves differ by at most one item and are interleaved through the file
        assert [i.split for i in kind_items] == [SPLITS[k % 2] for k in range(len(kind_items))]
    assert all(2 <= len(i.say) <= 3 and i.needs for i in followups)
    assert {i.needs for i in followups} >= {"name", "place", "ellipsis", "pronoun"}
    assert (
        select(items, split="tune", subset=3)
        == [i for i in items if i.split == "tune" and i.kind == "single"][:3]
        + [i for i in items if i.split == "tune" and i.kind == "followup"][:3]
    )


def test_each_clip_has_fixed_speaking_conditions_and_they_vary_across_the_set():
    items = load_set()
    clips = [clip_for(i.id, k, text) for i in items for k, text in enumerate(i.say)]
    assert clips == [clip_for(i.id, k, text) for i in items for k, text in enumerate(i.say)]
    assert {c.voice for c in clips} == set(VOICES)
    assert len({c.wpm for c in clips}) > 1 and len({c.lead_ms for c in clips}) > 1


@pytest.mark.parametrize(
    ("answer", "accept", "expected"),
    [
        ("The capital of France is Paris.", ("Paris",), True),
        ("A spider has eight legs.", ("8", "eight"), True),
        ("There are 365 days in a year.", ("three hundred sixty-five",), True),
        ("It freezes at zero degrees.", ("0",), True),
        ("It freezes at 100 degrees.", ("0",), False),  # a digit inside a number is not the number
        ("Because it is shiny.", ("Au",), False),  # whole words only
        ("The symbol for gold is Au (from aurum).", ("Au",), True),  # bracketed text is kept
        ("The largest is the blue whale.", ("blue whale",), True),
        ("It is blue, like a whale.", ("blue whale",), False),
        ("", ("Paris",), False),
    ],
)
def test_answers_match_an_accepted_form_as_whole_words(answer, accept, expected):
    assert answer_correct(answer, accept) is expected


def test_word_errors_count_edits_after_normalising_case_punctuation_and_numbers():
    assert word_errors("What is two plus three?", "what is 2 plus 3") == (0, 4)
    assert word_errors("Hi, my name is Anna.", "Hi my name is Ana") == (1, 5)
    assert word_errors("What is my name?", "") == (4, 4)
    assert word_errors("What is my name?", "So what is my name now?") == (2, 4)


@pytest.mark.slow
def test_clips_are_synthesised_once_with_their_leading_silence(tmp_path):
    clip = next(c for i in load_set() for k, t in enumerate(i.say) if (c := clip_for(i.id, k, t)).lead_ms > 0)
    first = clip_audio(clip, tmp_path)
    assert len(list(tmp_path.glob("*.wav"))) == 1
    lead = 16000 * clip.lead_ms // 1000
    assert not first[:lead].any() and abs(first[lead:]).max() > 0.1
    assert (clip_audio(clip, tmp_path) == first).all()  # from the cache, same samples


# The quick subset: the first 6 single questions of the set and 2 dialogues, greedy (the shipped default since issue
# 20's tuning; pinned here so the check stays reproducible whatever the default), every other setting the shipped
# default, through the server and ask's function. The dialogues are the first two that greedy decoding
# answered right in the full run: d01 and d02 are misheard by Whisper base today ("Anna" -> "R", "France" ->
# "Flungs") and could only show a floor of 0; d03 (a place) and d05 (a name) can show a regression.
QUICK = ("s01", "s02", "s03", "s04", "s05", "s06", "d03", "d05")
# Floors from measurement, one item below it: on 2026-12-03 `python -m bench.quality --greedy` answered all 6 single
# questions and both dialogues right through the server (bench/results/quality-20261203-greedy.json) and all 6
# through ask's function (bench/results/quality-20261203-greedy-ask.json). The margin is for CPUs that run the LM in
# bf16 (this one ran float32) and may flip a near tie. Re-measured with the tuned defaults (temperature 0, this test run
# on 2026-12-03, `pytest tests/test_quality.py -rA -s`): again 6/6 through the server, 6/6 through ask, 2/2 follow-ups.
FLOOR = {"server/single": 5, "ask/single": 5, "server/followup": 1}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a hang guard only: 16 answers on a shared 2-core machine
async def test_quick_subset_stays_above_its_measured_floor(embedded_backend, tmp_path):
    from assistant.config import load_config
    from assistant.transport.server import running_server
    from tests.server_util import VOICE_SEED

    cfg = load_config(overrides={"server.port": 0, "generation.greedy": True, "voice.seed": VOICE_SEED})
    async with running_server(cfg, backend=embedded_backend) as srv:
        rows = await run_items(select(load_set(), ids=list(QUICK)), cfg, srv, cache_dir=tmp_path)
    got = {key: entry["all"]["correct"] for key, entry in totals(rows).items() if "/" in key}
    assert got.keys() == FLOOR.keys()
    for key, floor in FLOOR.items():
        assert got[key] >= floor, f"{key}: {got[key]} right, the floor is {floor}; see the printed rows"
    assert all(r["turns"][-1]["transcript"] for r in rows)  # every last turn was heard and answered
