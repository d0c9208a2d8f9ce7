"""Batching tokenized preference examples into padded tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from alignlab.data.rows import DataError

#: label of positions that carry no loss (prompt and padding), as in PyTorch's cross-entropy.
IGNORE_INDEX = -100


class PreferenceCollator:
    """Pad examples ``{prompt_ids, <r>_ids..., <field>...}`` into one batch per response.

    For each response ``r`` the batch holds ``r_input_ids`` (prompt + response), ``r_attention_mask``
    and ``r_labels`` (the input ids with `IGNORE_INDEX` on prompt and padding positions), each
    `(B, T)` long tensors, right-padded. The prompt of ``r`` is the example's ``r_prompt_ids`` when
    it has that column (a response with its own prompt, e.g. NPO's ``retain``), else the shared
    ``prompt_ids``. Every response of a batch is padded to the same `T` (the longest prompt +
    response over all of them), so the trainer can concatenate the responses along the batch
    dimension and run one forward pass.

    Each name in `fields` becomes a `(B,)` tensor of the examples' scalar values: bool when every
    value is a bool, float32 when any is a float, else long.

    Args:
        pad_token_id: the id that fills padding positions of `*_input_ids`.
        responses: the response names to collate, e.g. ("chosen", "rejected").
        fields: the scalar columns to pass through, e.g. ("label",).
        sequences: float-list columns to pad into `(B, L)` NaN-padded tensors, e.g. precomputed
            reference log-probs.
    """

    def __init__(
        self,
        pad_token_id: int,
        responses: Sequence[str] = ("chosen", "rejected"),
        fields: Sequence[str] = (),
        sequences: Sequence[str] = (),
    ) -> None:
        if pad_token_id is None:
            raise DataError(
                "the collator needs a pad token id and the tokenizer has none. Fix: set "
                "tokenizer.pad_token (for example to its eos_token) before building the collator"
            )
        self.pad_token_id = int(pad_token_id)
        self.responses = tuple(responses)
        self.fields = tuple(fields)
        self.sequences = tuple(sequences)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate `examples` into ``{r_input_ids, r_attention_mask, r_labels}`` for every response.

        Args:
            examples: rows of a tokenized dataset (lists or tensors of ids).

        Returns:
            `(B, T)` long tensors, `T` shared by all responses, and one `(B,)` tensor per field.
        """
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        prompts, sequences, lengths = [], [], []
        for name in self.responses:
            for ex in examples:
                prompt, response = _ids(ex, _prompt_column(ex, name)), _ids(ex, f"{name}_ids")
                prompts.append(len(prompt))
                sequences.append(torch.tensor(prompt + response, dtype=torch.long))
                lengths.append(len(prompt) + len(response))
        # one right-padded (n·B, T) tensor: every response of the batch shares the longest T
        input_ids = pad_sequence(
            sequences, batch_first=True, padding_value=self.pad_token_id, padding_side="right"
        )
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions < torch.tensor(lengths)[:, None]).long()
        labels = input_ids.masked_fill(
            ~attention_mask.bool() | (positions < torch.tensor(prompts)[:, None]), IGNORE_INDEX
        )
        batch: dict[str, torch.Tensor] = {}
        n = len(self.responses)
        for i, name in enumerate(self.responses):  # own copies: a batch saved by safetensors shares no memory
            batch[f"{name}_input_ids"] = input_ids.chunk(n)[i].clone()
            batch[f"{name}_attention_mask"] = attention_mask.chunk(n)[i].clone()
            batch[f"{name}_labels"] = labels.chunk(n)[i].clone()
        for name in self.fields:
            batch[name] = _field(examples, name)
        for name in self.sequences:
            batch[name] = _float_sequences(examples, name)
        return batch


def _float_sequences(examples: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
    """Variable-length float lists (e.g. precomputed reference log-probs) as `(B, L)` float64, NaN-padded
    (the values as stored: the loss casts them to its own precision)."""
    rows = [torch.tensor(list(ex[name]), dtype=torch.float64) for ex in examples]
    return pad_sequence(rows, batch_first=True, padding_value=float("nan"), padding_side="right")


def _prompt_column(example: Mapping[str, Any], response: str) -> str:
    """The response's own prompt column if the example has one, else the shared ``prompt_ids``."""
    own = f"{response}_prompt_ids"
    return own if own in example else "prompt_ids"


def _ids(example: Mapping[str, Any], column: str) -> list[int]:
    """Column `column` of one example as a list of ints."""
    if column not in example:
        raise DataError(
            f"example has no {column!r} column (it has {', '.join(example)}). Fix: build the "
            "dataset with build_datasets(..., responses=...) for the responses the loss needs"
        )
    value = example[column]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _field(examples: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
    """Scalar column `name` of every example as a `(B,)` tensor (bool, float32 or long)."""
    values = []
    for i, example in enumerate(examples):
        if name not in example:
            raise DataError(
                f"example {i} has no {name!r} column (it has {', '.join(example)}). Fix: build "
                "the dataset with build_datasets(..., fields=...) for the fields the loss needs"
            )
        value = example[name]
        value = value.item() if hasattr(value, "item") else value  # 0-d tensors and numpy scalars
        if not isinstance(value, (bool, int, float)):
            raise DataError(f"example {i} has {name}={value!r}; a field must be a bool or a number")
        values.append(value)
    if all(isinstance(value, bool) for value in values):
        return torch.tensor(values, dtype=torch.bool)
    if any(isinstance(value, float) for value in values):
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor(values, dtype=torch.long)
