"""Mismatched responses (`Needs.mismatched`): each example gets another example's completion after its prompt.

Built after tokenisation (stage 5), from the cached token columns, so it needs no cache entry of its own
and never makes a row bad: it is a deterministic function of the tokenized split and the seed.

The choice of partner: the examples are grouped by prompt (their ``prompt_ids``), the groups are put in
an order shuffled with the seed, and the k-th example of a group takes the source completion of example
``k mod n`` of the next group (cycled). So a mismatched completion always answers a *different* prompt
whenever the split has two or more distinct prompts, including paired data unpaired by the pipeline,
whose two rows share a prompt (a plain rotation by one would give a row its own pair's other response).
With a single distinct prompt the examples rotate by one among themselves. Train and eval are built
separately: eval examples are only ever matched with eval completions.

The borrowed completion is cut on the right to fit ``data.max_length`` after the example's own prompt;
every kept row's prompt leaves at least one token of room, so it is never empty.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from alignlab.data.tokenize import TokenizedSplits

if TYPE_CHECKING:
    import datasets


def partners(prompts: Sequence[Sequence[int]], seed: int) -> list[int]:
    """For each example, the index of the example whose completion it borrows (module docstring)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    order = list(groups.values())
    out = list(range(len(prompts)))
    if len(order) == 1:
        n = len(prompts)
        return [(i + 1) % n for i in range(n)]
    random.Random(seed).shuffle(order)
    for g, members in enumerate(order):
        donors = order[(g + 1) % len(order)]
        for k, i in enumerate(members):
            out[i] = donors[k % len(donors)]
    return out


def add_mismatched(
    dataset: datasets.Dataset, mismatched: Sequence[tuple[str, str]], max_length: int, seed: int
) -> datasets.Dataset:
    """`dataset` with a ``<new>_ids`` column for each (new, source) pair of `mismatched`."""
    if not mismatched:
        return dataset
    prompts = dataset["prompt_ids"]
    picks = partners(prompts, seed)
    for new, source in mismatched:
        completions = dataset[f"{source}_ids"]
        column = [
            list(completions[j])[: max(max_length - len(prompt), 1)] for prompt, j in zip(prompts, picks)
        ]
        dataset = dataset.add_column(f"{new}_ids", column)
    return dataset


def with_mismatched(
    data: TokenizedSplits, mismatched: Sequence[tuple[str, str]], max_length: int, seed: int
) -> TokenizedSplits:
    """`data` with the mismatched responses added to the train and eval splits (`add_mismatched`)."""
    if not mismatched:
        return data
    held_out = add_mismatched(data.eval, mismatched, max_length, seed) if data.eval is not None else None
    return TokenizedSplits(add_mismatched(data.train, mismatched, max_length, seed), held_out, data.cache_hit)
