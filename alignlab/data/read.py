"""Stage 1, read: where preference rows come from.

A source is read as `Record`s: a `RowRef` (file and 0-based row index, so that every message can
point at the row) and either the raw row (a dict) or a `BadRow` when the row could not even be
parsed (a corrupt JSON line). Nothing is interpreted here; `normalise` turns raw rows into prompts
and responses. `read` streams the train source and, when there is one, the separate eval source
(`data.eval_path`, `data.eval_split`, or a built-in task's held-out generator) into Arrow files in
the run's work folder (`ArrowRecords`: memory-mapped, so a million rows are never Python dicts at
once); `read_source` gives a source's records as a list (the retain set, tests).

Supported sources:

* ``builtin:sentiment`` — the embedded synthetic task (`alignlab.builtin.sentiment_pairs`).
* local files: ``.json`` (a JSON list of objects), ``.jsonl``, ``.json.gz`` / ``.jsonl.gz``,
  ``.parquet``, ``.csv`` and ``.tsv`` (optionally ``.gz``; a header row names the columns; row N is
  the N-th data row, 0-based); a folder means every such file in it, in sorted order.
* a folder written by `datasets`' ``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` whose
  `split` is read.
* anything else that is not an existing path: a Hugging Face dataset by name
  (`datasets.load_dataset`), from the hub or, offline (``HF_DATASETS_OFFLINE=1``), from the local
  Hugging Face cache.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignlab.builtin import DATASETS
from alignlab.data.rows import (
    BAD_DETAIL,
    BAD_REASON,
    RAW,
    ROW,
    SOURCE,
    BadRow,
    DataError,
    DataReport,
    Reason,
    Record,
    RowRef,
    raw_bytes,
)
from alignlab.data.split import eval_count
from alignlab.errors import first_line

if TYPE_CHECKING:
    import datasets

    from alignlab.config import DataConfig


#: file suffixes read from a local path or folder.
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
#: files that mark a folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict.
SAVED_DATASET, SAVED_DATASET_DICT = "state.json", "dataset_dict.json"


#: rows per Arrow record batch written by `write_records`.
WRITE_BATCH = 10_000


@dataclass
class ArrowRecords:
    """The records of one source, written to an Arrow file and memory-mapped.

    Attributes:
        dataset: one row per record: ``_source`` (an index into `labels`), ``_row`` (its `RowRef`
            index), ``_raw`` (the raw row as JSON, `raw_bytes`; null for a record that could not be
            parsed) and
            ``_bad_reason`` / ``_bad_detail`` (why not; "" for a parsed row).
        labels: the sources (files) the records come from, as `RowRef.source` names them.
        sample: what `normalise.plan_of` needs to plan the format without reading every row
            again: for each column, the first row where it is not null, in source order, plus one row
            of the columns that are null everywhere; or the first record alone when no row could be
            parsed.
    """

    dataset: datasets.Dataset
    labels: list[str]
    sample: list[Record]

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass
class Sources:
    """The records read for one run: the train source's, and the separate eval source's (None: the eval
    rows are held out of the train source, `split.hold_out`)."""

    train: ArrowRecords
    eval: ArrowRecords | None


def read(cfg: DataConfig, report: DataReport, folder: str | Path) -> Sources:
    """Read `data.path` (up to `data.limit` rows) and the eval source into Arrow files in `folder`,
    counting the rows read."""
    train = write_records(
        _records(cfg.path, name=cfg.name, split=cfg.split, limit=cfg.limit), cfg.path, Path(folder) / "train"
    )
    held_out = _eval_records(cfg)
    if held_out is not None:
        held_out = write_records(held_out, cfg.eval_path or cfg.path, Path(folder) / "eval")
    report.rows_read = len(train) + (len(held_out) if held_out is not None else 0)
    return Sources(train, held_out)


def write_records(records: Iterable[Record], path: str, target: Path) -> ArrowRecords:
    """Stream `records` of the source `path` into the Arrow file `target`.arrow, in batches of
    `WRITE_BATCH` rows, and memory-map it.

    Raises:
        DataError: the source holds no rows.
    """
    import datasets
    import pyarrow as pa

    schema = pa.schema(
        [
            (SOURCE, pa.int32()),
            (ROW, pa.int64()),
            (RAW, pa.binary()),
            (BAD_REASON, pa.string()),
            (BAD_DETAIL, pa.string()),
        ]
    )
    labels: dict[str, int] = {}
    sampler = _Sampler()
    target.parent.mkdir(parents=True, exist_ok=True)
    file = target.with_suffix(".arrow")
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: dict[str, list[Any]] = {name: [] for name in schema.names}
        for ref, row in records:
            bad = isinstance(row, BadRow)
            batch[SOURCE].append(labels.setdefault(ref.source, len(labels)))
            batch[ROW].append(ref.index)
            batch[RAW].append(None if bad else raw_bytes(row))
            batch[BAD_REASON].append(row.reason if bad else "")
            batch[BAD_DETAIL].append(row.detail if bad else "")
            sampler.add(ref, row)
            if len(batch[ROW]) == WRITE_BATCH:
                writer.write_batch(pa.record_batch(batch, schema=schema))
                batch = {name: [] for name in schema.names}
        if batch[ROW]:
            writer.write_batch(pa.record_batch(batch, schema=schema))
    if not sampler.count:
        raise _no_rows(path)
    return ArrowRecords(datasets.Dataset.from_file(str(file)), list(labels), sampler.records())


class _Sampler:
    """The rows that decide a format plan (`ArrowRecords.sample`), collected while streaming."""

    def __init__(self) -> None:
        self.count = 0
        self.first: Record | None = None
        self.rows: list[Record] = []
        self.present: set[str] = set()  # columns seen with a value
        self.columns: dict[str, None] = {}  # every column seen, in order

    def add(self, ref: RowRef, row: dict[str, Any] | BadRow) -> None:
        self.count += 1
        self.first = self.first or (ref, row)
        if isinstance(row, BadRow):
            return
        new = [key for key, value in row.items() if value is not None and key not in self.present]
        if new:
            self.present.update(new)
            self.rows.append((ref, row))
        self.columns.update(dict.fromkeys(row))

    def records(self) -> list[Record]:
        if not self.rows and self.first is not None and isinstance(self.first[1], BadRow):
            return [self.first]
        empty = {key: None for key in self.columns if key not in self.present}
        return self.rows + ([(self.rows[-1][0] if self.rows else self.first[0], empty)] if empty else [])


def _eval_records(cfg: DataConfig) -> Iterable[Record] | None:
    """Records of a separate eval source: `eval_path`, `eval_split` of `path` (a DatasetDict folder or
    a hub dataset), or the built-in task's held-out generator.

    None means the eval rows are held out of the train source (none when `eval_size` is 0).
    """
    if cfg.eval_path or cfg.eval_split:  # another source, or another split of data.path
        return _records(cfg.eval_path or cfg.path, name=cfg.name, split=cfg.eval_split or cfg.split)
    if cfg.path.startswith("builtin:"):
        spec = DATASETS.get(cfg.path.removeprefix("builtin:"))
        size = eval_count(cfg.eval_size, spec.size) if spec else 0
        if spec and spec.heldout_eval and size:
            return builtin_records(cfg.path, heldout=True, n=size)
    return None


def read_source(
    path: str, *, name: str | None = None, split: str = "train", limit: int | None = None
) -> list[Record]:
    """Read the rows of a data source.

    Args:
        path: ``builtin:NAME``, a local file or folder, or a hub dataset name.
        name: the hub dataset's configuration name.
        split: the hub split.
        limit: read only the first `limit` rows (None: all).

    Returns:
        One `Record` per row, in source order.

    Raises:
        DataError: the path does not exist and the hub cannot load it, a file cannot be parsed as
            a whole, or the source holds no rows.
    """
    records = list(_records(path, name=name, split=split, limit=limit))
    if not records:
        raise _no_rows(path)
    return records


def _no_rows(path: str) -> DataError:
    return DataError(f"{path} holds no rows. Fix: point data.path at a non-empty dataset")


def _records(
    path: str, *, name: str | None = None, split: str = "train", limit: int | None = None
) -> Iterable[Record]:
    """The records of a data source (`read_source`), streamed from local files and datasets."""
    if limit is not None and limit < 1:
        raise DataError(f"data.limit must be a positive number of rows or null, got {limit}")
    if path.startswith("builtin:"):
        records = builtin_records(path, limit=limit)
    else:
        local = Path(path).expanduser()
        if local.is_dir() and ((local / SAVED_DATASET).is_file() or (local / SAVED_DATASET_DICT).is_file()):
            records = _read_saved(local, path, split, limit)
        elif local.exists():
            if split != "train":  # a file has no splits: reading it as one would give the train rows again
                raise DataError(
                    f"{path}: split {split!r} was asked for, but a local file or folder of files "
                    "has no splits. Fix: set data.eval_path to the held-out file (or leave data.split / "
                    "data.eval_split unset)"
                )
            records = _read_local(local, path, limit)
        elif _looks_local(path):
            raise DataError(
                f"data file {path!r} does not exist (relative paths start at {os.getcwd()}). "
                "Fix: correct data.path / data.eval_path"
            )
        else:
            records = _read_hub(path, name, split, limit)
    return records


def builtin_records(
    path: str, *, heldout: bool = False, n: int | None = None, limit: int | None = None
) -> list[Record]:
    """The rows of an embedded task, e.g. ``builtin:sentiment`` (see `alignlab.builtin.DATASETS`).

    Args:
        path: ``builtin:NAME``.
        heldout: the held-out generator (unseen subjects), used for evaluation.
        n: number of rows to generate (default: the dataset's size).
        limit: keep only the first `limit` rows.
    """
    name = path.removeprefix("builtin:")
    if name not in DATASETS:
        known = ", ".join(f"builtin:{k}" for k in DATASETS)
        raise DataError(f"unknown built-in dataset {path!r}. Fix: use one of {known}")
    spec = DATASETS[name]
    rows = spec.generate(n=n or spec.size, seed=0, heldout=heldout)[:limit]
    label = f"{path} (held-out)" if heldout else path
    return [(RowRef(label, i), row) for i, row in enumerate(rows)]


def _looks_local(path: str) -> bool:
    """Whether a missing path was meant as a file: a hub name never looks like this."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(SUFFIXES)


def _read_local(path: Path, label: str, limit: int | None) -> Iterable[Record]:
    """Rows of one file, or of every supported file in a folder (sorted), up to `limit`."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise DataError(f"folder {label!r} holds no {', '.join(SUFFIXES)} files. Fix: correct data.path")
        labels = [os.path.join(label, p.name) for p in files]
    elif path.name.endswith(SUFFIXES):
        files, labels = [path], [label]
    else:
        raise DataError(
            f"{label}: unsupported file type. Fix: use one of {', '.join(SUFFIXES)} or a folder of such files"
        )
    rows = (record for file, name in zip(files, labels, strict=True) for record in _read_file(file, name))
    return islice(rows, limit)


def _read_file(path: Path, label: str) -> Iterator[Record]:
    """Records of one local file, chosen by suffix."""
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path, label)
    elif path.name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        yield from _read_csv(path, label)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(_lines(path, label), label)
    else:
        yield from _read_json(_read_text(path, label), label)


def _lines(path: Path, label: str) -> Iterator[str]:
    """The lines of a (possibly gzipped) UTF-8 file, streamed."""
    try:
        with (
            gzip.open(path, "rt", encoding="utf-8")
            if path.name.endswith(".gz")
            else open(path, encoding="utf-8") as f
        ):
            yield from f
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{label}: cannot read the file ({e}). Fix: check that it is UTF-8 "
            "JSON and, for .gz, a complete gzip file"
        ) from None


def _read_text(path: Path, label: str) -> str:
    """The whole text of a (possibly gzipped) UTF-8 file."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{label}: cannot read the file ({e}). Fix: check that it is UTF-8 "
            "JSON and, for .gz, a complete gzip file"
        ) from None


