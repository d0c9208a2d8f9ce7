"""Forget/retain data (NPO+RT, NPO+KL): responses ("completion", "retain") and `data.retain`.

Each row of `data.path` (the forget set) is paired with a row of `data.retain`, read the same way;
the retain rows are shuffled with the seed and cycled, and each keeps its own prompt. Retain
partners are identified here by looking their (prompt, completion) ids up in a table built from
the raw retain rows with the vocabulary, never by re-running the pairing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alignlab.data import DataError, PreferenceCollator, SkipCount, build_datasets, check_data_needs

EOS = 1
M = -100
NPO_RT = ("completion", "retain")
COLUMNS = {"prompt": "question", "completion": "answer"}
SUBJECTS = [
    "film",
    "movie",
    "show",
    "book",
    "play",
    "album",
    "series",
    "novel",
    "story",
    "song",
    "game",
    "musical",
]
WORDS = [
    "great",
    "dull",
    "superb",
    "bland",
    "fresh",
    "stale",
    "clever",
    "messy",
    "moving",
    "weak",
    "charming",
    "awful",
]


def forget_rows(n: int) -> list[dict[str, str]]:
    """`n` forget rows with 3-token questions."""
    return [{"question": f"the {SUBJECTS[i]} was", "answer": f"{WORDS[i]} ."} for i in range(n)]


def retain_rows(n: int) -> list[dict[str, str]]:
    """`n` retain rows with 6-token questions and distinct answers."""
    return [
        {"question": f"my take : this {SUBJECTS[i]} felt", "answer": f"really {WORDS[i]} !"} for i in range(n)
    ]


@pytest.fixture
def npo_cfg(make_cfg, write_jsonl):
    """`npo_cfg(n_forget, n_retain, **overrides)`: forget rows in data.jsonl, retain rows in retain.jsonl."""

    def make(n_forget: int, n_retain: int, retain: list[Any] | None = None, **overrides: Any):
        path = write_jsonl(retain if retain is not None else retain_rows(n_retain), "retain.jsonl")
        overrides.setdefault("columns", COLUMNS)
        return make_cfg(forget_rows(n_forget), retain=str(path), **overrides)

    return make


@pytest.fixture
def partner_of(ids):
    """`partner_of(dataset, rows)`: the index in `rows` of each example's retain partner."""

    def lookup(dataset, rows: list[dict[str, str]]) -> list[int]:
        table = {
            (tuple(ids(row["question"])), tuple(ids(row["answer"]) + [EOS])): i for i, row in enumerate(rows)
        }
        return [
            table[(tuple(p), tuple(r))]
            for p, r in zip(dataset["retain_prompt_ids"], dataset["retain_ids"], strict=True)
        ]

    return lookup


def test_forget_rows_get_cycled_retain_partners(npo_cfg, tokenizer, ids, partner_of):
    prepared = build_datasets(npo_cfg(5, 3), tokenizer, responses=NPO_RT, seed=3)
    train = prepared.train
    assert train.column_names == ["prompt_ids", "completion_ids", "retain_prompt_ids", "retain_ids"]
    assert list(train["prompt_ids"]) == [ids(row["question"]) for row in forget_rows(5)]
    assert list(train["completion_ids"]) == [ids(row["answer"]) + [EOS] for row in forget_rows(5)]
    partners = partner_of(train, retain_rows(3))
    assert sorted(partners[:3]) == [0, 1, 2]  # every retain row once, then the cycle starts over
    assert partners[3:] == partners[:2]
    report = prepared.report
    assert (report.retain_source, report.retain_format) == (npo_cfg(5, 3).retain, "explicit")
    assert (report.retain_rows_read, report.retain_rows, report.retain_rows_used) == (3, 3, 3)
    assert (report.rows_read, report.train_rows) == (5, 5)
    assert "retain " in report.summary() and "3 paired with examples" in report.summary()


