"""alignlab.scorers reads each response under its own prompt when it has one (JPO's rows): the scores of
MODPO's margins must be those of the sequences the loss trains on."""

from __future__ import annotations

import datasets
import torch

from alignlab.data import PreferenceCollator
from alignlab.scorers import _batches


def test_scoring_batches_carry_each_responses_own_prompt():
    rows = {
        "prompt_ids": [[5, 6], [7]],
        "chosen_ids": [[8, 2], [9, 2]],
        "rejected_ids": [[10, 2], [11, 2]],
        "rejected_prompt_ids": [[12, 13, 14], [15]],
    }
    (batch,) = list(_batches(datasets.Dataset.from_dict(rows), ("chosen", "rejected")))
    assert [row["rejected_prompt_ids"] for row in batch] == rows["rejected_prompt_ids"]
    collated = PreferenceCollator(0, responses=("chosen", "rejected"))(batch)
    # the rejected response of example 0 follows its own 3-token prompt, not the chosen one's 2 tokens
    assert collated["rejected_input_ids"][0, :5].tolist() == [12, 13, 14, 10, 2]
    assert collated["chosen_input_ids"][0, :4].tolist() == [5, 6, 8, 2]
    assert torch.equal(collated["rejected_labels"][0, :3], torch.full((3,), -100))


def test_scoring_batches_without_own_prompts_are_unchanged():
    rows = {"prompt_ids": [[5, 6]], "chosen_ids": [[8, 2]], "rejected_ids": [[10, 2]], "other": [1]}
    (batch,) = list(_batches(datasets.Dataset.from_dict(rows), ("chosen", "rejected")))
    assert batch == [{"prompt_ids": [5, 6], "chosen_ids": [8, 2], "rejected_ids": [10, 2]}]
