"""The preference-data pipeline: from `DataConfig` to tokenized train and eval datasets.

    check needs -> read (sources) -> normalize (formats) -> hold out eval -> [swap or unpair pairs]
    -> tokenize + cache (tokenize) -> bad rows: raise or drop and count -> [pair with retain rows]
    -> PreparedData(train, eval, report)

Usage::

    needs = loss.needs
    check_data_needs(cfg.data, needs.responses, needs.fields)  # cheap: before any model loads
    prepared = build_datasets(cfg.data, tokenizer, responses=needs.responses, seed=cfg.seed,
                              fields=needs.fields)
    collator = PreferenceCollator(tokenizer.pad_token_id, responses=needs.responses, fields=needs.fields)

Data shapes served (`alignlab.losses.base.Needs`):

* responses sharing the row's prompt: pairs ``("chosen", "rejected")``, triples ``("gold",
  "chosen", "rejected")``, or one ``("completion",)`` (e.g. NPO's forget set);
* unpaired feedback, ``("completion",)`` with the field ``"label"``: labelled rows, or any pairs
  unpaired into ``(prompt, chosen, True)`` and ``(prompt, rejected, False)`` (reported in
  `DataReport.unpaired_from_pairs`);
* forget/retain, ``("completion", "retain")``: each row of `data.path` is paired with a row of
  `data.retain` (shuffled with the seed, cycled), which keeps its own prompt (``retain_prompt_ids``).

Every data problem raises `DataError`, a `ValueError` with a one-line message naming the file,
row or field and the fix. With ``data.on_bad_row=skip`` bad rows are dropped and counted in
`DataReport.skipped` instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from alignlab.builtin import DATASETS
from alignlab.data.collate import PreferenceCollator
from alignlab.data.formats import (
    LABEL,
    PAIR,
    UNPAIRED,
    Normalized,
    check_columns,
    normalize,
    plan_format,
    require_chat_template,
    swap,
    unpair,
)
from alignlab.data.sources import (
    FIXES,
    BadRow,
    Reason,
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
    field_dtype,
    tokenize_rows,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig

__all__ = ["DataError", "DataReport", "PreferenceCollator", "PreparedData", "SkipCount", "build_datasets",
           "check_data_needs"]

#: how many example rows the report keeps per skip reason.
EXAMPLES_PER_REASON = 5
#: the response drawn from `data.retain`, with its own prompt (`Needs.responses`).
RETAIN = "retain"
#: suffixes of the collated and tokenized columns, which field names must not end with.
TOKEN_SUFFIXES = ("_ids", "_attention_mask", "_labels")


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
        format: the format kind used (explicit, hh, pairwise, conversational, sharegpt, messages).
        rows_read: rows read from the sources (train and eval), bad ones included; the retain
            source is counted apart, in `retain_rows_read`.
        train_rows: rows (examples) in the train dataset.
        eval_rows: rows (examples) in the eval dataset.
        skipped: reason -> rows dropped for it (``data.on_bad_row=skip``), from any source.
        prompts_truncated: prompts cut to `data.max_prompt_length` (keep_end / keep_start).
        responses_truncated: responses (each counted) cut to fit `data.max_length`.
        cache_hit: every tokenized split (and the retain set) came from the cache.
        unpaired_from_pairs: the loss needs labelled single completions and the data held pairs,
            so each pair became a desirable (chosen) and an undesirable (rejected) example.
        pairs_unpaired: how many usable pairs were unpaired (train and eval), giving twice as many
            examples before tokenization.
        pairs_swapped: how many usable pairs (train and eval) had their chosen and rejected
            swapped (``data.swap_pairs``).
        desirable_rows: kept examples (train and eval) labelled True, when the loss needs ``label``.
        undesirable_rows: kept examples (train and eval) labelled False.
        retain_source: `data.retain`, when the loss has a retain response.
        retain_format: the format kind of the retain source.
        retain_rows_read: rows read from the retain source, bad ones included.
        retain_rows: usable retain rows, shuffled with the seed and cycled to pair with the examples.
        retain_rows_used: distinct retain rows paired with a train or eval example.
        max_length: `data.max_length`, the limit behind truncated responses.
        max_prompt_length: `data.max_prompt_length`, the limit behind long or truncated prompts.
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
    unpaired_from_pairs: bool = False
    pairs_unpaired: int = 0
    pairs_swapped: int = 0
    desirable_rows: int = 0
    undesirable_rows: int = 0
    retain_source: str | None = None
    retain_format: str = ""
    retain_rows_read: int = 0
    retain_rows: int = 0
    retain_rows_used: int = 0
    max_length: int = 0
    max_prompt_length: int = 0
    #: responses tokenized per example (2 for pairs), for the share of truncated responses.
    responses_per_example: int = 1

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
            lines.append(f"  skipped {count.count} x {reason}{self.limit(reason)}: e.g. "
                         f"{_rows_text(count.examples)}")
        if self.unpaired_from_pairs:
            lines.append(f"  unpaired {self.pairs_unpaired} pairs into single completions: chosen labelled "
                         "True (desirable), rejected False (undesirable)")
        if self.pairs_swapped:
            lines.append(f"  swapped chosen and rejected in {self.pairs_swapped} pairs (data.swap_pairs)")
        if self.desirable_rows or self.undesirable_rows:
            lines.append(f"  labels: {self.desirable_rows} desirable, {self.undesirable_rows} undesirable")
        if self.retain_source is not None:
            lines.append(f"  retain {self.retain_source} ({self.retain_format}): read "
                         f"{self.retain_rows_read} rows, {self.retain_rows} usable, {self.retain_rows_used} "
                         "paired with examples")
        cache = "hit" if self.cache_hit else "miss"
        lines.append(f"  truncated {self.prompts_truncated} prompts (to data.max_prompt_length="
                     f"{self.max_prompt_length}) and {self.responses_truncated} responses (to fit data.max_length={self.max_length}); "
                     f"tokenized cache {cache}")
        return "\n".join(lines + self.warnings())

    def limit(self, reason: str) -> str:
        """The limit behind a skip reason, e.g. " (over data.max_prompt_length=16 tokens)", or ""."""
        if reason == Reason.PROMPT_TOO_LONG:
            return f" (over data.max_prompt_length={self.max_prompt_length} tokens)"
        if reason == Reason.EMPTY_AFTER_TRUNCATION:
            return f" (no room left by data.max_length={self.max_length} after the prompt)"
        return ""

    def skip_text(self) -> str:
        """Every skip reason with its count and limit, most frequent first, e.g. "999 x prompt too long
        (over data.max_prompt_length=16 tokens), 1 x empty prompt or response"."""
        counts = sorted(self.skipped.items(), key=lambda item: -item[1].count)
        return ", ".join(f"{count.count} x {reason}{self.limit(reason)}"
                         for reason, count in counts) or "none"

    def warnings(self) -> list[str]:
        """Lines for what is allowed but probably not meant: most prompts or responses truncated."""
        examples = self.rows_kept + self.retain_rows
        lines = []
        if examples and self.prompts_truncated * 2 > examples:
            lines.append(f"  warning: {self.prompts_truncated} of {examples} prompts "
                         f"({100 * self.prompts_truncated // examples}%) were cut to data.max_prompt_length="
                         f"{self.max_prompt_length} tokens: the model sees little of them. Fix: raise "
                         "data.max_prompt_length (and data.max_length)")
        responses = self.rows_kept * self.responses_per_example + self.retain_rows
        if responses and self.responses_truncated * 2 > responses:
            lines.append(f"  warning: {self.responses_truncated} of {responses} responses "
                         f"({100 * self.responses_truncated // responses}%) were cut to fit data.max_length="
                         f"{self.max_length} tokens (losing their EOS). Fix: raise data.max_length")
        return lines

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
        train: columns ``prompt_ids``, ``<r>_ids`` for each response name, ``retain_prompt_ids``
            with ``retain_ids`` for the retain response (its own prompt), and one scalar column per
            field (``label``: bool; other fields bool, int64 or float64).
        eval: the same columns, or None when there is no eval split.
        report: counts of what was read, kept, skipped and truncated.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport


