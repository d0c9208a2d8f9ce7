"""Forget/retain data: each example of `data.path` gets a partner row of `data.retain` (NPO's retain set).

The retain source goes through the same stages as `data.path` (read, normalise, settle, tokenise
and cache, under its own cache entry), then `pair_with_retain` attaches the partners.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

from alignlab.data.normalise import UNPAIRED, normalize, plan_of
from alignlab.data.read import read_source
from alignlab.data.rows import DataReport, settle
from alignlab.data.tokenize import TokenizedSplits, TokenizeSettings, tokenize_split

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig

#: the response drawn from `data.retain`, with its own prompt (`Needs.responses`).
RETAIN = "retain"


def with_retain(
    data: TokenizedSplits,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    eos_token_id: int,
    seed: int,
    report: DataReport,
) -> TokenizedSplits:
    """`data` with a retain partner for every example (`pair_with_retain`)."""
    retain_set, hit = _retain_dataset(cfg, tokenizer, settings, eos_token_id, report)
    train, held_out = _pair_with_retain(data.train, data.eval, retain_set, seed, report)
    return TokenizedSplits(train, held_out, data.cache_hit and hit)


def _retain_dataset(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    eos_token_id: int,
    report: DataReport,
) -> tuple[datasets.Dataset, bool]:
    """The tokenized rows of `data.retain` (``prompt_ids``, ``completion_ids``), read like `data.path`.

    The retain source gets its own cache entry, keyed by its content like any split. `data.limit`
    applies to `data.path` only: the retain rows are a pool to draw partners from.
    """
    assert cfg.retain  # checked by _check_needs
    report.retain_source = cfg.retain
    records = read_source(cfg.retain, name=cfg.name, split=cfg.split)
    report.retain_rows_read = len(records)
    fields = {name for name, _ in settings.fields}  # read from data.path only
    columns = {key: value for key, value in (cfg.columns or {}).items() if key not in fields}
    plan = plan_of(
        records, cfg.format, columns, UNPAIRED, (), tokenizer, cfg.retain, f"the retain set {cfg.retain}"
    )
    report.retain_format = plan.kind
    rows = settle(normalize(records, plan, tokenizer), cfg, report)
    retain_settings = replace(settings, format=plan.kind, chat=plan.chat, responses=UNPAIRED, fields=())
    dataset, hit = tokenize_split(RETAIN, rows, tokenizer, retain_settings, eos_token_id, cfg, report)
    report.retain_rows = len(dataset)
    return dataset, hit


def _pair_with_retain(
    train: datasets.Dataset,
    held_out: datasets.Dataset | None,
    retain: datasets.Dataset,
    seed: int,
    report: DataReport,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Give every example a retain partner: the retain rows shuffled with `seed`, cycled.

    Train example i gets shuffled retain row ``i mod R``; eval example j continues the cycle with
    ``(len(train) + j) mod R``, so train and eval share partners only when the retain set is short.
    """
    from datasets import concatenate_datasets

    order = list(range(len(retain)))
    random.Random(seed).shuffle(order)
    renamed = retain.rename_columns({"prompt_ids": f"{RETAIN}_prompt_ids", "completion_ids": f"{RETAIN}_ids"})
    used: set[int] = set()

    def attach(dataset: datasets.Dataset, start: int) -> datasets.Dataset:
        picks = [order[(start + i) % len(order)] for i in range(len(dataset))]
        used.update(picks)
        return concatenate_datasets([dataset, renamed.select(picks)], axis=1)

    train_out = attach(train, 0)
    eval_out = attach(held_out, len(train)) if held_out is not None else None
    report.retain_rows_used = len(used)
    return train_out, eval_out
