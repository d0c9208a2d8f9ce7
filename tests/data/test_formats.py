"""Every preference format, from raw rows to canonical strings and token ids.

The builtin chat template renders a message as ``<|role|> content `` and closes an assistant turn
with ``<eos> ``; the generation prompt is ``<|assistant|> ``. Expected renderings below are written
out by hand from that template.
"""

from __future__ import annotations

import pytest

from alignlab.data import DataError, PreferenceCollator, build_datasets
from alignlab.data.normalise import Plan, normalize, plan_format
from alignlab.data.rows import RowRef

HH_CHOSEN = (
    "\n\nHuman: the film was\n\nAssistant: really great .\n\nHuman: and the plot\n\nAssistant: superb !"
)
HH_REJECTED = (
    "\n\nHuman: the film was\n\nAssistant: really great .\n\nHuman: and the plot\n\nAssistant: dull !"
)
HH_PROMPT = "\n\nHuman: the film was\n\nAssistant: really great .\n\nHuman: and the plot\n\nAssistant:"


def canonical(rows, kind, tokenizer, responses=("chosen", "rejected"), columns=None):
    """Normalize raw rows with a fixed plan; fail on any bad row."""
    plan = Plan(kind, responses, columns or {})
    out = normalize([(RowRef("t.jsonl", i), row) for i, row in enumerate(rows)], plan, tokenizer)
    assert not out.bad, [b.message() for b in out.bad]
    return out.rows


def msg(role, content):
    return {"role": role, "content": content}


# --- explicit -------------------------------------------------------------------------------------


def test_explicit_ids_prompt_then_response_plus_eos(make_cfg, tokenizer, ids):
    cfg = make_cfg([{"prompt": "the film was", "chosen": "really great .", "rejected": "very dull ."}])
    prepared = build_datasets(cfg, tokenizer)
    assert prepared.report.format == "explicit"
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    row = prepared.train[0]
    assert row["prompt_ids"] == ids("the film was")
    assert row["chosen_ids"] == ids("really great .") + [1]  # eos id 1
    assert row["rejected_ids"] == ids("very dull .") + [1]
    assert prepared.eval is None


def test_generic_responses_triples(make_cfg, tokenizer, ids):
    """Response names are not hard-wired: ("gold", "chosen", "rejected") works the same way."""
    rows = [
        {"prompt": "the film was", "gold": "truly superb !", "chosen": "really great .", "rejected": "dull ."}
    ]
    prepared = build_datasets(make_cfg(rows), tokenizer, responses=("gold", "chosen", "rejected"))
    assert prepared.train.column_names == ["prompt_ids", "gold_ids", "chosen_ids", "rejected_ids"]
    assert prepared.train[0]["gold_ids"] == ids("truly superb !") + [1]


# --- HH -------------------------------------------------------------------------------------------


