"""A row and its problems: where a row comes from (`RowRef`), why it is bad (`Reason`, `BadRow`, with
the fix in `FIXES`), usable and bad rows together (`Normalized`), and the stage that settles bad rows
by `data.on_bad_row` (`settle`: raise for the first, or drop and count them per reason in the
`DataReport`).

Bad rows are found twice, by the same rule: when rows are read and normalised (a corrupt line, a
missing field), and when they are tokenised (a prompt over `data.max_prompt_length`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from alignlab.errors import UserError

if TYPE_CHECKING:
    import datasets

    from alignlab.config import DataConfig

#: how many example rows the report keeps per skip reason.
EXAMPLES_PER_REASON = 5
#: Arrow columns of a row's problem ("" for a good row), written by `read`, `normalise` and `tokenize`.
BAD_REASON = "_bad_reason"
BAD_DETAIL = "_bad_detail"
#: Arrow columns of where a row comes from (an index into the labels of its sources, and `RowRef.index`)
#: and of a raw row read (JSON bytes, `read.raw_bytes`).
SOURCE, ROW, RAW = "_source", "_row", "_raw"


class DataError(UserError):
    """A problem with the data or the data config (a `ValueError`, shown by the CLI without traceback).

    The message is one line that names the file, the row or the field, and says how to fix it.
    """


class Reason:
    """Why a row is bad: the keys of `DataReport.skipped`."""

    MISSING = "missing field"
    NOT_A_STRING = "non-string field"
    BAD_MESSAGES = "bad message structure"
    EMPTY = "empty prompt or response"
    IDENTICAL = "identical responses"
    TIE = "tie / no preference"
    HH_MISMATCH = "HH prompt mismatch"
    PROMPT_TOO_LONG = "prompt too long"
    EMPTY_AFTER_TRUNCATION = "response empty after truncation"
    CORRUPT_JSON = "corrupt JSON line"
    NOT_AN_OBJECT = "row is not a JSON object"
    BAD_LABEL = "bad label"
    BAD_FIELD = "bad field value"


#: how to fix a row that is bad for each reason.
FIXES: dict[str, str] = {
    Reason.MISSING: "add the field to the row, or map it from another column with "
    "data.columns={field: column}",
    Reason.NOT_A_STRING: "make the field a string (rows of {role, content} message lists need "
    "data.format=conversational)",
    Reason.BAD_MESSAGES: "give conversations as lists of {role: str, content: str} messages (ShareGPT: "
    "{from, value} with from = human, gpt or system; a messages column ends with the assistant's "
    "completion after at least one prompt message)",
    Reason.EMPTY: "fill in the text or remove the row",
    Reason.IDENTICAL: "remove the row: identical responses express no preference",
    Reason.TIE: "remove the row: a tie gives no chosen/rejected pair",
    Reason.HH_MISMATCH: "both transcripts must share the conversation up to and including the last "
    "'\\n\\nAssistant:'",
    Reason.PROMPT_TOO_LONG: "raise data.max_prompt_length or set data.prompt_truncation=keep_end",
    Reason.EMPTY_AFTER_TRUNCATION: "raise data.max_length or lower data.max_prompt_length",
    Reason.CORRUPT_JSON: "repair or delete the line",
    Reason.NOT_AN_OBJECT: 'make every row a JSON object such as {"prompt": ..., "chosen": ..., '
    '"rejected": ...}',
    Reason.BAD_LABEL: "make the label a JSON boolean, true (desirable) or false (undesirable); 1 and 0 "
    "are accepted too",
    Reason.BAD_FIELD: "make the field a number (true/false, an integer or a finite float)",
}


@dataclass(frozen=True)
class RowRef:
    """Where a row comes from.

    Attributes:
        source: the file (as the user named it), ``builtin:...`` or ``hub NAME[split]``.
        index: 0-based row index in that source (for JSON lines: the 0-based line index).
    """

    source: str
    index: int

    def __str__(self) -> str:
        return f"{self.source} row {self.index}"


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, with a one-line description.

    Attributes:
        ref: which row.
        reason: one of the `Reason` constants.
        detail: what is wrong, naming the field.
    """

    ref: RowRef
    reason: str
    detail: str

    def message(self) -> str:
        """One line: row, problem, reason and fix."""
        return f"{self.ref}: {self.detail} ({self.reason}). Fix: {FIXES[self.reason]}"