def check_data_needs(cfg: DataConfig, responses: Sequence[str], fields: Sequence[str] = ()) -> None:
    """Check that the data config can serve a loss's needs, without reading any file.

    Cheap enough to run before any model loads; `build_datasets` runs it too.

    Args:
        cfg: the data config.
        responses: `Needs.responses`.
        fields: `Needs.fields`.

    Raises:
        DataError: bad response or field names; a retain response without `data.retain`, or
            `data.retain` for a loss without a retain response; `data.swap_pairs` for a loss whose
            responses are not pairs; a combination the pipeline does not serve; `data.columns` /
            `data.format` that cannot work for these responses.
    """
    _check_needs(cfg, responses, fields)


def _check_needs(cfg: DataConfig, responses: Sequence[str],
                 fields: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`check_data_needs`, returning the responses and fields as tuples."""
    responses = _check_responses(responses)
    fields = _check_fields(fields, responses)
    main = tuple(name for name in responses if name != RETAIN)
    if RETAIN in responses:
        if main != UNPAIRED:
            raise DataError(f"the pipeline serves a retain response only with the single response "
                            f"'completion' (responses ('completion', 'retain'): each {{prompt, completion}} "
                            f"row of data.path is paired with a row of data.retain), but the loss needs "
                            f"{responses}")
        if not cfg.retain:
            raise DataError("this loss needs a retain set: set data.retain=<path> (e.g. the TOFU "
                            "retain90.json)")
    elif cfg.retain:
        raise DataError(f"data.retain={cfg.retain!r} is set, but this loss does not use a retain set (it "
                        f"needs the responses {responses}). Fix: remove data.retain, or pick a loss variant "
                        "that trains on a retain set")
    if cfg.swap_pairs and responses != PAIR:
        raise DataError(f"data.swap_pairs=true swaps chosen and rejected of pairs, but this loss needs the "
                        f"responses {responses}, not {PAIR}. Fix: remove data.swap_pairs")
    if LABEL in fields and responses != UNPAIRED:
        raise DataError(f"the field 'label' (unpaired binary feedback) is served only with the single "
                        f"response 'completion', but the loss needs the responses {responses}")
    check_columns(cfg.format, cfg.columns or {}, main, fields)
    return responses, fields


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                   responses: Sequence[str] = ("chosen", "rejected"), seed: int = 42,
                   fields: Sequence[str] = ()) -> PreparedData:
    """Read, normalize, split and tokenize the preference data described by `cfg`.

    Args:
        cfg: the data config (`alignlab.config.DataConfig`).
        tokenizer: the model's tokenizer; must have an EOS token (and a chat template for
            conversational data).
        responses: the response columns the loss needs (`Needs.responses`).
        seed: shuffles the held-out eval rows when there is no `cfg.eval_path`, and the retain
            rows.
        fields: the scalar columns the loss needs (`Needs.fields`), e.g. ("label",).

    Returns:
        Train and eval datasets with a report.

    Raises:
        DataError: any problem with the data or its config; with ``on_bad_row=error``, the first
            bad row.
    """
    responses, fields = _check_needs(cfg, responses, fields)
    main = tuple(name for name in responses if name != RETAIN)
    eos_token_id = _eos_token_id(tokenizer)
    report = DataReport(source=cfg.path, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                        responses_per_example=len(main))
    train_records = read_source(cfg.path, name=cfg.name, split=cfg.split, limit=cfg.limit)
    eval_records = _eval_records(cfg)
    report.rows_read = len(train_records) + len(eval_records or ())

    raw_rows = [row for _, row in train_records if isinstance(row, dict)]
    if not raw_rows:  # every record is unreadable: say why, rather than "no columns"
        raise DataError(f"{train_records[0][1].message()} (no row of {cfg.path} could be read)")
    plan = plan_format(cfg.format, cfg.columns or {}, raw_rows, main, cfg.path, fields)
    report.format = plan.kind
    if plan.chat:
        require_chat_template(tokenizer)
    train = _settle(normalize(train_records, plan, tokenizer), cfg, report)
    if eval_records is None:
        train, held_out = _hold_out(train, cfg, seed, report)  # pairs are held out whole, before unpairing
    else:
        held_out = _settle(normalize(eval_records, plan, tokenizer), cfg, report)
    if cfg.swap_pairs:  # after the hold-out, so both settings split the same pairs
        report.pairs_swapped = len(train.rows) + (len(held_out.rows) if held_out is not None else 0)
        train, held_out = swap(train), swap(held_out) if held_out is not None else None
    if plan.unpair:
        report.unpaired_from_pairs = True
        report.pairs_unpaired = len(train.rows) + (len(held_out.rows) if held_out is not None else 0)
        train, held_out = unpair(train), unpair(held_out) if held_out is not None else None

    settings = TokenizeSettings(cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation, plan.kind,
                                plan.chat, main, _field_types(fields, train, held_out))
    encode = partial(_tokenize_split, tokenizer=tokenizer, eos_token_id=eos_token_id, cfg=cfg, report=report)
    report.eval_rows = len(held_out.rows) if held_out is not None else 0  # for a message; final count below
    train_set, train_hit = encode("train", train, settings=settings)
    eval_set, eval_hit = encode("eval", held_out, settings=settings) if held_out is not None else (None, True)
    retain_hit = True
    if RETAIN in responses:
        retain_set, retain_hit = _retain_dataset(cfg, tokenizer, settings, eos_token_id, report)
        train_set, eval_set = _pair_with_retain(train_set, eval_set, retain_set, seed, report)
    report.train_rows = len(train_set)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.cache_hit = train_hit and eval_hit and retain_hit
    if LABEL in fields:
        labels = [label for part in (train_set, eval_set) if part is not None for label in part[LABEL]]
        report.desirable_rows = sum(labels)
        report.undesirable_rows = len(labels) - report.desirable_rows
    return PreparedData(train_set, eval_set, report)


def _tokenize_split(name: str, part: Normalized, *, tokenizer: PreTrainedTokenizerBase,
                    settings: TokenizeSettings, eos_token_id: int, cfg: DataConfig,
                    report: DataReport) -> tuple[datasets.Dataset, bool]:
    """Tokenize one split (train, eval or retain; or load it from the cache) and settle its bad rows.

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
        source = {"eval": cfg.eval_path or cfg.path, RETAIN: cfg.retain}.get(name, cfg.path)
        raise _nothing_left(source, name, report)
    return dataset, hit