def test_hh_prompt_ends_at_last_assistant_turn(tokenizer):
    [row] = canonical([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "hh", tokenizer)
    assert row == {"prompt": HH_PROMPT, "chosen": " superb !", "rejected": " dull !"}


def test_hh_end_to_end_auto_detected(make_cfg, tokenizer, ids):
    prepared = build_datasets(make_cfg([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), tokenizer)
    assert prepared.report.format == "hh"
    row = prepared.train[0]
    # "Human:" and "Assistant:" are not in the word-level vocabulary: <unk> (id 2)
    expected = "Human: the film was Assistant: really great . Human: and the plot Assistant:"
    assert row["prompt_ids"] == ids(expected)
    assert row["prompt_ids"][-1] == 2
    assert row["chosen_ids"] == ids("superb !") + [1]
    assert row["rejected_ids"] == ids("dull !") + [1]


# --- conversational -------------------------------------------------------------------------------


def test_conversational_explicit_prompt_rendering(tokenizer):
    rows = [
        {
            "prompt": [msg("user", "the film was")],
            "chosen": [msg("assistant", "great .")],
            "rejected": [msg("assistant", "dull .")],
        }
    ]
    [row] = canonical(rows, "conversational", tokenizer)
    assert row == {
        "prompt": "<|user|> the film was <|assistant|> ",
        "chosen": "great . <eos> ",
        "rejected": "dull . <eos> ",
    }


def test_conversational_implicit_prompt_multi_turn(tokenizer):
    shared = [msg("user", "the film was"), msg("assistant", "great ."), msg("user", "and the plot")]
    rows = [
        {"chosen": [*shared, msg("assistant", "superb !")], "rejected": [*shared, msg("assistant", "dull !")]}
    ]
    [row] = canonical(rows, "conversational", tokenizer)
    assert row == {
        "prompt": "<|user|> the film was <|assistant|> great . <eos> <|user|> and the plot <|assistant|> ",
        "chosen": "superb ! <eos> ",
        "rejected": "dull ! <eos> ",
    }


def test_conversational_ids_prompt_has_no_extra_special_tokens_and_single_eos(make_cfg, tokenizer, ids):
    rows = [
        {
            "chosen": [msg("user", "the film was"), msg("assistant", "great .")],
            "rejected": [msg("user", "the film was"), msg("assistant", "dull .")],
        }
    ]
    prepared = build_datasets(make_cfg(rows), tokenizer)
    assert prepared.report.format == "conversational"
    row = prepared.train[0]
    assert row["prompt_ids"] == ids("<|user|> the film was <|assistant|>")
    assert row["chosen_ids"] == ids("great . <eos>")  # the template's <eos>, not a second one
    assert row["rejected_ids"] == ids("dull . <eos>")


def test_sharegpt_maps_speakers_to_roles(tokenizer):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "be kind"},
                {"from": "human", "value": "the film was"},
            ],
            "chosen": {"from": "gpt", "value": "great ."},
            "rejected": {"from": "gpt", "value": "dull ."},
        }
    ]
    [row] = canonical(rows, "sharegpt", tokenizer)
    assert row == {
        "prompt": "<|system|> be kind <|user|> the film was <|assistant|> ",
        "chosen": "great . <eos> ",
        "rejected": "dull . <eos> ",
    }


def test_sharegpt_auto_detected(make_cfg, tokenizer, ids):
    rows = [
        {
            "conversations": [{"from": "human", "value": "the film was"}],
            "chosen": {"from": "gpt", "value": "great ."},
            "rejected": {"from": "gpt", "value": "dull ."},
        }
    ]
    prepared = build_datasets(make_cfg(rows), tokenizer)
    assert prepared.report.format == "sharegpt"
    assert prepared.train[0]["prompt_ids"] == ids("<|user|> the film was <|assistant|>")


def test_no_chat_template_is_a_data_error(make_cfg, tokenizer):
    bare = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>"
    )
    assert not bare.chat_template
    rows = [
        {
            "prompt": [msg("user", "the film was")],
            "chosen": [msg("assistant", "great .")],
            "rejected": [msg("assistant", "dull .")],
        }
    ]
    with pytest.raises(DataError, match="chat template") as error:
        build_datasets(make_cfg(rows), bare)
    assert "model.chat_template" in str(error.value)


# --- columns --------------------------------------------------------------------------------------


ALPACA = {
    "prompt": "instruction",
    "response_a": "output_1",
    "response_b": "output_2",
    "preference": "preference",
}


def test_columns_pairwise_preference_orders_the_pair(make_cfg, tokenizer, ids, tmp_path):
    rows = [
        {"instruction": "the film was", "output_1": "great .", "output_2": "dull .", "preference": 1},
        {"instruction": "the show was", "output_1": "dull .", "output_2": "superb .", "preference": 2},
        {"instruction": "the book was", "output_1": "fine .", "output_2": "fine !", "preference": 0},
    ]
    prepared = build_datasets(make_cfg(rows, columns=ALPACA, on_bad_row="skip"), tokenizer)
    assert prepared.report.format == "pairwise"
    assert prepared.train["prompt_ids"] == [ids("the film was"), ids("the show was")]
    assert prepared.train["chosen_ids"] == [ids("great .") + [1], ids("superb .") + [1]]
    assert prepared.train["rejected_ids"] == [ids("dull .") + [1], ids("dull .") + [1]]
    tie = prepared.report.skipped["tie / no preference"]
    assert tie.count == 1 and tie.examples == [f"{tmp_path / 'data.jsonl'} row 2"]


