"""`data.swap_pairs`: every pair's chosen and rejected exchanged after normalisation, for any pair format.

Expected token ids are looked up in the vocabulary (`ids`), never produced by the pipeline.
"""

from __future__ import annotations

import pytest

from alignlab.data import DataError, build_datasets, check_data_needs

EOS = 1


def test_explicit_pairs_are_swapped_and_counted(make_cfg, tokenizer, ids, pairs):
    prepared = build_datasets(make_cfg(pairs(3), swap_pairs=True), tokenizer)
    assert prepared.train["chosen_ids"] == [ids("very dull .") + [EOS]] * 3
    assert prepared.train["rejected_ids"] == [ids("really great .") + [EOS]] * 3
    assert prepared.train["prompt_ids"][1] == ids("the movie was")  # the prompt stays
    assert prepared.report.pairs_swapped == 3
    assert "swapped chosen and rejected in 3 pairs" in prepared.report.summary()
    assert prepared.report.to_dict()["pairs_swapped"] == 3


def test_off_by_default(make_cfg, tokenizer, ids, pairs):
    prepared = build_datasets(make_cfg(pairs(2)), tokenizer)
    assert prepared.train["chosen_ids"][0] == ids("really great .") + [EOS]
    assert prepared.report.pairs_swapped == 0 and "swapped" not in prepared.report.summary()


def test_pairwise_judgements_are_swapped_after_ordering(make_cfg, tokenizer, ids):
    # preference 2: response_b wins, so chosen = "superb !", rejected = "stale ."; swapped: the reverse
    rows = [{"instruction": "the film was", "a": "stale .", "b": "superb !", "pref": 2}]
    columns = {"prompt": "instruction", "response_a": "a", "response_b": "b", "preference": "pref"}
    cfg = make_cfg(rows, swap_pairs=True, columns=columns)
    prepared = build_datasets(cfg, tokenizer)
    assert prepared.train["chosen_ids"] == [ids("stale .") + [EOS]]
    assert prepared.train["rejected_ids"] == [ids("superb !") + [EOS]]


def test_per_response_fields_travel_with_their_response(make_cfg, tokenizer, ids):
    rows = [
        {
            "prompt": "the film was",
            "chosen": "great .",
            "rejected": "dull .",
            "score_chosen": 0.9,
            "score_rejected": 0.2,
            "weight": 3.0,
        }
    ]
    prepared = build_datasets(
        make_cfg(rows, swap_pairs=True), tokenizer, fields=("score_chosen", "score_rejected", "weight")
    )
    row = prepared.train[0]
    assert row["chosen_ids"] == ids("dull .") + [EOS]
    assert (row["score_chosen"], row["score_rejected"], row["weight"]) == (0.2, 0.9, 3.0)


def test_held_out_split_is_the_same_with_and_without_swapping(make_cfg, tokenizer, pairs):
    plain = build_datasets(make_cfg(pairs(10), eval_size=3), tokenizer, seed=7)
    swapped = build_datasets(make_cfg(pairs(10), eval_size=3, swap_pairs=True), tokenizer, seed=7)
    assert swapped.eval["prompt_ids"] == plain.eval["prompt_ids"]
    assert swapped.eval["chosen_ids"] == plain.eval["rejected_ids"]
    assert swapped.report.pairs_swapped == 10  # train 7 + eval 3


def test_builtin_eval_split_is_swapped_too(tokenizer, tmp_path):
    from alignlab.config import DataConfig

    cfg = DataConfig(
        path="builtin:sentiment", limit=20, eval_size=4, swap_pairs=True, cache_dir=str(tmp_path)
    )
    plain = build_datasets(DataConfig(**{**vars(cfg), "swap_pairs": False}), tokenizer)
    swapped = build_datasets(cfg, tokenizer)
    assert swapped.eval["chosen_ids"] == plain.eval["rejected_ids"]
    assert swapped.train["rejected_ids"] == plain.train["chosen_ids"]
    assert swapped.report.pairs_swapped == 24


def test_swapping_changes_the_cache_key(make_cfg, tokenizer, pairs):
    cfg = make_cfg(pairs(3))
    assert build_datasets(cfg, tokenizer).report.cache_hit is False
    assert build_datasets(cfg, tokenizer).report.cache_hit is True
    swapped = make_cfg(pairs(3), swap_pairs=True)
    assert build_datasets(swapped, tokenizer).report.cache_hit is False
    assert build_datasets(swapped, tokenizer).report.cache_hit is True


@pytest.mark.parametrize(
    "needs",
    [
        {"responses": ("completion",), "fields": ("label",)},  # unpaired feedback (BCO)
        {"responses": ("gold", "chosen", "rejected")},  # triples (TPO)
        {"responses": ("completion", "retain")},  # forget / retain (NPO)
    ],
)
def test_refused_for_losses_without_pairs_before_reading_files(needs, tmp_path):
    from alignlab.config import DataConfig

    absent = str(tmp_path / "absent.jsonl")
    cfg = DataConfig(path=absent, swap_pairs=True, retain=absent if "retain" in needs["responses"] else None)
    with pytest.raises(
        DataError,
        match=r"data.swap_pairs=true swaps chosen and rejected of pairs.*remove "
        r"data.swap_pairs",
    ):
        check_data_needs(cfg, **needs)
