"""Unpaired binary feedback (BCO/KTO): responses ("completion",) with the field "label".

Labelled rows are read as they are; pairs of any format are unpaired into a desirable (chosen,
label True) and an undesirable (rejected, label False) example. The builtin chat template renders
a message as ``<|role|> content `` and closes an assistant turn with ``<eos> ``; expected ids are
looked up in the vocabulary (`ids`), never produced by the pipeline.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alignlab.data import DataError, PreferenceCollator, SkipCount, build_datasets

EOS = 1
UNPAIRED = {"responses": ("completion",), "fields": ("label",)}


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def build(make_cfg, tokenizer, rows, **cfg: Any):
    return build_datasets(make_cfg(rows, **cfg), tokenizer, **UNPAIRED)


# --- labelled rows --------------------------------------------------------------------------------


def test_explicit_labelled_rows(make_cfg, tokenizer, ids):
    rows = [
        {"prompt": "the film was", "completion": "really great .", "label": True},
        {"prompt": "the show was", "completion": "very dull .", "label": False},
        {"prompt": "the book was", "completion": "superb !", "label": 1},  # 1 / 0 are accepted
        {"prompt": "the play was", "completion": "stale .", "label": 0},
    ]
    prepared = build(make_cfg, tokenizer, rows)
    assert prepared.report.format == "explicit"
    assert prepared.train.column_names == ["prompt_ids", "completion_ids", "label"]
    assert prepared.train.features["label"].dtype == "bool"
    assert prepared.train["label"] == [True, False, True, False]
    assert prepared.train["prompt_ids"][1] == ids("the show was")
    assert prepared.train["completion_ids"][1] == ids("very dull .") + [EOS]
    report = prepared.report
    assert (report.unpaired_from_pairs, report.pairs_unpaired) == (False, 0)
    assert (report.desirable_rows, report.undesirable_rows) == (2, 2)
    assert "labels: 2 desirable, 2 undesirable" in report.summary()


def test_collated_labelled_batch(make_cfg, tokenizer, ids):
    rows = [
        {"prompt": "the film was", "completion": "great .", "label": True},
        {"prompt": "the show was so", "completion": "dull !", "label": False},
    ]
    prepared = build(make_cfg, tokenizer, rows)
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=("completion",), fields=("label",))(
        list(prepared.train)
    )
    assert sorted(batch) == [
        "completion_attention_mask",
        "completion_input_ids",
        "completion_labels",
        "label",
    ]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False]
    assert batch["completion_labels"].tolist() == [
        [-100] * 3 + ids("great .") + [EOS, -100],
        [-100] * 4 + ids("dull !") + [EOS],
    ]


def test_kto_style_messages_rows(make_cfg, tokenizer, ids):
    rows = [
        {"messages": [msg("user", "the film was"), msg("assistant", "great .")], "label": True},
        {
            "messages": [
                msg("user", "the show was"),
                msg("assistant", "dull ."),
                msg("user", "and the plot"),
                msg("assistant", "boring !"),
            ],
            "label": False,
        },
    ]
    prepared = build(make_cfg, tokenizer, rows)
    assert prepared.report.format == "messages"
    assert prepared.train["prompt_ids"] == [
        ids("<|user|> the film was <|assistant|>"),
        ids("<|user|> the show was <|assistant|> dull . <eos> <|user|> and the plot <|assistant|>"),
    ]
    assert prepared.train["completion_ids"] == [ids("great . <eos>"), ids("boring ! <eos>")]  # one eos
    assert prepared.train["label"] == [True, False]


def test_messages_rows_with_forced_conversational_format(make_cfg, tokenizer):
    rows = [{"messages": [msg("user", "the film was"), msg("assistant", "great .")], "label": True}]
    assert build(make_cfg, tokenizer, rows, format="conversational").report.format == "messages"


def test_conversational_prompt_and_completion_lists(make_cfg, tokenizer, ids):
    rows = [
        {
            "prompt": [msg("system", "be brief"), msg("user", "the film was")],
            "completion": [msg("assistant", "great .")],
            "label": False,
        }
    ]
    prepared = build(make_cfg, tokenizer, rows)
    assert prepared.report.format == "conversational"
    row = prepared.train[0]
    assert row["prompt_ids"] == ids("<|system|> be brief <|user|> the film was <|assistant|>")
    assert row["completion_ids"] == ids("great . <eos>")
    assert row["label"] is False


def test_conversational_whole_conversation_as_completion(make_cfg, tokenizer, ids):
    """A completion column holding the whole conversation: its last message is the completion."""
    rows = [{"completion": [msg("user", "the film was"), msg("assistant", "great .")], "label": True}]
    row = build(make_cfg, tokenizer, rows).train[0]
    assert row["prompt_ids"] == ids("<|user|> the film was <|assistant|>")
    assert row["completion_ids"] == ids("great . <eos>")


def test_label_and_completion_mapped_with_columns(make_cfg, tokenizer, ids):
    rows = [{"question": "the film was", "answer": "great .", "thumbs_up": True}]
    columns = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    row = build(make_cfg, tokenizer, rows, columns=columns).train[0]
    assert (row["prompt_ids"], row["completion_ids"], row["label"]) == (
        ids("the film was"),
        ids("great .") + [EOS],
        True,
    )


def test_label_column_in_no_row(make_cfg, tokenizer):
    rows = [{"prompt": "the film was", "completion": "great ."}]
    with pytest.raises(DataError) as error:
        build(make_cfg, tokenizer, rows)
    text = str(error.value)
    assert "column 'label'" in text and "data.columns={label: <your column>}" in text


def test_held_out_split_of_labelled_rows(make_cfg, tokenizer, pairs):
    rows = [
        {"prompt": row["prompt"], "completion": row["chosen"], "label": i % 2 == 0}
        for i, row in enumerate(pairs(10))
    ]
    prepared = build(make_cfg, tokenizer, rows, eval_size=0.2)
    assert (len(prepared.train), len(prepared.eval)) == (8, 2)
    assert prepared.eval.column_names == ["prompt_ids", "completion_ids", "label"]
    everything = [*prepared.train["prompt_ids"], *prepared.eval["prompt_ids"]]
    assert len({tuple(p) for p in everything}) == 10  # disjoint, none lost


# --- bad labels -----------------------------------------------------------------------------------

GOOD = [{"prompt": f"the {s} was", "completion": "great .", "label": True} for s in ("film", "show", "book")]


@pytest.mark.parametrize(
    ("label", "reason", "says"),
    [
        ("yes", "bad label", "field 'label' is 'yes', not true or false"),
        (2, "bad label", "field 'label' is 2, not true or false"),
        (1.0, "bad label", "field 'label' is 1.0, not true or false"),
        (None, "missing field", "field 'label' is missing"),
        ("absent", "missing field", "field 'label' is missing"),
    ],
)
def test_bad_label_error_and_skip(make_cfg, tokenizer, tmp_path, label, reason, says):
    bad = {"prompt": "the play was", "completion": "dull ."}
    if label != "absent":
        bad["label"] = label
    rows = [*GOOD[:2], bad, GOOD[2]]
    with pytest.raises(DataError) as error:
        build(make_cfg, tokenizer, rows)
    text = str(error.value)
    assert f"{tmp_path / 'data.jsonl'} row 2: {says}" in text
    assert f"({reason})" in text and "Fix:" in text and "data.on_bad_row=skip" in text
    if reason == "bad label":
        assert "true (desirable) or false (undesirable)" in text
    prepared = build(make_cfg, tokenizer, rows, on_bad_row="skip")
    assert prepared.report.skipped == {reason: SkipCount(1, [f"{tmp_path / 'data.jsonl'} row 2"])}
    assert prepared.train["label"] == [True, True, True]


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        (
            [msg("user", "the film was"), msg("assistant", "great ."), msg("user", "and")],
            "the last message of 'messages' is from 'user', not the assistant's completion",
        ),
        ([msg("assistant", "great .")], "field 'messages' has a single message"),
    ],
)
def test_bad_messages_rows(make_cfg, tokenizer, messages, says):
    good = {"messages": [msg("user", "the film was"), msg("assistant", "great .")], "label": True}
    rows = [good, {"messages": messages, "label": False}]
    with pytest.raises(DataError, match=r"row 1: .*\(bad message structure\)") as error:
        build(make_cfg, tokenizer, rows)
    assert says in str(error.value)
    assert build(make_cfg, tokenizer, rows, on_bad_row="skip").report.rows_skipped == 1


# --- unpairing pairs ------------------------------------------------------------------------------

ALPACA = {
    "prompt": "instruction",
    "response_a": "output_1",
    "response_b": "output_2",
    "preference": "preference",
}


def user_assistant(prompt: str, answer: str) -> list[dict[str, str]]:
    return [msg("user", prompt), msg("assistant", answer)]


#: format name -> (two pair rows, config overrides, expected prompts, expected completions in order)
PAIR_FORMATS = {
    "explicit": (
        [
            {"prompt": "the film was", "chosen": "great .", "rejected": "dull ."},
            {"prompt": "the show was", "chosen": "superb !", "rejected": "bland !"},
        ],
        {},
        ["the film was", "the show was"],
        ["great .", "dull .", "superb !", "bland !"],
    ),
    "hh": (
        [
            {
                "chosen": "\n\nHuman: the film was\n\nAssistant: great .",
                "rejected": "\n\nHuman: the film was\n\nAssistant: dull .",
            },
            {
                "chosen": "\n\nHuman: the show was\n\nAssistant: superb !",
                "rejected": "\n\nHuman: the show was\n\nAssistant: bland !",
            },
        ],
        {},
        ["Human: the film was Assistant:", "Human: the show was Assistant:"],
        ["great .", "dull .", "superb !", "bland !"],
    ),
    "conversational": (
        [
            {
                "chosen": user_assistant("the film was", "great ."),
                "rejected": user_assistant("the film was", "dull ."),
            },
            {
                "chosen": user_assistant("the show was", "superb !"),
                "rejected": user_assistant("the show was", "bland !"),
            },
        ],
        {},
        ["<|user|> the film was <|assistant|>", "<|user|> the show was <|assistant|>"],
        ["great . <eos>", "dull . <eos>", "superb ! <eos>", "bland ! <eos>"],
    ),
    "sharegpt": (
        [
            {
                "conversations": [{"from": "human", "value": p}],
                "chosen": {"from": "gpt", "value": c},
                "rejected": {"from": "gpt", "value": r},
            }
            for p, c, r in (("the film was", "great .", "dull ."), ("the show was", "superb !", "bland !"))
        ],
        {},
        ["<|user|> the film was <|assistant|>", "<|user|> the show was <|assistant|>"],
        ["great . <eos>", "dull . <eos>", "superb ! <eos>", "bland ! <eos>"],
    ),
    "pairwise": (
        [
            {"instruction": "the film was", "output_1": "great .", "output_2": "dull .", "preference": 1},
            {"instruction": "the show was", "output_1": "bland !", "output_2": "superb !", "preference": 2},
        ],
        {"columns": ALPACA},
        ["the film was", "the show was"],
        ["great .", "dull .", "superb !", "bland !"],
    ),
}


@pytest.mark.parametrize("kind", PAIR_FORMATS)
def test_pairs_are_unpaired(make_cfg, tokenizer, ids, kind):
    rows, cfg, prompts, completions = PAIR_FORMATS[kind]
    prepared = build(make_cfg, tokenizer, rows, **cfg)
    report = prepared.report
    assert report.format == kind
    assert (report.unpaired_from_pairs, report.pairs_unpaired) == (True, 2)
    assert (report.rows_read, report.train_rows) == (2, 4)
    assert (report.desirable_rows, report.undesirable_rows) == (2, 2)
    assert "unpaired 2 pairs" in report.summary()
    train = prepared.train
    assert train.column_names == ["prompt_ids", "completion_ids", "label"]
    assert train["label"] == [True, False, True, False]
    assert train["prompt_ids"] == [ids(p) for p in prompts for _ in range(2)]
    eos = [] if "<eos>" in completions[0] else [EOS]
    assert train["completion_ids"] == [ids(c) + eos for c in completions]


def test_bad_pair_is_one_bad_row_when_unpairing(make_cfg, tokenizer, tmp_path, pairs):
    rows = [
        *pairs(2),
        {"prompt": "the book was", "chosen": "great .", "rejected": "great ."},
        {"prompt": "really very truly the film was", "chosen": "great .", "rejected": "dull ."},
    ]
    with pytest.raises(DataError, match=r"row 2: chosen and rejected are identical"):
        build(make_cfg, tokenizer, rows)
    prepared = build(make_cfg, tokenizer, rows, on_bad_row="skip", max_length=8, max_prompt_length=4)
    source = str(tmp_path / "data.jsonl")
    # the too-long prompt fails both of its examples at tokenization, and counts as one row
    assert prepared.report.skipped == {
        "identical responses": SkipCount(1, [f"{source} row 2"]),
        "prompt too long": SkipCount(1, [f"{source} row 3"]),
    }
    assert prepared.report.pairs_unpaired == 3 and len(prepared.train) == 4


def test_unpaired_pairs_are_held_out_whole(make_cfg, tokenizer, words, pairs):
    prepared = build(make_cfg, tokenizer, pairs(10), eval_size=0.2)
    assert (len(prepared.train), len(prepared.eval)) == (16, 4)
    assert prepared.report.pairs_unpaired == 10
    assert prepared.eval["label"] == [True, False, True, False]
    eval_prompts = [words(p) for p in prepared.eval["prompt_ids"]]
    assert eval_prompts[0] == eval_prompts[1] and eval_prompts[2] == eval_prompts[3]
    assert not set(eval_prompts) & {words(p) for p in prepared.train["prompt_ids"]}


def test_other_fields_are_copied_to_both_halves(make_cfg, tokenizer):
    rows = [{"prompt": "the film was", "chosen": "great .", "rejected": "dull .", "weight": 0.5}]
    prepared = build_datasets(
        make_cfg(rows), tokenizer, responses=("completion",), fields=("label", "weight")
    )
    assert prepared.train["weight"] == [0.5, 0.5] and prepared.train["label"] == [True, False]


def test_pairs_without_a_label_field_are_not_unpaired(make_cfg, tokenizer, pairs):
    """Plain NPO (no label) wants one completion per row: pairs would be a silent guess."""
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg(pairs(2)), tokenizer, responses=("completion",))
    assert "column 'completion'" in str(error.value) and "data.columns={completion:" in str(error.value)


def test_plain_completion_rows_need_no_label(make_cfg, tokenizer, ids):
    rows = [
        {"question": "the film was", "answer": "great ."},
        {"question": "the show was", "answer": "dull ."},
    ]
    cfg = make_cfg(rows, columns={"prompt": "question", "completion": "answer"})
    prepared = build_datasets(cfg, tokenizer, responses=("completion",))
    assert prepared.train.column_names == ["prompt_ids", "completion_ids"]
    assert prepared.train["completion_ids"] == [ids("great .") + [EOS], ids("dull .") + [EOS]]
    assert (prepared.report.desirable_rows, prepared.report.undesirable_rows) == (0, 0)
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=("completion",))(list(prepared.train))
    assert batch["completion_labels"].tolist()[0] == [-100] * 3 + ids("great .") + [EOS]


# --- other scalar fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "dtype", "collated"),
    [
        ([0.5, 2], "float64", torch.float32),
        ([3, -1], "int64", torch.long),
        ([True, False], "bool", torch.bool),
    ],
)
def test_score_fields_keep_their_type(make_cfg, tokenizer, pairs, values, dtype, collated):
    rows = [{**row, "margin": value} for row, value in zip(pairs(2), values, strict=True)]
    prepared = build_datasets(make_cfg(rows), tokenizer, fields=("margin",))
    assert prepared.train.features["margin"].dtype == dtype
    assert prepared.train["margin"] == values
    batch = PreferenceCollator(0, fields=("margin",))(list(prepared.train))
    assert batch["margin"].dtype == collated and batch["margin"].tolist() == values


@pytest.mark.parametrize(
    ("value", "reason"),
    [("high", "bad field value"), (float("nan"), "bad field value"), (None, "missing field")],
)
def test_bad_score_field(make_cfg, tokenizer, pairs, value, reason):
    rows = [{**pairs(1)[0], "margin": 1.0}, {**pairs(2)[1], "margin": value}]
    with pytest.raises(DataError, match=rf"row 1: field 'margin' .*\({reason}\)"):
        build_datasets(make_cfg(rows), tokenizer, fields=("margin",))