def _nothing_left(source: str, name: str, report: DataReport) -> DataError:
    """No usable row of a split is left: every skip reason with its count and limit, and the fix of
    the most frequent one."""
    reasons = sorted(report.skipped, key=lambda reason: -report.skipped[reason].count)
    fix = FIXES[reasons[0]] if reasons else "check the data, data.format and data.columns"
    held = f", {report.eval_rows} held out for evaluation" if name == "train" and report.eval_rows else ""
    return DataError(f"{source}: no usable {name} rows left of {report.rows_read} read{held}; skipped "
                     f"{report.skip_text()}. Fix: {fix}")


def _check_responses(responses: Sequence[str]) -> tuple[str, ...]:
    """Response names must be distinct, non-empty and not `prompt`."""
    responses = tuple(responses)
    if not responses or len(set(responses)) != len(responses) or "prompt" in responses or "" in responses:
        raise DataError(f"responses must be distinct non-empty names other than 'prompt', got {responses}")
    return responses


def _check_fields(fields: Sequence[str], responses: tuple[str, ...]) -> tuple[str, ...]:
    """Field names must be distinct and clash with no prompt, response or token column."""
    fields = tuple(fields)
    for name in fields:
        if (not isinstance(name, str) or not name or name.startswith("_") or name in ("prompt", *responses)
                or name.endswith(TOKEN_SUFFIXES)):
            raise DataError(f"fields must be distinct names other than 'prompt', the responses {responses} "
                            f"and token columns (*{', *'.join(TOKEN_SUFFIXES)}), got {fields}")
    if len(set(fields)) != len(fields):
        raise DataError(f"fields must be distinct, got {fields}")
    return fields