#: one row of a source: the raw row, or why it could not be read.
Record = tuple[RowRef, dict[str, Any] | BadRow]


@dataclass
class Normalized:
    """The outcome of `normalize`: usable rows (with where they came from) and bad rows.

    Attributes:
        rows: canonical rows ``{prompt, <response>..., <field>...}``: strings, and one bool or number
            per field.
        refs: `refs[i]` is where `rows[i]` came from.
        bad: the rows that could not be used.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    refs: list[RowRef] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)

    def subset(self, indices: Sequence[int]) -> Normalized:
        """The usable rows at `indices` (bad rows are not carried over)."""
        return Normalized([self.rows[i] for i in indices], [self.refs[i] for i in indices])


@dataclass
class ArrowRows:
    """`Normalized` on Arrow: the usable canonical rows as a memory-mapped `datasets.Dataset`.

    Attributes:
        rows: the canonical columns (``prompt``, the responses, one JSON text per field until
            `tokenize.field_types` types it) and where each row comes from (``_source``, ``_row``).
        labels: ``_source`` -> the source's name, as `RowRef.source`.
        bad: the rows that could not be used.
    """

    rows: datasets.Dataset
    labels: list[str]
    bad: list[BadRow] = field(default_factory=list)

    @cached_property
    def refs(self) -> _Refs:
        """`refs[i]` is where `rows[i]` came from."""
        return _Refs(self)

    def subset(self, indices: Sequence[int]) -> ArrowRows:
        """The usable rows at `indices` (bad rows are not carried over); no row is copied."""
        return ArrowRows(self.rows.select(indices), self.labels)

    def canonical(self) -> datasets.Dataset:
        """The canonical columns only."""
        return self.rows.select_columns([name for name in self.rows.column_names if not name.startswith("_")])


class _Refs:
    """The `RowRef`s of `ArrowRows`, by index: two integer arrays, read on the first look-up."""

    def __init__(self, rows: ArrowRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows.rows)

    @cached_property
    def _columns(self) -> dict[str, Any]:
        return self.rows.rows.select_columns([SOURCE, ROW]).with_format("numpy")[:]

    def __getitem__(self, index: int) -> RowRef:
        return RowRef(self.rows.labels[int(self._columns[SOURCE][index])], int(self._columns[ROW][index]))


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
        head = (
            f"data {self.source} ({self.format}): read {self.rows_read} rows, kept {self.rows_kept} "
            f"(train {self.train_rows}, eval {self.eval_rows}), skipped {self.rows_skipped}"
        )
        lines = [head]
        for reason, count in self.skipped.items():
            lines.append(
                f"  skipped {count.count} x {reason}{self.limit(reason)}: e.g. {_rows_text(count.examples)}"
            )
        if self.unpaired_from_pairs:
            lines.append(
                f"  unpaired {self.pairs_unpaired} pairs into single completions: chosen labelled "
                "True (desirable), rejected False (undesirable)"
            )
        if self.pairs_swapped:
            lines.append(f"  swapped chosen and rejected in {self.pairs_swapped} pairs (data.swap_pairs)")
        if self.desirable_rows or self.undesirable_rows:
            lines.append(f"  labels: {self.desirable_rows} desirable, {self.undesirable_rows} undesirable")
        if self.retain_source is not None:
            lines.append(
                f"  retain {self.retain_source} ({self.retain_format}): read "
                f"{self.retain_rows_read} rows, {self.retain_rows} usable, {self.retain_rows_used} "
                "paired with examples"
            )
        cache = "hit" if self.cache_hit else "miss"
        lines.append(
            f"  truncated {self.prompts_truncated} prompts (to data.max_prompt_length="
            f"{self.max_prompt_length}) and {self.responses_truncated} responses (to fit "
            f"data.max_length={self.max_length}); "
            f"tokenized cache {cache}"
        )
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
        return (
            ", ".join(f"{count.count} x {reason}{self.limit(reason)}" for reason, count in counts) or "none"
        )

    def warnings(self) -> list[str]:
        """Lines for what is allowed but probably not meant: most prompts or responses truncated."""
        examples = self.rows_kept + self.retain_rows
        lines = []
        if examples and self.prompts_truncated * 2 > examples:
            lines.append(
                f"  warning: {self.prompts_truncated} of {examples} prompts "
                f"({100 * self.prompts_truncated // examples}%) were cut to data.max_prompt_length="
                f"{self.max_prompt_length} tokens: the model sees little of them. Fix: raise "
                "data.max_prompt_length (and data.max_length)"
            )
        responses = self.rows_kept * self.responses_per_example + self.retain_rows
        if responses and self.responses_truncated * 2 > responses:
            lines.append(
                f"  warning: {self.responses_truncated} of {responses} responses "
                f"({100 * self.responses_truncated // responses}%) were cut to fit data.max_length="
                f"{self.max_length} tokens (losing their EOS). Fix: raise data.max_length"
            )
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


def settle(rows: Normalized, cfg: DataConfig, report: DataReport) -> Normalized:
    """Apply `data.on_bad_row` to the bad rows found: raise for the first, or count them."""
    if rows.bad and cfg.on_bad_row == "error":
        first, others = rows.bad[0], len(rows.bad) - 1
        plural = "s" if others != 1 else ""
        counted = DataReport(cfg.path, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        counted.add_skipped(rows.bad[1:])
        reasons = f": {counted.skip_text()}" if others else ""
        raise DataError(
            f"{first.message()} ({others} other bad row{plural} found{reasons}; or set "
            "data.on_bad_row=skip to drop and count bad rows)"
        )
    report.add_skipped(rows.bad)
    rows.bad = []
    return rows


def nothing_left(source: str, name: str, report: DataReport) -> DataError:
    """No usable row of a split is left: every skip reason with its count and limit, and the fix of
    the most frequent one."""
    reasons = sorted(report.skipped, key=lambda reason: -report.skipped[reason].count)
    fix = FIXES[reasons[0]] if reasons else "check the data, data.format and data.columns"
    held = f", {report.eval_rows} held out for evaluation" if name == "train" and report.eval_rows else ""
    return DataError(
        f"{source}: no usable {name} rows left of {report.rows_read} read{held}; skipped "
        f"{report.skip_text()}. Fix: {fix}"
    )


#: the key that marks a value JSON cannot hold in `raw_bytes` (its type's name)
UNREADABLE = "__alignlab_unreadable__"


def raw_bytes(row: dict[str, Any]) -> bytes:
    """A raw row as UTF-8 JSON for the Arrow file (`rows.RAW`; no pickle: the package never
    unpickles). A value JSON cannot hold (bytes, a timestamp) is kept as its type's name, read back
    by `raw_row` as a stand-in of that type name, which no canonical field accepts: a row that uses it
    is still a bad row naming its field and type."""
    return json.dumps(row, ensure_ascii=False, default=lambda v: {UNREADABLE: type(v).__name__}).encode()


def raw_row(raw: bytes) -> dict[str, Any]:
    """`raw_bytes` read back."""

    def stand_in(value: dict[str, Any]) -> Any:
        if len(value) == 1 and UNREADABLE in value:
            return type(value[UNREADABLE], (), {})()
        return value

    return json.loads(raw, object_hook=stand_in)
