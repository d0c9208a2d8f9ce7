"""Responses with their own prompts (`Needs.own_prompts`, JPO's joint pairs): explicit rows
``{chosen_prompt, chosen, rejected_prompt, rejected}``, each response fitted and collated after its own
prompt; rows that lack a prompt are bad rows named like any other."""

from __future__ import annotations

import pytest

from alignlab.builtin import joint_pairs, sentiment_reward
from alignlab.data import DataError, PreferenceCollator, build_datasets, check_data_needs

OWN = {"responses": ("chosen", "rejected"), "own_prompts": ("chosen", "rejected")}


def joint_rows(n: int = 4) -> list[dict[str, str]]:
    subjects = ["film", "movie", "show", "book", "play", "song"]
    return [
        {
            "chosen_prompt": f"the {subjects[i]} was",
            "chosen": "really great .",
            "rejected_prompt": f"the {subjects[i + 1]} was",
            "rejected": "very dull .",
        }
        for i in range(n)
    ]


def test_each_response_gets_its_own_prompt(make_cfg, tokenizer, ids):
    train = build_datasets(make_cfg(joint_rows(3)), tokenizer, **OWN).train
    assert train.column_names == [
        "prompt_ids",
        "chosen_ids",
        "rejected_ids",
        "chosen_prompt_ids",
        "rejected_prompt_ids",
    ]
    row = train[1]
    assert row["chosen_prompt_ids"] == ids("the movie was")
    assert row["rejected_prompt_ids"] == ids("the show was")
    assert row["prompt_ids"] == ids("the movie was")  # the row's prompt is the first response's
    assert row["chosen_ids"] == [*ids("really great ."), tokenizer.eos_token_id]


def test_collated_labels_mask_each_responses_own_prompt(make_cfg, tokenizer, ids):
    rows = joint_rows(2)
    rows[1]["rejected_prompt"] = "my take : the film felt very"  # longer than the chosen one
    train = build_datasets(make_cfg(rows), tokenizer, **OWN).train
    batch = PreferenceCollator(tokenizer.pad_token_id, responses=OWN["responses"])(train.to_list())
    prompt = ids("my take : the film felt very")
    rejected = [*ids("very dull ."), tokenizer.eos_token_id]
    assert batch["rejected_input_ids"][1, : len(prompt) + len(rejected)].tolist() == prompt + rejected
    assert (batch["rejected_labels"][1, : len(prompt)] == -100).all()
    assert batch["rejected_labels"][1, len(prompt) : len(prompt) + len(rejected)].tolist() == rejected
    assert batch["chosen_input_ids"][1, :3].tolist() == ids("the movie was")


def test_official_column_names_through_data_columns(make_cfg, tokenizer, ids):
    rows = [
        {
            "i_chosen": r["chosen_prompt"],
            "r_chosen": r["chosen"],
            "i_reject": r["rejected_prompt"],
            "r_reject": r["rejected"],
        }
        for r in joint_rows(2)
    ]
    columns = {
        "chosen_prompt": "i_chosen",
        "chosen": "r_chosen",
        "rejected_prompt": "i_reject",
        "rejected": "r_reject",
    }
    train = build_datasets(make_cfg(rows, columns=columns), tokenizer, **OWN).train
    assert train[0]["rejected_prompt_ids"] == ids("the movie was")


def test_one_answer_to_two_instructions_is_a_pair_but_not_under_one(make_cfg, tokenizer):
    rows = joint_rows(2)
    rows[0]["rejected"] = rows[0]["chosen"]  # the same answer to two different instructions: kept
    rows[1]["rejected"], rows[1]["rejected_prompt"] = rows[1]["chosen"], rows[1]["chosen_prompt"]
    with pytest.raises(DataError, match=r"row 1: chosen and rejected are identical"):
        build_datasets(make_cfg(rows), tokenizer, **OWN)
    kept = build_datasets(make_cfg(rows, on_bad_row="skip"), tokenizer, **OWN)
    assert len(kept.train) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.pop("rejected_prompt"), r"row 2: field 'rejected_prompt' is missing"),
        (lambda row: row.update(chosen_prompt="  "), r"row 2: field 'chosen_prompt' is empty or whitespace"),
        (
            lambda row: row.update(chosen_prompt=3),
            r"row 2: field 'chosen_prompt' is a int, expected a string",
        ),
    ],
)
def test_a_row_without_its_prompt_is_a_bad_row(make_cfg, tokenizer, change, message):
    rows = joint_rows(4)
    change(rows[2])
    with pytest.raises(DataError, match=message):
        build_datasets(make_cfg(rows), tokenizer, **OWN)


def test_a_prompt_column_in_no_row_names_the_column(make_cfg, tokenizer):
    rows = [{"prompt": "the film was", "chosen": "great .", "rejected": "dull ."}]
    with pytest.raises(DataError, match=r"column 'chosen_prompt' \(explicit format\) is in no row"):
        build_datasets(make_cfg(rows), tokenizer, **OWN)


def test_a_long_own_prompt_is_named(make_cfg, tokenizer):
    rows = joint_rows(2)
    rows[1]["rejected_prompt"] = "the film was " * 8
    with pytest.raises(
        DataError, match=r"row 1: the rejected_prompt has 24 tokens, more than data.max_prompt_length=16"
    ):
        build_datasets(make_cfg(rows, max_prompt_length=16), tokenizer, **OWN)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"swap_pairs": True},
            "data.swap_pairs=true is not served with responses that have their own prompts",
        ),
        ({"format": "conversational"}, "read from explicit string rows, not data.format=conversational"),
        ({"columns": {"response_a": "a"}}, "data.columns has unknown field 'response_a'"),
    ],
)
def test_settings_that_cannot_serve_own_prompts_are_refused_before_reading(make_cfg, overrides, message):
    with pytest.raises(DataError, match=message):
        check_data_needs(make_cfg(path="nowhere.jsonl", **overrides), **OWN)


def test_message_lists_are_refused_with_the_fix(make_cfg, tokenizer):
    rows = [{**joint_rows(1)[0], "chosen": [{"role": "assistant", "content": "great ."}]}]
    with pytest.raises(DataError, match="holds messages.*render the conversations to strings"):
        build_datasets(make_cfg(rows), tokenizer, **OWN)


def test_builtin_joint_pairs_mix_conditional_and_joint_pairs_judged_by_the_reward():
    rows = joint_pairs(400, seed=1)
    assert rows == joint_pairs(400, seed=1) and rows != joint_pairs(400, seed=2)
    joint = [row for row in rows if row["chosen_prompt"] != row["rejected_prompt"]]
    assert 150 < len(joint) <= 200  # the odd rows, but for ties and repeated prompts
    for row in joint:
        chosen, rejected = sentiment_reward([], [row["chosen"], row["rejected"]])
        assert chosen > rejected
