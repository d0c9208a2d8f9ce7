"""The pipeline on Arrow: rows stay memory-mapped, not Python lists; worker processes change nothing; row
errors still name the row; the cache key is the one of the rows as dicts."""

from __future__ import annotations

import datasets
import pytest
from datasets.table import MemoryMappedTable

from alignlab.data import DataError, DataReport, build_datasets
from alignlab.data.cache import fingerprint
from alignlab.data.normalise import normalise, normalize, plan_of
from alignlab.data.read import read, read_source
from alignlab.data.tokenize import TokenizeSettings

#: good rows around four bad ones: a corrupt line (1), a missing field (3), an empty response (5),
#: identical responses (8).
ROWS = [
    {"prompt": "the film was", "chosen": "really great .", "rejected": "very dull ."},
    '{"prompt": "the show was", "chosen": ',
    {"prompt": "the book was", "chosen": "great .", "rejected": "dull ."},
    {"prompt": "the play was", "rejected": "dull ."},
    {"prompt": "the song was", "chosen": "great .", "rejected": "very dull ."},
    {"prompt": "the game was", "chosen": "  ", "rejected": "dull ."},
    {"prompt": "the novel was", "chosen": "really great .", "rejected": "dull ."},
    {"prompt": "the story was", "chosen": "great .", "rejected": "very dull ."},
    {"prompt": "the album was", "chosen": "great .", "rejected": "great ."},
    {"prompt": "the comic was", "chosen": "very great .", "rejected": "dull ."},
]


def test_rows_and_tokens_are_memory_mapped_not_python_lists(make_cfg, tokenizer, tmp_path, monkeypatch):
    cfg = make_cfg(ROWS, on_bad_row="skip", eval_size=2)
    report = DataReport(cfg.path)
    sources = read(cfg, report, tmp_path / "work")
    assert isinstance(sources.train.dataset.data, MemoryMappedTable)
    plan, splits = normalise(sources, cfg, tokenizer, ("chosen", "rejected"), (), report)
    assert splits.train.rows.cache_files and splits.train.rows.cache_files[0]["filename"].startswith(
        str(tmp_path / "work")
    )

    def from_list(*args, **kwargs):
        raise AssertionError("the rows were materialised as a Python list")

    monkeypatch.setattr(datasets.Dataset, "from_list", from_list)
    prepared = build_datasets(cfg, tokenizer)
    assert isinstance(prepared.train.data, MemoryMappedTable)
    assert (prepared.report.train_rows, prepared.report.eval_rows, prepared.report.rows_skipped) == (4, 2, 4)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_row_errors_name_the_row_in_worker_processes(make_cfg, tokenizer, num_proc):
    cfg = make_cfg(ROWS, num_proc=num_proc)
    with pytest.raises(
        DataError,
        match=r"data\.jsonl row 1: line 2 is not valid JSON .*\(corrupt JSON line\)\. Fix: repair or delete "
        r"the line \(3 other bad rows found: 1 x missing field, 1 x empty prompt or response, 1 x "
        r"identical responses; or set data\.on_bad_row=skip",
    ):
        build_datasets(cfg, tokenizer)
    cfg.on_bad_row = "skip"
    report = build_datasets(cfg, tokenizer).report
    assert {reason: count.examples for reason, count in report.skipped.items()} == {
        "corrupt JSON line": [f"{cfg.path} row 1"],
        "missing field": [f"{cfg.path} row 3"],
        "empty prompt or response": [f"{cfg.path} row 5"],
        "identical responses": [f"{cfg.path} row 8"],
    }


def test_two_worker_processes_give_the_rows_split_report_and_cache_key_of_one(make_cfg, tokenizer, tmp_path):
    one, two = (
        build_datasets(
            make_cfg(
                ROWS,
                num_proc=n,
                on_bad_row="skip",
                eval_size=2,
                max_prompt_length=2,
                prompt_truncation="keep_end",
                cache_dir=str(tmp_path / f"cache-{n}"),
            ),
            tokenizer,
        )
        for n in (1, 2)
    )
    assert two.train.to_list() == one.train.to_list() and two.eval.to_list() == one.eval.to_list()
    assert two.report.to_dict() == one.report.to_dict()
    assert one.report.prompts_truncated == 6  # every kept prompt has 3 words
    keys = [[entry.name for entry in (tmp_path / f"cache-{n}").iterdir()] for n in (1, 2)]
    assert keys[0] == keys[1] and len(keys[0]) == 2  # train and eval, under the same keys


def test_the_cache_key_of_arrow_rows_is_the_key_of_the_rows_as_dicts(make_cfg, tokenizer, tmp_path):
    cfg = make_cfg(ROWS, on_bad_row="skip")
    responses = ("chosen", "rejected")
    records = read_source(cfg.path)
    listed = normalize(records, plan_of(records, "auto", {}, responses, (), tokenizer, cfg.path), tokenizer)
    report = DataReport(cfg.path)
    _, splits = normalise(read(cfg, report, tmp_path / "work"), cfg, tokenizer, responses, (), report)
    settings = TokenizeSettings(64, 32, "error", "explicit", False, responses)
    assert splits.train.canonical().to_list() == listed.rows
    assert [str(ref) for ref in listed.refs] == [str(splits.train.refs[i]) for i in range(len(listed.rows))]
    assert fingerprint(splits.train.canonical(), tokenizer, settings) == fingerprint(
        listed.rows, tokenizer, settings
    )


def test_values_json_cannot_hold_are_ignored_unused_and_a_named_bad_row_used(make_cfg, tokenizer, tmp_path):
    # a Parquet source: a timestamp in a column no loss reads is ignored; bytes where the prompt must
    # be text make that row bad, named by its file and row (the raw rows cross the Arrow file as JSON)
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [r for r in ROWS if isinstance(r, dict) and r.get("chosen", "").strip() and "rejected" in r]
    good = [r for r in good if r["chosen"] != r["rejected"]]
    table = pa.table(
        {
            "prompt": [r["prompt"] for r in good],
            "chosen": [r["chosen"] for r in good],
            "rejected": [r["rejected"] for r in good],
            "when": [datetime.datetime(2026, 12, 2)] * len(good),
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    prepared = build_datasets(make_cfg(path=str(path)), tokenizer)
    assert prepared.report.train_rows == len(good)

    raw = [{"prompt": b"the film was", "chosen": "great .", "rejected": "dull ."}]
    pq.write_table(pa.Table.from_pylist(raw + good), path)
    with pytest.raises(DataError, match=r"data\.parquet row 0: field .prompt. is a bytes, expected a string"):
        build_datasets(make_cfg(path=str(path)), tokenizer)


def test_small_files_print_no_progress_bars(make_cfg, tokenizer, capfd, monkeypatch):
    """A few thousand rows prepare in seconds: datasets' "Normalising … examples/s" bars stay off (the
    first run's output stays readable), and come back for the run after (the global setting is kept)."""
    from datasets.utils import logging as datasets_logging

    from alignlab.data import pipeline

    datasets_logging.enable_progress_bar()
    build_datasets(make_cfg(ROWS, on_bad_row="skip", eval_size=2), tokenizer)
    assert "Normalising" not in capfd.readouterr().err
    assert datasets_logging.is_progress_bar_enabled()
    monkeypatch.setattr(pipeline, "PROGRESS_ROWS", 1)
    build_datasets(make_cfg(ROWS, on_bad_row="skip", eval_size=3), tokenizer)
    assert "Normalising" in capfd.readouterr().err