def test_retain_order_is_a_seeded_shuffle(npo_cfg, tokenizer, partner_of):
    cfg = npo_cfg(8, 8)
    orders = {
        seed: partner_of(build_datasets(cfg, tokenizer, responses=NPO_RT, seed=seed).train, retain_rows(8))
        for seed in (0, 1)
    }
    assert all(sorted(order) == list(range(8)) for order in orders.values())
    assert orders[0] != orders[1]
    again = build_datasets(cfg, tokenizer, responses=NPO_RT, seed=0).train
    assert partner_of(again, retain_rows(8)) == orders[0]


def test_collated_labels_mask_each_responses_own_prompt(npo_cfg, tokenizer, ids, partner_of):
    prepared = build_datasets(npo_cfg(2, 2), tokenizer, responses=NPO_RT)
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=NPO_RT)(list(prepared.train))
    partners = partner_of(prepared.train, retain_rows(2))
    # forget: 3-token prompt + 2 answer tokens + eos; retain: 6-token prompt + 3 + eos -> T = 10
    assert {tuple(t.shape) for t in batch.values()} == {(2, 10)}
    for i, row in enumerate(forget_rows(2)):
        answer = ids(row["answer"]) + [EOS]
        assert batch["completion_labels"][i].tolist() == [M] * 3 + answer + [M] * 4
        assert batch["completion_input_ids"][i].tolist() == ids(row["question"]) + answer + [0] * 4
        assert batch["completion_attention_mask"][i].tolist() == [1] * 6 + [0] * 4
        partner = retain_rows(2)[partners[i]]
        retain = ids(partner["answer"]) + [EOS]
        assert batch["retain_labels"][i].tolist() == [M] * 6 + retain
        assert batch["retain_input_ids"][i].tolist() == ids(partner["question"]) + retain
        assert batch["retain_attention_mask"][i].tolist() == [1] * 10


def test_collated_batch_runs_through_the_concatenated_forward(npo_cfg, tokenizer, ids):
    from alignlab.builtin import build_model
    from alignlab.forward import concatenated_forward

    prepared = build_datasets(npo_cfg(3, 2), tokenizer, responses=NPO_RT)
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=NPO_RT)(list(prepared.train))
    with torch.no_grad():
        out = concatenated_forward(build_model(len(tokenizer), seed=0), batch, NPO_RT)
    assert out["completion"].lengths.tolist() == [3, 3, 3]  # "<word> ." + eos
    assert out["retain"].lengths.tolist() == [4, 4, 4]  # "really <word> !" + eos


def test_held_out_forget_rows_continue_the_retain_cycle(npo_cfg, tokenizer, partner_of):
    prepared = build_datasets(npo_cfg(10, 4, eval_size=0.2), tokenizer, responses=NPO_RT)
    assert (len(prepared.train), len(prepared.eval)) == (8, 2)
    assert prepared.eval.column_names == ["prompt_ids", "completion_ids", "retain_prompt_ids", "retain_ids"]
    train, held = partner_of(prepared.train, retain_rows(4)), partner_of(prepared.eval, retain_rows(4))
    assert sorted(train[:4]) == [0, 1, 2, 3] and train[4:] == train[:4]
    assert held == train[:2]  # eval examples 8 and 9 of the cycle of 4


def test_enough_retain_rows_give_distinct_partners(npo_cfg, tokenizer, partner_of):
    prepared = build_datasets(npo_cfg(10, 12, eval_size=0.2), tokenizer, responses=NPO_RT)
    partners = partner_of(prepared.train, retain_rows(12)) + partner_of(prepared.eval, retain_rows(12))
    assert len(set(partners)) == 10 and prepared.report.retain_rows_used == 10


def test_limit_applies_to_the_forget_set_only(npo_cfg, tokenizer):
    report = build_datasets(npo_cfg(6, 5, limit=2), tokenizer, responses=NPO_RT).report
    assert (report.rows_read, report.train_rows, report.retain_rows_read, report.retain_rows_used) == (
        2,
        2,
        5,
        2,
    )