def _field_types(fields: tuple[str, ...], *parts: Normalized | None) -> tuple[tuple[str, str], ...]:
    """One column type per field over all splits, with every row's value cast to it."""
    types = []
    for name in fields:
        rows = [row for part in parts if part is not None for row in part.rows]
        dtype = field_dtype([row[name] for row in rows])
        cast = {"bool": bool, "int64": int, "float64": float}[dtype]
        for row in rows:
            row[name] = cast(row[name])
        types.append((name, dtype))
    return tuple(types)


def _retain_dataset(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings,
                    eos_token_id: int, report: DataReport) -> tuple[datasets.Dataset, bool]:
    """The tokenized rows of `data.retain` (``prompt_ids``, ``completion_ids``), read like `data.path`.

    The retain source gets its own cache entry, keyed by its content like any split. `data.limit`
    applies to `data.path` only: the retain rows are a pool to draw partners from.
    """
    assert cfg.retain  # checked by _check_needs
    report.retain_source = cfg.retain
    records = read_source(cfg.retain, name=cfg.name, split=cfg.split)
    report.retain_rows_read = len(records)
    raw_rows = [row for _, row in records if isinstance(row, dict)]
    if not raw_rows:
        raise DataError(f"{records[0][1].message()} (no row of the retain set {cfg.retain} could be read)")
    fields = {name for name, _ in settings.fields}  # read from data.path only
    columns = {key: value for key, value in (cfg.columns or {}).items() if key not in fields}
    plan = plan_format(cfg.format, columns, raw_rows, UNPAIRED, cfg.retain)
    report.retain_format = plan.kind
    if plan.chat:
        require_chat_template(tokenizer)
    rows = _settle(normalize(records, plan, tokenizer), cfg, report)
    retain_settings = replace(settings, format=plan.kind, chat=plan.chat, responses=UNPAIRED, fields=())
    dataset, hit = _tokenize_split(RETAIN, rows, tokenizer=tokenizer, settings=retain_settings,
                                   eos_token_id=eos_token_id, cfg=cfg, report=report)
    report.retain_rows = len(dataset)
    return dataset, hit