def test_columns_tie_in_error_mode(make_cfg, tokenizer):
    rows = [{"instruction": "the film was", "output_1": "great .", "output_2": "dull .", "preference": 0}]
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg(rows, columns=ALPACA), tokenizer)
    text = str(error.value)
    assert "row 0" in text and "tie / no preference" in text and "'preference'" in text
    assert "data.on_bad_row=skip" in text


def test_columns_rename_to_explicit(make_cfg, tokenizer, ids):
    rows = [{"question": "the film was", "good": "great .", "bad": "dull ."}]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    cfg = make_cfg(rows, format="columns", columns=columns)
    prepared = build_datasets(cfg, tokenizer)
    assert prepared.report.format == "explicit"
    assert prepared.train[0]["chosen_ids"] == ids("great .") + [1]


def test_columns_format_without_columns(make_cfg, tokenizer, pairs):
    with pytest.raises(DataError, match=r"data.format=columns needs data.columns"):
        build_datasets(make_cfg(pairs(2), format="columns"), tokenizer)


def test_unknown_columns_key(make_cfg, tokenizer, pairs):
    with pytest.raises(DataError, match=r"data.columns has unknown field 'answer'"):
        build_datasets(make_cfg(pairs(2), columns={"answer": "x"}), tokenizer)


# --- detection and missing columns ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "explicit"),
        ({"chosen": "a", "rejected": "b"}, "hh"),
        ({"chosen": [msg("user", "a")], "rejected": [msg("user", "b")]}, "conversational"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt"),
    ],
)
def test_auto_detection(row, kind):
    assert plan_format("auto", {}, [row], ("chosen", "rejected"), "x").kind == kind


def test_nothing_matches_lists_columns(make_cfg, tokenizer):
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg([{"question": "q", "answer": "a"}]), tokenizer)
    text = str(error.value)
    assert "answer, question" in text and "data.format" in text and "data.columns" in text


def test_missing_column_in_every_row(make_cfg, tokenizer):
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg([{"prompt": "the film was", "chosen": "great ."}]), tokenizer)
    text = str(error.value)
    assert "'rejected'" in text and "data.columns={rejected:" in text


def test_forced_format_missing_prompt(make_cfg, tokenizer):
    with pytest.raises(DataError, match=r"column 'prompt' \(explicit format\) is in no row"):
        build_datasets(make_cfg([{"chosen": "a", "rejected": "b"}], format="explicit"), tokenizer)


def test_rendering_matches_trl_preference_form(tokenizer):
    """Rendering per response equals trl's own chosen/rejected rendering (the reference)."""
    from trl.data_utils import apply_chat_template

    example = {
        "prompt": [msg("system", "be brief"), msg("user", "the film was")],
        "chosen": [msg("assistant", "great .")],
        "rejected": [msg("assistant", "dull .")],
    }
    [row] = canonical([example], "conversational", tokenizer)
    assert row == apply_chat_template(example, tokenizer)


def test_pairwise_needs_pair_responses(make_cfg, tokenizer):
    rows = [{"instruction": "a", "output_1": "b", "output_2": "c", "preference": 1}]
    with pytest.raises(DataError, match="pairwise judgements give only chosen/rejected pairs"):
        build_datasets(make_cfg(rows, columns=ALPACA), tokenizer, responses=("gold", "chosen", "rejected"))
    with pytest.raises(DataError, match="need data.format=columns"):
        build_datasets(make_cfg(rows, columns=ALPACA, format="explicit"), tokenizer)


@pytest.mark.parametrize("responses", [(), ("chosen", "chosen"), ("prompt", "chosen")])
def test_bad_response_names(make_cfg, tokenizer, pairs, responses):
    with pytest.raises(DataError, match="responses must be distinct"):
        build_datasets(make_cfg(pairs(2)), tokenizer, responses=responses)


# --- triples (TPO: gold, chosen, rejected) --------------------------------------------------------

