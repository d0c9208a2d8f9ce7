"""The preference-data pipeline: from `DataConfig` to tokenized train and eval datasets.

    read (sources) -> normalize (formats) -> hold out eval -> tokenize + cache (tokenize)
    -> bad rows: raise or drop and count -> PreparedData(train, eval, report)

Usage::

    prepared = build_datasets(cfg.data, tokenizer, responses=loss.needs.responses, seed=cfg.seed)
    collator = PreferenceCollator(tokenizer.pad_token_id, responses=loss.needs.responses)

Every data problem raises `DataError`, a `ValueError` with a one-line message naming the file,
row or field and the fix. With ``data.on_bad_row=skip`` bad rows are dropped and counted in
`DataReport.skipped` instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from alignlab.data.collate import PreferenceCollator
from alignlab.data.formats import Normalized, normalize, plan_format, require_chat_template
from alignlab.data.sources import (
    BUILTIN_SIZE,
    BadRow,
    DataError,
    Record,
    builtin_records,
    read_source,
)
from alignlab.data.tokenize import (
    BAD_DETAIL,
    BAD_REASON,
    META_COLUMNS,
    PROMPT_TRUNCATED,
    RESPONSES_TRUNCATED,
    TokenizeSettings,
    tokenize_rows,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig

__all__ = ["DataError", "DataReport", "PreferenceCollator", "PreparedData", "SkipCount", "build_datasets"]

#: how many example rows the report keeps per skip reason.
EXAMPLES_PER_REASON = 5


@dataclass
class SkipCount:
    """Rows skipped for one reason: how many, and the first few (``file row N``)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """What `build_datasets` did, for logs and for the run directory.

    Attributes:
        source: `data.path`.
        format: the format kind used (explicit, hh, pairwise, conversational, sharegpt).
        rows_read: rows read from the sources (train and eval), bad ones included.
        train_rows: rows in the train dataset.
        eval_rows: rows in the eval dataset.
        skipped: reason -> rows dropped for it (``data.on_bad_row=skip``).
        prompts_truncated: prompts cut to `data.max_prompt_length` (keep_end / keep_start).
        responses_truncated: responses (each counted) cut to fit `data.max_length`.
        cache_hit: every tokenized split came from the cache.
    """

    source: str
    format: str = ""
    rows_read: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    skipped: dict[str, SkipCount] = field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0
    cache_hit: bool = False

    @property
    def rows_kept(self) -> int:
        """Rows in the train and eval datasets together."""
        return self.train_rows + self.eval_rows

    @property
    def rows_skipped(self) -> int:
        """Rows dropped for any reason."""
        return sum(count.count for count in self.skipped.values())

    def add_skipped(self, bad: Sequence[BadRow]) -> None:
        """Count dropped rows by reason, keeping the first few as examples."""
        for row in bad:
            count = self.skipped.setdefault(row.reason, SkipCount())
            count.count += 1
            if len(count.examples) < EXAMPLES_PER_REASON:
                count.examples.append(str(row.ref))

    def summary(self) -> str:
        """A short human-readable account, e.g. for the console."""
        head = (f"data {self.source} ({self.format}): read {self.rows_read} rows, kept {self.rows_kept} "
                f"(train {self.train_rows}, eval {self.eval_rows}), skipped {self.rows_skipped}")
        lines = [head]
        for reason, count in self.skipped.items():
            lines.append(f"  skipped {count.count} x {reason}: e.g. {_rows_text(count.examples)}")
        cache = "hit" if self.cache_hit else "miss"
        lines.append(f"  truncated {self.prompts_truncated} prompts and {self.responses_truncated} "
                     f"responses; tokenized cache {cache}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, plus `rows_kept` and `rows_skipped`."""
        return {**asdict(self), "rows_kept": self.rows_kept, "rows_skipped": self.rows_skipped}


def _rows_text(examples: Sequence[str]) -> str:
    """``a.json row 1, a.json row 5`` shortened to ``a.json rows 1, 5`` when the file is the same."""
    sources = {example.rsplit(" row ", 1)[0] for example in examples}
    if len(sources) != 1:
        return ", ".join(examples)
    return f"{sources.pop()} rows {', '.join(example.rsplit(' row ', 1)[1] for example in examples)}"


@dataclass
class PreparedData:
    """The output of `build_datasets`.

    Attributes:
        train: columns ``prompt_ids`` and ``<r>_ids`` for each response name.
        eval: the same columns, or None when there is no eval split.
        report: counts of what was read, kept, skipped and truncated.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                   responses: tuple[str, ...] = ("chosen", "rejected"), seed: int = 42) -> PreparedData:
    """Read, normalize, split and tokenize the preference data described by `cfg`.

    Args:
        cfg: the data config (`alignlab.config.DataConfig`).
        tokenizer: the model's tokenizer; must have an EOS token (and a chat template for
            conversational data).
        responses: the response columns the loss needs (`Needs.responses`).
        seed: shuffles the held-out eval rows when there is no `cfg.eval_path`.

    Returns:
        Train and eval datasets with a report.

    Raises:
        DataError: any problem with the data or its config; with ``on_bad_row=error``, the first
            bad row.
    """
    responses = _check_responses(responses)
    eos_token_id = _eos_token_id(tokenizer)
    report = DataReport(source=cfg.path)
    train_records = read_source(cfg.path, name=cfg.name, split=cfg.split, limit=cfg.limit)
    eval_records = _eval_records(cfg)
    report.rows_read = len(train_records) + len(eval_records or ())

    raw_rows = [row for _, row in train_records if isinstance(row, dict)]
    if not raw_rows:  # every record is unreadable: say why, rather than "no columns"
        raise DataError(f"{train_records[0][1].message()} (no row of {cfg.path} could be read)")
    plan = plan_format(cfg.format, cfg.columns or {}, raw_rows, responses, cfg.path)
    report.format = plan.kind
    if plan.chat:
        require_chat_template(tokenizer)
    train = _settle(normalize(train_records, plan, tokenizer), cfg, report)
    if eval_records is None:
        train, held_out = _hold_out(train, cfg, seed)
    else:
        held_out = _settle(normalize(eval_records, plan, tokenizer), cfg, report)

    settings = TokenizeSettings(cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation, plan.kind,
                                plan.chat, responses)
    encode = partial(_tokenize_split, tokenizer=tokenizer, settings=settings, eos_token_id=eos_token_id,
                     cfg=cfg, report=report)
    train_set, train_hit = encode("train", train)
    eval_set, eval_hit = encode("eval", held_out) if held_out is not None else (None, True)
    report.train_rows = len(train_set)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.cache_hit = train_hit and eval_hit
    return PreparedData(train_set, eval_set, report)


def _tokenize_split(name: str, part: Normalized, *, tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings, eos_token_id: int, cfg: DataConfig,
                    report: DataReport) -> tuple[datasets.Dataset, bool]:
    """Tokenize one split (or load it from the cache) and settle its bad rows.

    Returns:
        The split's dataset and whether it was a cache hit.

    Raises:
        DataError: no usable row is left.
    """
    dataset, hit = None, True
    if part.rows:
        tokenized, hit = tokenize_rows(part.rows, tokenizer, settings, eos_token_id=eos_token_id,
                                       cache_dir=cfg.cache_dir, num_proc=cfg.num_proc,
                                       desc=f"Tokenizing {name}")
        dataset = _finish(tokenized, part, cfg, report)
    if dataset is None or len(dataset) == 0:
        source = cfg.eval_path if name == "eval" and cfg.eval_path else cfg.path
        raise DataError(f"{source}: no usable {name} rows left ({report.rows_skipped} rows skipped: "
                        f"{', '.join(report.skipped) or 'none'}). Fix: check the data, data.format and "
                        "data.columns")
    return dataset, hit


def _check_responses(responses: Sequence[str]) -> tuple[str, ...]:
    """Response names must be distinct, non-empty and not `prompt`."""
    responses = tuple(responses)
    if not responses or len(set(responses)) != len(responses) or "prompt" in responses or "" in responses:
        raise DataError(f"responses must be distinct non-empty names other than 'prompt', got {responses}")
    return responses


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id appended to every response."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "")
        raise DataError(f"tokenizer {name!r} has no eos_token_id, which ends every response. Fix: set "
                        "tokenizer.eos_token, or use a tokenizer that has one")
    return int(eos)


def _eval_records(cfg: DataConfig) -> list[Record] | None:
    """Records of a separate eval source: `eval_path`, or the built-in task's held-out generator.

    None means the eval rows are held out of the train source (none when `eval_size` is 0).
    """
    if cfg.eval_path:
        return read_source(cfg.eval_path, name=cfg.name, split=cfg.eval_split or cfg.split)
    size = _eval_count(cfg.eval_size, BUILTIN_SIZE)
    if cfg.path.startswith("builtin:") and size:
        return builtin_records(cfg.path, heldout=True, n=size)
    return None


def _eval_count(eval_size: float, rows: int) -> int:
    """Rows to hold out: a fraction (< 1) of `rows`, at least 1, or a count (>= 1); 0 for none."""
    if eval_size <= 0:
        return 0
    if eval_size < 1:
        return max(1, round(eval_size * rows))
    return int(eval_size)


def _hold_out(rows: Normalized, cfg: DataConfig, seed: int) -> tuple[Normalized, Normalized | None]:
    """Split usable rows into train and a seeded random eval sample; both keep source order."""
    size = _eval_count(cfg.eval_size, len(rows.rows))
    if size == 0:
        return rows, None
    if size >= len(rows.rows):
        raise DataError(f"data.eval_size={cfg.eval_size} holds out {size} of the {len(rows.rows)} usable "
                        f"rows of {cfg.path}, leaving none to train on. Fix: lower data.eval_size or set "
                        "data.eval_path")
    order = list(range(len(rows.rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return (rows.subset([i for i in range(len(rows.rows)) if i not in held]), rows.subset(sorted(held)))


def _settle(rows: Normalized, cfg: DataConfig, report: DataReport) -> Normalized:
    """Apply `data.on_bad_row` to the bad rows found: raise for the first, or count them."""
    if rows.bad and cfg.on_bad_row == "error":
        first, others = rows.bad[0], len(rows.bad) - 1
        plural = "s" if others != 1 else ""
        raise DataError(f"{first.message()} ({others} other bad row{plural} found; or set "
                        "data.on_bad_row=skip to drop and count bad rows)")
    report.add_skipped(rows.bad)
    rows.bad = []
    return rows


def _finish(tokenized: datasets.Dataset, part: Normalized, cfg: DataConfig,
            report: DataReport) -> datasets.Dataset:
    """Settle the rows that tokenization flagged, count truncations, and drop the metadata columns."""
    meta = tokenized.select_columns(list(META_COLUMNS)).to_dict()
    reasons = meta[BAD_REASON]
    bad = [BadRow(part.refs[i], reason, meta[BAD_DETAIL][i]) for i, reason in enumerate(reasons) if reason]
    _settle(Normalized(bad=bad), cfg, report)
    good = [i for i, reason in enumerate(reasons) if not reason]
    report.prompts_truncated += sum(meta[PROMPT_TRUNCATED])  # bad rows carry False / 0
    report.responses_truncated += sum(meta[RESPONSES_TRUNCATED])
    if len(good) < len(tokenized):
        tokenized = tokenized.select(good)
    return tokenized.remove_columns(list(META_COLUMNS))