def _pair_with_retain(train: datasets.Dataset, held_out: datasets.Dataset | None, retain: datasets.Dataset,
                      seed: int, report: DataReport) -> tuple[datasets.Dataset, datasets.Dataset | None]:
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


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id appended to every response."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "")
        raise DataError(f"tokenizer {name!r} has no eos_token_id, which ends every response. Fix: set "
                        "tokenizer.eos_token, or use a tokenizer that has one")
    return int(eos)


def _eval_records(cfg: DataConfig) -> list[Record] | None:
    """Records of a separate eval source: `eval_path`, `eval_split` of `path` (a DatasetDict folder or
    a hub dataset), or the built-in task's held-out generator.

    None means the eval rows are held out of the train source (none when `eval_size` is 0).
    """
    if cfg.eval_path or cfg.eval_split:  # another source, or another split of data.path
        return read_source(cfg.eval_path or cfg.path, name=cfg.name, split=cfg.eval_split or cfg.split)
    if cfg.path.startswith("builtin:"):
        spec = DATASETS.get(cfg.path.removeprefix("builtin:"))
        size = _eval_count(cfg.eval_size, spec.size) if spec else 0
        if spec and spec.heldout_eval and size:
            return builtin_records(cfg.path, heldout=True, n=size)
    return None


def _eval_count(eval_size: float, rows: int) -> int:
    """Rows to hold out: a fraction (< 1) of `rows`, at least 1, or a count (>= 1); 0 for none."""
    if eval_size <= 0:
        return 0
    if eval_size < 1:
        return max(1, round(eval_size * rows))
    return int(eval_size)


def _hold_out(rows: Normalized, cfg: DataConfig, seed: int,
              report: DataReport) -> tuple[Normalized, Normalized | None]:
    """Split usable rows into train and a seeded random eval sample; both keep source order."""
    if not rows.rows:
        raise _nothing_left(cfg.path, "train", report)
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
        counted = DataReport(cfg.path, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        counted.add_skipped(rows.bad[1:])
        reasons = f": {counted.skip_text()}" if others else ""
        raise DataError(f"{first.message()} ({others} other bad row{plural} found{reasons}; or set "
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
    bad = list(dict.fromkeys(bad))  # the two examples of an unpaired pair fail together: one bad row
    _settle(Normalized(bad=bad), cfg, report)
    good = [i for i, reason in enumerate(reasons) if not reason]
    report.prompts_truncated += sum(meta[PROMPT_TRUNCATED])  # bad rows carry False / 0
    report.responses_truncated += sum(meta[RESPONSES_TRUNCATED])
    if len(good) < len(tokenized):
        tokenized = tokenized.select(good)
    return tokenized.remove_columns(list(META_COLUMNS))
