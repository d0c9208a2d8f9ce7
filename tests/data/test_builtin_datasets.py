"""The embedded second objective `builtin:sentiment-understated` (for multi-objective recipes)."""

from __future__ import annotations

from alignlab.builtin import HYPE, NEGATIVE, POSITIVE, sentiment_pairs, understated_pairs
from alignlab.data.read import builtin_records


def _count(text: str, words: list[str]) -> int:
    return sum(word in words for word in text.split())


def test_chosen_has_fewer_hype_words():
    rows = understated_pairs(500)
    for row in rows:
        assert _count(row["chosen"], HYPE) < _count(row["rejected"], HYPE)
        assert _count(row["gold"], HYPE) == 0
        assert len(row["chosen"].split()) == len(row["rejected"].split())  # same shape, other words
    # not a sentiment task in disguise: the chosen one is sometimes the more negative of the two
    assert any(_count(r["chosen"], NEGATIVE) > _count(r["rejected"], NEGATIVE) for r in rows)
    assert any(_count(r["chosen"], POSITIVE) > _count(r["rejected"], POSITIVE) for r in rows)  # mild praise


def test_same_prompts_as_sentiment_and_deterministic():
    prompts = {row["prompt"] for row in sentiment_pairs(500)}
    assert {row["prompt"] for row in understated_pairs(500)} <= prompts
    assert understated_pairs(50) == understated_pairs(50)
    assert understated_pairs(50, heldout=True) != understated_pairs(50)


def test_served_as_a_builtin_source():
    records = builtin_records("builtin:sentiment-understated", limit=3)
    assert [row for _, row in records] == understated_pairs(3)
    assert str(records[0][0]) == "builtin:sentiment-understated row 0"
