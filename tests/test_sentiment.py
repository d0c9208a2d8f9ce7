"""The VADER reward and the sampled sentiment pairs (`alignlab.bench.sentiment`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from alignlab.bench import sentiment


def test_vader_by_the_formula():
    # VADER: compound = x / sqrt(x^2 + 15), x the summed valences; "good" has valence 1.9 in its lexicon
    assert sentiment.vader(["good"]) == [pytest.approx(1.9 / math.sqrt(1.9**2 + 15), abs=1e-4)]
    assert sentiment.vader(["the box"]) == [0.0]
    assert sentiment.vader(["sad"])[0] < 0


def test_vader_reward_scores_completions_and_checks_lengths():
    assert sentiment.vader_reward(["She was sad.", "x"], ["good", "the box"]) == sentiment.vader(
        ["good", "the box"]
    )
    with pytest.raises(ValueError, match="one prompt per completion"):
        sentiment.vader_reward(["a"], ["b", "c"])


def test_story_prompts_are_distinct_neutral_and_split_by_name():
    train, held_out = sentiment.story_prompts("train"), sentiment.story_prompts("eval")
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    assert not any(name in p for p in held_out for name in sentiment.NAMES_TRAIN)
    assert set(sentiment.vader(train + held_out)) == {0.0}
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        sentiment.story_prompts("test")


def test_import_is_light():
    code = (
        "import sys, alignlab.bench.sentiment; print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    assert subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split() == ["False", "False"]


def test_pairs_file_is_cached_and_reads_as_explicit_pairs(shared_path, tmp_path):
    from alignlab.config import DataConfig, ModelConfig
    from alignlab.data import build_datasets
    from alignlab.models import load_tokenizer

    model = shared_path("models", "stories260k")
    path = sentiment.pairs_file(model, 6, seed=3, cache_dir=tmp_path, max_new_tokens=12)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert sentiment.vader([row["chosen"], row["rejected"]]) == [
            row["chosen_score"],
            row["rejected_score"],
        ]
    mtime = path.stat().st_mtime_ns
    assert sentiment.pairs_file(model, 6, seed=3, cache_dir=tmp_path, max_new_tokens=12) == path
    assert path.stat().st_mtime_ns == mtime  # not regenerated
    assert sentiment.pairs_file(model, 6, seed=4, cache_dir=tmp_path, max_new_tokens=12) != path
    # the same seed samples the same pairs
    assert sentiment.make_pairs(model, 6, seed=3, max_new_tokens=12) == rows
    data = build_datasets(
        DataConfig(path=str(path), eval_size=2, cache_dir=str(tmp_path / "tok")),
        load_tokenizer(ModelConfig(name_or_path=str(model))),
        responses=("chosen", "rejected"),
    )
    assert len(data.train) == 4 and len(data.eval) == 2