# --- configuration errors -------------------------------------------------------------------------


def test_retain_response_without_data_retain(make_cfg, tokenizer):
    cfg = make_cfg(forget_rows(2), columns=COLUMNS)
    message = "this loss needs a retain set: set data.retain=<path> (e.g. the TOFU retain90.json)"
    with pytest.raises(DataError) as error:
        build_datasets(cfg, tokenizer, responses=NPO_RT)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("responses", "fields"),
    [(("chosen", "rejected"), ()), (("completion",), ()), (("completion",), ("label",))],
)
def test_data_retain_without_a_retain_response(npo_cfg, tokenizer, responses, fields):
    with pytest.raises(DataError) as error:
        build_datasets(npo_cfg(2, 2), tokenizer, responses=responses, fields=fields)
    text = str(error.value)
    assert "retain.jsonl' is set, but this loss does not use a retain set" in text
    assert "remove data.retain" in text and "loss variant" in text


def test_bad_retain_row_names_the_retain_file(npo_cfg, tokenizer, tmp_path):
    rows = [*retain_rows(1), {"question": "this show felt"}, *retain_rows(3)[1:]]
    source = f"{tmp_path / 'retain.jsonl'} row 1"
    with pytest.raises(DataError, match=rf"{source}: field 'answer' \(completion\) is missing"):
        build_datasets(npo_cfg(4, 0, retain=rows), tokenizer, responses=NPO_RT)
    prepared = build_datasets(npo_cfg(4, 0, retain=rows, on_bad_row="skip"), tokenizer, responses=NPO_RT)
    assert prepared.report.skipped == {"missing field": SkipCount(1, [source])}
    assert (prepared.report.retain_rows_read, prepared.report.retain_rows) == (4, 3)
    assert len(prepared.train) == 4


def test_retain_row_too_long_is_a_retain_bad_row(npo_cfg, tokenizer, tmp_path):
    rows = [*retain_rows(2), {"question": "really very truly my take : this film felt", "answer": "great ."}]
    source = f"{tmp_path / 'retain.jsonl'} row 2"
    with pytest.raises(DataError, match=rf"{source}: the prompt has 9 tokens"):
        build_datasets(
            npo_cfg(3, 0, retain=rows, max_prompt_length=8, max_length=16), tokenizer, responses=NPO_RT
        )
    report = build_datasets(
        npo_cfg(3, 0, retain=rows, max_prompt_length=8, max_length=16, on_bad_row="skip"),
        tokenizer,
        responses=NPO_RT,
    ).report
    assert report.skipped == {"prompt too long": SkipCount(1, [source])} and report.retain_rows == 2


def test_retain_without_the_mapped_column(npo_cfg, tokenizer):
    with pytest.raises(DataError, match=r"retain.jsonl: column 'question' \(explicit format\) is in no row"):
        build_datasets(npo_cfg(2, 0, retain=[{"q": "a", "answer": "b"}]), tokenizer, responses=NPO_RT)


def test_no_usable_retain_rows(npo_cfg, tokenizer):
    with pytest.raises(DataError, match=r"retain.jsonl: no usable retain rows left"):
        build_datasets(
            npo_cfg(2, 0, retain=[{"question": "a", "answer": " "}], on_bad_row="skip"),
            tokenizer,
            responses=NPO_RT,
        )


# --- cache ----------------------------------------------------------------------------------------


def test_cache_hit_and_retain_content_in_the_fingerprint(npo_cfg, tokenizer, ids):
    cfg = npo_cfg(3, 3)
    first = build_datasets(cfg, tokenizer, responses=NPO_RT)
    second = build_datasets(cfg, tokenizer, responses=NPO_RT)
    assert (first.report.cache_hit, second.report.cache_hit) == (False, True)
    assert second.train.to_list() == first.train.to_list()
    changed = [{**row, "answer": "truly awful !"} for row in retain_rows(3)]
    third = build_datasets(npo_cfg(3, 0, retain=changed), tokenizer, responses=NPO_RT)
    assert not third.report.cache_hit
    assert list(third.train["retain_ids"]) == [ids("truly awful !") + [EOS]] * 3