TRIPLE = ("gold", "chosen", "rejected")


def test_triples_explicit_ids_and_collated_batch(make_cfg, tokenizer, ids):
    rows = [
        {
            "prompt": "the film was",
            "gold": "truly superb !",
            "chosen": "really great .",
            "rejected": "dull .",
        },
        {"prompt": "the show was", "gold": "brilliant !", "chosen": "fresh .", "rejected": "very bland ."},
    ]
    prepared = build_datasets(make_cfg(rows), tokenizer, responses=TRIPLE)
    assert prepared.train.column_names == ["prompt_ids", "gold_ids", "chosen_ids", "rejected_ids"]
    assert prepared.train["gold_ids"] == [ids("truly superb !") + [1], ids("brilliant !") + [1]]
    assert prepared.train["rejected_ids"] == [ids("dull .") + [1], ids("very bland .") + [1]]
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=TRIPLE)(list(prepared.train))
    # T = 3 + 4 (the longest: prompt + "truly superb !" + eos)
    assert {tuple(batch[f"{r}_labels"].shape) for r in TRIPLE} == {(2, 7)}
    assert batch["gold_labels"].tolist() == [
        [-100] * 3 + ids("truly superb !") + [1],
        [-100] * 3 + ids("brilliant !") + [1, -100],
    ]
    assert batch["chosen_input_ids"][1].tolist() == ids("the show was fresh .") + [1, 0]


def test_triples_conversational_implicit_prompt(tokenizer):
    user = msg("user", "the film was")
    rows = [
        {
            name: [user, msg("assistant", text)]
            for name, text in zip(TRIPLE, ("superb !", "great .", "dull ."), strict=True)
        }
    ]
    [row] = canonical(rows, "conversational", tokenizer, responses=TRIPLE)
    assert row == {
        "prompt": "<|user|> the film was <|assistant|> ",
        "gold": "superb ! <eos> ",
        "chosen": "great . <eos> ",
        "rejected": "dull . <eos> ",
    }


def test_triples_conversational_explicit_prompt_end_to_end(make_cfg, tokenizer, ids):
    rows = [
        {
            "prompt": [msg("user", "the film was")],
            "gold": [msg("assistant", "superb !")],
            "chosen": [msg("assistant", "great .")],
            "rejected": [msg("assistant", "dull .")],
        }
    ]
    prepared = build_datasets(make_cfg(rows), tokenizer, responses=TRIPLE)
    assert prepared.report.format == "conversational"
    row = prepared.train[0]
    assert row["prompt_ids"] == ids("<|user|> the film was <|assistant|>")
    assert row["gold_ids"] == ids("superb ! <eos>")


def test_triples_missing_gold_column_names_it(make_cfg, tokenizer, pairs):
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg(pairs(2)), tokenizer, responses=TRIPLE)
    text = str(error.value)
    assert "column 'gold'" in text and "data.columns={gold: <your column>}" in text


def test_triples_gold_mapped_from_another_column(make_cfg, tokenizer, ids):
    rows = [{"prompt": "the film was", "best": "superb !", "chosen": "great .", "rejected": "dull ."}]
    prepared = build_datasets(make_cfg(rows, columns={"gold": "best"}), tokenizer, responses=TRIPLE)
    assert prepared.train[0]["gold_ids"] == ids("superb !") + [1]


def test_triples_gold_equal_to_chosen_is_a_bad_row(make_cfg, tokenizer, tmp_path):
    rows = [
        {"prompt": "the film was", "gold": "superb !", "chosen": "great .", "rejected": "dull ."},
        {"prompt": "the show was", "gold": "great .", "chosen": "great .", "rejected": "dull ."},
    ]
    with pytest.raises(DataError, match=r"data.jsonl row 1: gold and chosen are identical"):
        build_datasets(make_cfg(rows), tokenizer, responses=TRIPLE)
    report = build_datasets(make_cfg(rows, on_bad_row="skip"), tokenizer, responses=TRIPLE).report
    assert report.skipped["identical responses"].examples == [f"{tmp_path / 'data.jsonl'} row 1"]
    assert report.train_rows == 1
