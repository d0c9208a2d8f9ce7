"""Stage 4, hold out: the eval rows, when no separate eval source was read.

A seeded random sample of the usable rows (`data.eval_size`: a fraction or a count), taken before
pairs are swapped or unpaired, so that every setting holds out the same pairs; train and eval keep
source order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignlab.data.rows import ArrowRows, DataError, DataReport, Normalized, nothing_left

if TYPE_CHECKING:
    from alignlab.config import DataConfig


@dataclass
class Splits:
    """Normalised rows of the train and eval splits (eval None: none, or not held out yet)."""

    train: Normalized | ArrowRows
    eval: Normalized | ArrowRows | None = None

    def parts(self) -> list[Normalized | ArrowRows]:
        """The splits there are."""
        return [part for part in (self.train, self.eval) if part is not None]

    def map(self, step: Callable[[Normalized], Normalized]) -> Splits:
        """`step` applied to each split there is, train first."""
        return Splits(step(self.train), step(self.eval) if self.eval is not None else None)


def hold_out(splits: Splits, cfg: DataConfig, seed: int, report: DataReport) -> Splits:
    """`splits` with its eval rows: those of the separate eval source when one was read, else held out of
    the train rows (none when `data.eval_size` is 0)."""
    if splits.eval is not None:
        return splits
    train, held = _hold_out_of(splits.train, cfg, seed, report)
    return Splits(train, held)


def eval_count(eval_size: float, rows: int) -> int:
    """Rows to hold out: a fraction (< 1) of `rows`, at least 1, or a count (>= 1); 0 for none."""
    if eval_size <= 0:
        return 0
    if eval_size < 1:
        return max(1, round(eval_size * rows))
    return int(eval_size)


def _hold_out_of(
    rows: Normalized, cfg: DataConfig, seed: int, report: DataReport
) -> tuple[Normalized, Normalized | None]:
    """Split usable rows into train and a seeded random eval sample; both keep source order."""
    if not rows.rows:
        raise nothing_left(cfg.path, "train", report)
    size = eval_count(cfg.eval_size, len(rows.rows))
    if size == 0:
        return rows, None
    if size >= len(rows.rows):
        raise DataError(
            f"data.eval_size={cfg.eval_size} holds out {size} of the {len(rows.rows)} usable "
            f"rows of {cfg.path}, leaving none to train on. Fix: lower data.eval_size or set "
            "data.eval_path"
        )
    order = list(range(len(rows.rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return (rows.subset([i for i in range(len(rows.rows)) if i not in held]), rows.subset(sorted(held)))
