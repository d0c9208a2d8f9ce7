"""Mismatched responses (`Needs.mismatched`): each row gets, as a new response, another row's completion
(of another prompt) after its own prompt; deterministic, cached inputs, collated like any response."""

from __future__ import annotations

import pytest

from alignlab.data import DataError, PreferenceCollator, build_datasets, check_data_needs
from alignlab.data.mismatched import partners

SUBJECTS = ["film", "movie", "show", "book", "play", "song"]
NEEDS = {
    "responses": ("completion", "kl_completion"),
    "fields": ("label",),
    "mismatched": (("kl_completion", "completion"),),
}


def pair_rows(n: int) -> list[dict[str, str]]:
    """Pairs with distinct prompts, and completions naming their subject (a borrowed one is traceable)."""
    return [
        {"prompt": f"the {s} was", "chosen": f"great {s} .", "rejected": f"dull {s} ."} for s in SUBJECTS[:n]
    ]


def check_mismatched(dataset) -> None:
    """Every row's kl completion is some row's completion, of another prompt."""
    rows = dataset.to_list()
    for row in rows:
        donors = [other for other in rows if other["completion_ids"] == row["kl_completion_ids"]]
        assert donors, "the kl completion is no row's completion"
        assert all(donor["prompt_ids"] != row["prompt_ids"] for donor in donors)


def test_unpaired_pairs_borrow_another_prompts_completion(make_cfg, tokenizer):
    prepared = build_datasets(make_cfg(pair_rows(5)), tokenizer, seed=3, **NEEDS)
    train = prepared.train
    assert train.column_names == ["prompt_ids", "completion_ids", "label", "kl_completion_ids"]
    assert len(train) == 10  # 5 pairs unpaired
    check_mismatched(train)
    # two rows per prompt, two per next prompt: each completion is borrowed exactly once
    assert sorted(map(tuple, train["kl_completion_ids"])) == sorted(map(tuple, train["completion_ids"]))


def test_deterministic_and_seeded(make_cfg, tokenizer):
    cfg = make_cfg(pair_rows(6))
    first = build_datasets(cfg, tokenizer, seed=0, **NEEDS)
    again = build_datasets(cfg, tokenizer, seed=0, **NEEDS)
    assert again.report.cache_hit
    assert again.train["kl_completion_ids"] == first.train["kl_completion_ids"]
    others = {
        tuple(map(tuple, build_datasets(cfg, tokenizer, seed=s, **NEEDS).train["kl_completion_ids"]))
        for s in range(1, 6)
    }
    assert (
        len(others | {tuple(map(tuple, first.train["kl_completion_ids"]))}) > 1
    )  # the seed picks the pairing


def test_eval_rows_borrow_from_eval_rows(make_cfg, tokenizer):
    prepared = build_datasets(make_cfg(pair_rows(6), eval_size=2), tokenizer, seed=1, **NEEDS)
    check_mismatched(prepared.train)
    check_mismatched(prepared.eval)


def test_borrowed_completion_is_cut_to_max_length(make_cfg, tokenizer):
    rows = [
        {"prompt": "the film was", "completion": "great .", "label": True},
        {"prompt": "the show was so very", "completion": "dull dull dull dull dull .", "label": False},
    ]
    cfg = make_cfg(rows, max_length=8, max_prompt_length=6)
    train = build_datasets(cfg, tokenizer, **NEEDS).train.to_list()
    for row in train:
        assert 1 <= len(row["kl_completion_ids"]) <= 8 - len(row["prompt_ids"])
    assert (
        train[1]["kl_completion_ids"] == train[0]["completion_ids"]
    )  # two prompts: each borrows the other's
    assert train[0]["kl_completion_ids"] == train[1]["completion_ids"][: 8 - len(train[0]["prompt_ids"])]


def test_collated_with_the_rows_own_prompt(make_cfg, tokenizer):
    prepared = build_datasets(make_cfg(pair_rows(3)), tokenizer, **NEEDS)
    examples = list(prepared.train)
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=NEEDS["responses"], fields=("label",))(
        examples
    )
    for i, ex in enumerate(examples):
        n, m = len(ex["prompt_ids"]), len(ex["kl_completion_ids"])
        assert (
            batch["kl_completion_input_ids"][i, : n + m].tolist()
            == ex["prompt_ids"] + ex["kl_completion_ids"]
        )
        assert (batch["kl_completion_labels"][i, :n] == -100).all()


def test_partners_by_hand():
    # prompts a, a, b, c: groups {a: [0, 1], b: [2], c: [3]}; every partner has another prompt
    prompts = [[1], [1], [2], [3]]
    got = partners(prompts, seed=0)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(got))
    assert partners(prompts, seed=0) == got
    assert partners([[5], [5], [5]], seed=0) == [1, 2, 0]  # one prompt: rotate by one


@pytest.mark.parametrize(
    "mismatched",
    [
        (("kl", "completion"),),  # kl is not a response
        (("kl_completion", "kl_completion"),),  # its own source
        (("kl_completion", "retain"),),
        (("kl_completion",),),
    ],
)
def test_check_data_needs_refuses_bad_pairs(make_cfg, mismatched):
    with pytest.raises(DataError, match="mismatched"):
        check_data_needs(make_cfg(pair_rows(2)), NEEDS["responses"], ("label",), mismatched)


def test_check_data_needs_accepts_the_shape(make_cfg):
    assert check_data_needs(make_cfg(pair_rows(2)), **NEEDS) is None
