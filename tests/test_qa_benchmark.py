"""The long-document QA benchmark's haystacks and scoring (benchmarks/_haystacks.py): every cue's
evidence lies in exactly one haystack of every length, haystacks are seeded, and an answer is
scored on its first line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _haystacks as hs  # noqa: E402

pytestmark = pytest.mark.skipif(not hs.BOOKS_DIR.is_dir(), reason="needs ../shared/data/books")


@pytest.fixture(scope="module")
def tokenize(smollm2):
    return lambda text: smollm2.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("cue_file", ["long_doc_qa.json", "head_calibration.json"])
def test_every_cue_is_in_one_haystack_of_each_length_and_haystacks_are_seeded(cue_file, tokenize):
    spec, cues = hs.load_cues(ROOT / "benchmarks" / "data" / cue_file)
    for length in (4096, 16384):
        haystacks = hs.build(spec, cues, length, tokenize)
        placed = [cue.id for haystack in haystacks for cue in haystack.cues]
        assert sorted(placed) == sorted(cue.id for cue in cues)  # each cue once
        for haystack in haystacks:
            assert abs(len(tokenize(haystack.text)) - length) < 0.1 * length
            for cue in haystack.cues:
                start, end = haystack.evidence[cue.id]
                assert haystack.text[start:end] == cue.evidence
                assert haystack.part[0] <= start < end <= haystack.part[1]
        assert [h.text for h in hs.build(spec, cues, length, tokenize)] == [h.text for h in haystacks]
    assert {h.text for h in hs.build(spec, cues, 4096, tokenize, seed=1)} != {h.text for h in hs.build(spec, cues, 4096, tokenize)}


def test_an_answer_is_scored_on_its_first_line_by_whole_words():
    cue = hs.Cue("x-00", "x", "fact", "e", "The county was", "Which county?", ["somersetshire", "ten thousand"])
    assert hs.correct("\n Somersetshire, in the west.\nBath", cue)
    assert hs.correct("He had ten thousand a year", cue)
    assert not hs.correct("Devon.\nSomersetshire", cue)  # only the first line counts
    assert not hs.correct("tenthousand", cue)