def _read_json(text: str, label: str) -> Iterator[Record]:
    """Rows of a .json file: a JSON list of objects (JSON lines are accepted too)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            yield from _read_jsonl(text.splitlines(), label)
            return
        raise DataError(
            f"{label}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}). Fix: repair "
            "the file; a .json file holds one list of row objects (use .jsonl for one "
            "object per line)"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{label}: expected a JSON list of row objects, found a {type(data).__name__}. "
            "Fix: store the rows as [{...}, {...}] or as .jsonl"
        )
    for i, row in enumerate(data):
        yield RowRef(label, i), _object(row, RowRef(label, i))


def _read_jsonl(lines: Iterable[str], label: str) -> Iterator[Record]:
    """Rows of JSON lines; blank lines are ignored, a corrupt line becomes a `BadRow`."""
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        ref = RowRef(label, i)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield (
                ref,
                BadRow(
                    ref, Reason.CORRUPT_JSON, f"line {i + 1} is not valid JSON ({e.msg} at column {e.colno})"
                ),
            )
            continue
        yield ref, _object(row, ref)


def _object(row: Any, ref: RowRef) -> dict[str, Any] | BadRow:
    """`row` if it is a JSON object, else a `BadRow`."""
    if isinstance(row, dict):
        return row
    return BadRow(ref, Reason.NOT_AN_OBJECT, f"the row is a {type(row).__name__}, not an object")


def _read_parquet(path: Path, label: str) -> Iterator[Record]:
    """Rows of a Parquet file, read in batches."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield RowRef(label, index), row
                index += 1
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for unreadable files
        raise DataError(
            f"{label}: cannot read the Parquet file ({type(e).__name__}: "
            f"{first_line(e)}). Fix: re-export it, or convert it to .jsonl"
        ) from e