# --- check_data_needs: no file is read ------------------------------------------------------------


def cfg_without_files(**overrides: Any):
    from alignlab.config import DataConfig

    return DataConfig(path="/nonexistent/forget.jsonl", **overrides)


@pytest.mark.parametrize(
    ("responses", "fields", "retain"),
    [
        (NPO_RT, (), "/nonexistent/retain.jsonl"),
        (("completion",), (), None),
        (("completion",), ("label",), None),
        (("chosen", "rejected"), (), None),
        (("gold", "chosen", "rejected"), (), None),
        (("chosen", "rejected"), ("margin",), None),
    ],
)
def test_check_data_needs_accepts_served_shapes(responses, fields, retain):
    assert check_data_needs(cfg_without_files(retain=retain), responses, fields) is None


@pytest.mark.parametrize(
    ("responses", "fields", "retain", "says"),
    [
        (NPO_RT, (), None, "this loss needs a retain set: set data.retain=<path>"),
        (("chosen", "rejected"), (), "r.jsonl", "does not use a retain set"),
        (
            ("chosen", "rejected", "retain"),
            (),
            "r.jsonl",
            "serves a retain response only with the single response",
        ),
        (("retain",), (), "r.jsonl", "serves a retain response only with the single response"),
        (NPO_RT, ("label",), "r.jsonl", "the field 'label' (unpaired binary feedback) is served only"),
        (
            ("chosen", "rejected"),
            ("label",),
            None,
            "the field 'label' (unpaired binary feedback) is served only",
        ),
        (("completion",), ("completion",), None, "fields must be distinct names other than 'prompt'"),
        (("completion",), ("prompt",), None, "fields must be distinct names other than 'prompt'"),
        (("completion",), ("completion_ids",), None, "token columns"),
        (("completion",), ("x_labels",), None, "token columns"),
        (("completion",), ("label", "label"), None, "fields must be distinct"),
        (("chosen", "chosen"), (), None, "responses must be distinct"),
    ],
)
def test_check_data_needs_errors(responses, fields, retain, says):
    with pytest.raises(DataError) as error:
        check_data_needs(cfg_without_files(retain=retain), responses, fields)
    assert says in str(error.value) and "\n" not in str(error.value)


ALPACA = {
    "prompt": "instruction",
    "response_a": "output_1",
    "response_b": "output_2",
    "preference": "preference",
}


@pytest.mark.parametrize(
    ("overrides", "responses", "fields", "says"),
    [
        ({"columns": {"answer": "x"}}, ("chosen", "rejected"), (), "data.columns has unknown field 'answer'"),
        ({"columns": {"label": "x"}}, ("chosen", "rejected"), (), "data.columns has unknown field 'label'"),
        (
            {"columns": ALPACA},
            ("gold", "chosen", "rejected"),
            (),
            "pairwise judgements give only chosen/rejected",
        ),
        ({"columns": ALPACA, "format": "explicit"}, ("chosen", "rejected"), (), "need data.format=columns"),
        ({"format": "columns"}, ("chosen", "rejected"), (), "data.format=columns needs data.columns"),
    ],
)
def test_check_data_needs_checks_columns(overrides, responses, fields, says):
    with pytest.raises(DataError, match=says.replace("(", r"\(")):
        check_data_needs(cfg_without_files(**overrides), responses, fields)


def test_check_data_needs_lets_pairwise_columns_be_unpaired():
    cfg = cfg_without_files(columns={**ALPACA, "label": "thumbs"})
    assert check_data_needs(cfg, ("completion",), ("label",)) is None
