"""The collator: prompt + response, right padding to one common length, prompt-masked labels."""

from __future__ import annotations

import pytest
import torch

from alignlab.data import DataError, PreferenceCollator, build_datasets

PAD, EOS = 0, 1
M = -100  # masked label


def test_pads_every_response_to_the_same_length():
    examples = [
        {"prompt_ids": [10, 11], "chosen_ids": [20, EOS], "rejected_ids": [30, 31, 32, EOS]},
        {"prompt_ids": [12], "chosen_ids": [21, 22, EOS], "rejected_ids": [EOS]},
    ]
    batch = PreferenceCollator(pad_token_id=PAD)(examples)
    assert sorted(batch) == sorted(
        f"{r}_{k}" for r in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")
    )
    # T = longest prompt + response over both responses: 2 + 4 = 6
    assert batch["chosen_input_ids"].tolist() == [[10, 11, 20, EOS, PAD, PAD], [12, 21, 22, EOS, PAD, PAD]]
    assert batch["rejected_input_ids"].tolist() == [[10, 11, 30, 31, 32, EOS], [12, EOS, PAD, PAD, PAD, PAD]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[M, M, 20, EOS, M, M], [M, 21, 22, EOS, M, M]]
    assert batch["rejected_labels"].tolist() == [[M, M, 30, 31, 32, EOS], [M, EOS, M, M, M, M]]
    assert all(t.dtype == torch.long and t.shape == (2, 6) for t in batch.values())


def test_concatenable_along_batch_and_tensor_inputs():
    examples = [
        {
            "prompt_ids": torch.tensor([3]),
            "gold_ids": torch.tensor([4, EOS]),
            "chosen_ids": [5, EOS],
            "rejected_ids": [6, 7, 8, EOS],
        }
    ]
    batch = PreferenceCollator(PAD, responses=("gold", "chosen", "rejected"))(examples)
    stacked = torch.cat([batch[f"{r}_input_ids"] for r in ("gold", "chosen", "rejected")])
    assert stacked.tolist() == [[3, 4, EOS, PAD, PAD], [3, 5, EOS, PAD, PAD], [3, 6, 7, 8, EOS]]


def test_pad_token_that_equals_a_real_token_is_still_masked():
    """Padding is known from lengths, not from the id, so pad == eos (a common setup) is safe."""
    batch = PreferenceCollator(pad_token_id=EOS)(
        [
            {"prompt_ids": [10], "chosen_ids": [EOS], "rejected_ids": [20, 21, EOS]},
        ]
    )
    assert batch["chosen_labels"].tolist() == [[M, EOS, M, M]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 0, 0]]


def test_no_pad_token():
    with pytest.raises(DataError, match="pad token"):
        PreferenceCollator(pad_token_id=None)


def test_missing_response_column():
    with pytest.raises(DataError, match="no 'gold_ids' column"):
        PreferenceCollator(PAD, responses=("gold",))([{"prompt_ids": [1], "chosen_ids": [2]}])


def test_on_a_built_dataset(make_cfg, tokenizer, ids, pairs):
    prepared = build_datasets(make_cfg(pairs(2)), tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(prepared.train))
    prompt = ids("the film was")
    assert batch["chosen_input_ids"][0].tolist() == prompt + ids("really great .") + [EOS]
    assert batch["chosen_labels"][0].tolist() == [M] * 3 + ids("really great .") + [EOS]
    assert batch["rejected_input_ids"][0].tolist() == prompt + ids("very dull .") + [EOS]


# --- own prompts and scalar fields ----------------------------------------------------------------


def test_a_response_with_its_own_prompt_uses_it():
    examples = [
        {
            "prompt_ids": [10, 11],
            "completion_ids": [20, EOS],
            "retain_prompt_ids": [30, 31, 32, 33],
            "retain_ids": [40, EOS],
        }
    ]
    batch = PreferenceCollator(PAD, responses=("completion", "retain"))(examples)
    assert batch["completion_input_ids"].tolist() == [[10, 11, 20, EOS, PAD, PAD]]
    assert batch["completion_labels"].tolist() == [[M, M, 20, EOS, M, M]]
    assert batch["retain_input_ids"].tolist() == [[30, 31, 32, 33, 40, EOS]]
    assert batch["retain_labels"].tolist() == [[M, M, M, M, 40, EOS]]
    assert batch["retain_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([True, False], torch.bool),
        ([1, 0], torch.long),  # ints stay ints (a bool-typed column arrives as Python bools)
        ([0.5, 2], torch.float32),  # any float makes the column float
        ([torch.tensor(True), torch.tensor(False)], torch.bool),  # a dataset in torch format
        ([torch.tensor(0.25), torch.tensor(1.5)], torch.float32),
    ],
)
def test_fields_become_1d_tensors(values, dtype):
    examples = [{"prompt_ids": [3], "completion_ids": [4, EOS], "label": value} for value in values]
    batch = PreferenceCollator(PAD, responses=("completion",), fields=("label",))(examples)
    assert batch["label"].dtype == dtype and batch["label"].shape == (2,)
    assert batch["label"].tolist() == [v.item() if hasattr(v, "item") else v for v in values]


def test_fields_are_not_collated_unless_asked():
    examples = [{"prompt_ids": [3], "completion_ids": [4], "label": True}]
    assert "label" not in PreferenceCollator(PAD, responses=("completion",))(examples)


def test_missing_or_non_scalar_field():
    collate = PreferenceCollator(PAD, responses=("completion",), fields=("label",))
    with pytest.raises(DataError, match=r"example 1 has no 'label' column .*fields=\.\.\."):
        collate(
            [
                {"prompt_ids": [3], "completion_ids": [4], "label": True},
                {"prompt_ids": [3], "completion_ids": [4]},
            ]
        )
    with pytest.raises(DataError, match=r"example 0 has label='yes'"):
        collate([{"prompt_ids": [3], "completion_ids": [4], "label": "yes"}])