def _read_csv(path: Path, label: str) -> Iterator[Record]:
    """Rows of a CSV (TSV: tab-separated) file with a header row, column types inferred by pyarrow as
    `datasets`' CSV loader would (integers, floats, true/false; empty text stays an empty string)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    tsv = ".tsv" in path.name
    try:
        table = pcsv.read_csv(
            path, parse_options=pcsv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True)
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{label}: cannot read the {'TSV' if tsv else 'CSV'} file ({first_line(e)}). Fix: give "
            "every line as many fields as the header row, quoting values that hold "
            f"{'tabs' if tsv else 'commas'} or line breaks, in UTF-8"
        ) from None
    index = 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            yield RowRef(label, index), row
            index += 1


def _read_saved(path: Path, label: str, split: str, limit: int | None) -> Iterable[Record]:
    """Rows of a `save_to_disk` folder: the Dataset, or the DatasetDict's `split`."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise DataError(
            f"{label}: cannot load the saved dataset ({type(e).__name__}: {first_line(e)}). "
            "Fix: save it again with Dataset.save_to_disk / DatasetDict.save_to_disk"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{label} is a DatasetDict without the split {split!r}. Fix: set data.split (or "
                f"data.eval_split) to one of {', '.join(dataset)}"
            )
        dataset, label = dataset[split], f"{label}[{split}]"
    return _dataset_records(dataset, label, limit)


def _dataset_records(dataset, label: str, limit: int | None) -> Iterator[Record]:
    """The rows of a `datasets.Dataset`, up to `limit`, read in batches."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    index = 0
    for batch in dataset.iter(batch_size=1024):
        for values in zip(*batch.values(), strict=True):
            yield RowRef(label, index), dict(zip(batch, values, strict=True))
            index += 1


def _read_hub(path: str, name: str | None, split: str, limit: int | None) -> Iterable[Record]:
    """Rows of a hub dataset's split."""
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # the hub raises many types: connection, not found, bad config or split
        raise DataError(
            f"data.path={path!r} is not an existing local file or folder (relative paths start "
            f"at {os.getcwd()}), and Hugging Face datasets could not load it from the hub or the local "
            f"cache ({type(e).__name__}: {first_line(e)}). Fix: correct the path, or the dataset name, "
            "data.name and data.split"
        ) from e
    return _dataset_records(dataset, f"hub {path}[{split}]", limit)
