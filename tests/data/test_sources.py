"""Sources (files, folders, the built-in task, the hub), limits and train/eval splits."""

from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlab.builtin import SUBJECTS_HELDOUT, SUBJECTS_TRAIN
from alignlab.data import DataError, build_datasets
from alignlab.data.read import read_source
from alignlab.data.rows import RowRef


def prompts(dataset, words) -> list[str]:
    return [words(row) for row in dataset["prompt_ids"]]


# --- file types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "rows.json",
        "rows.json.gz",
        "rows.jsonl",
        "rows.jsonl.gz",
        "rows.parquet",
        "rows.csv",
        "rows.tsv",
        "rows.csv.gz",
    ],
)
def test_every_file_type(tmp_path, pairs, make_cfg, tokenizer, words, name):
    path = tmp_path / name
    rows = pairs(3)
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ".csv" in name or ".tsv" in name:
        import pyarrow.csv as pcsv

        options = pcsv.WriteOptions(delimiter="\t" if ".tsv" in name else ",")
        pcsv.write_csv(
            pa.Table.from_pylist(rows),
            pa.CompressedOutputStream(str(path), "gzip") if name.endswith(".gz") else str(path),
            write_options=options,
        )
    else:
        lines = ".jsonl" in name
        text = "\n".join(map(json.dumps, rows)) if lines else json.dumps(rows)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    prepared = build_datasets(make_cfg(path=str(path)), tokenizer)
    assert prompts(prepared.train, words) == ["the film was", "the movie was", "the show was"]


def test_json_lines_under_a_json_name(tmp_path, pairs):
    path = tmp_path / "rows.json"
    path.write_text("\n".join(map(json.dumps, pairs(2))))
    assert [row["prompt"] for _, row in read_source(str(path))] == ["the film was", "the movie was"]


def test_folder_reads_supported_files_sorted(tmp_path, pairs, write_jsonl):
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = pairs(3)
    (folder / "b.json").write_text(json.dumps(rows[2:]))
    (folder / "a.jsonl").write_text("\n".join(map(json.dumps, rows[:2])))
    (folder / "notes.txt").write_text("ignored")
    records = read_source(str(folder))
    assert [ref for ref, _ in records] == [
        RowRef(f"{folder}/a.jsonl", 0),
        RowRef(f"{folder}/a.jsonl", 1),
        RowRef(f"{folder}/b.json", 0),
    ]
    assert [row for _, row in records] == rows


def test_limit_takes_the_first_rows(make_cfg, pairs, tokenizer, words):
    prepared = build_datasets(make_cfg(pairs(6), limit=2), tokenizer)
    assert prompts(prepared.train, words) == ["the film was", "the movie was"]
    assert prepared.report.rows_read == 2


def test_blank_jsonl_lines_are_not_rows(write_jsonl, pairs):
    path = write_jsonl([pairs(1)[0], "", "   ", pairs(2)[1]])
    assert [ref.index for ref, _ in read_source(str(path))] == [0, 3]  # 0-based line index


# --- broken or absent sources ---------------------------------------------------------------------


def test_invalid_json_file_names_file_and_line(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": oops}\n]')
    with pytest.raises(DataError, match=r"rows.json: invalid JSON at line 3 column 12"):
        build_datasets(make_cfg(path=str(path)), tokenizer)


def test_json_object_instead_of_list(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('{"data": []}')
    with pytest.raises(DataError, match="expected a JSON list of row objects, found a dict"):
        build_datasets(make_cfg(path=str(path)), tokenizer)


def test_truncated_gzip(tmp_path, make_cfg, tokenizer, pairs):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(pairs(1)[0]).encode())[:-12])
    with pytest.raises(DataError, match="rows.jsonl.gz: cannot read the file"):
        build_datasets(make_cfg(path=str(path)), tokenizer)


def test_corrupt_parquet(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="rows.parquet: cannot read the Parquet file"):
        build_datasets(make_cfg(path=str(path)), tokenizer)


def test_missing_local_file(make_cfg, tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nope.jsonl' does not exist"):
        build_datasets(make_cfg(path=str(tmp_path / "nope.jsonl")), tokenizer)


def test_empty_file(write_jsonl, make_cfg, tokenizer):
    with pytest.raises(DataError, match="holds no rows"):
        build_datasets(make_cfg(path=str(write_jsonl([""]))), tokenizer)


def test_hub_failure_is_wrapped(monkeypatch, make_cfg, tokenizer):
    def offline(*args, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg(path="someone/prefs"), tokenizer)
    text = str(error.value)
    assert "'someone/prefs' is not an existing local file or folder" in text
    assert "could not load it from the hub or the local cache (ConnectionError: no network)" in text
    assert "\n" not in text


def test_hub_dataset_with_limit(monkeypatch, make_cfg, tokenizer, pairs, words):
    calls = []

    def load(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(pairs(5))

    monkeypatch.setattr(datasets, "load_dataset", load)
    prepared = build_datasets(make_cfg(path="someone/prefs", name="cfg", split="test", limit=3), tokenizer)
    assert calls == [("someone/prefs", "cfg", "test")]
    assert prompts(prepared.train, words) == ["the film was", "the movie was", "the show was"]


# --- splits ---------------------------------------------------------------------------------------


def test_builtin_train_and_held_out_eval(tmp_path, tokenizer, words):
    from alignlab.config import DataConfig

    cfg = DataConfig(path="builtin:sentiment", eval_size=0.05, cache_dir=str(tmp_path))
    prepared = build_datasets(cfg, tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (2400, 120)  # round(0.05 * 2400)
    train_words = {word for text in prompts(prepared.train, words) for word in text.split()}
    assert not train_words & set(SUBJECTS_HELDOUT)
    eval_words = [set(text.split()) for text in prompts(prepared.eval, words)]
    assert all(ws & set(SUBJECTS_HELDOUT) and not ws & set(SUBJECTS_TRAIN) for ws in eval_words)


@pytest.mark.parametrize(("eval_size", "expected"), [(0, None), (7, 7)])
def test_builtin_eval_sizes(tmp_path, tokenizer, eval_size, expected):
    from alignlab.config import DataConfig

    prepared = build_datasets(
        DataConfig(path="builtin:sentiment", eval_size=eval_size, limit=50, cache_dir=str(tmp_path)),
        tokenizer,
    )
    assert len(prepared.train) == 50
    assert (None if prepared.eval is None else len(prepared.eval)) == expected


def test_unknown_builtin(make_cfg, tokenizer):
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope'"):
        build_datasets(make_cfg(path="builtin:nope"), tokenizer)


@pytest.mark.parametrize(("eval_size", "count"), [(0.25, 2), (3, 3)])
def test_held_out_split_is_seeded_and_disjoint(make_cfg, pairs, tokenizer, words, eval_size, count):
    cfg = make_cfg(pairs(8), eval_size=eval_size)
    first = build_datasets(cfg, tokenizer, seed=1)
    again = build_datasets(cfg, tokenizer, seed=1)
    train, held = prompts(first.train, words), prompts(first.eval, words)
    assert len(held) == count and len(train) == 8 - count
    assert sorted(train + held) == sorted(row["prompt"] for row in pairs(8))
    assert prompts(again.eval, words) == held
    others = {tuple(prompts(build_datasets(cfg, tokenizer, seed=s).eval, words)) for s in range(2, 8)}
    assert len(others | {tuple(held)}) > 1  # the seed matters


def test_eval_size_too_large(make_cfg, pairs, tokenizer):
    with pytest.raises(DataError, match=r"data.eval_size=4.0 holds out 4 of the 4 usable rows"):
        build_datasets(make_cfg(pairs(4), eval_size=4.0), tokenizer)


def test_eval_path(tmp_path, write_jsonl, make_cfg, pairs, tokenizer, words):
    rows = pairs(5)
    eval_path = write_jsonl([*rows[3:], {"prompt": "x"}], name="eval.jsonl")
    prepared = build_datasets(
        make_cfg(rows[:3], eval_path=str(eval_path), eval_size=0.5, on_bad_row="skip"), tokenizer
    )
    assert len(prepared.train) == 3  # eval_size is ignored when eval_path is given
    assert prompts(prepared.eval, words) == ["the book was", "the play was"]
    assert prepared.report.skipped["missing field"].examples == [f"{eval_path} row 2"]
    assert (prepared.report.rows_read, prepared.report.eval_rows) == (6, 2)


def test_nothing_readable_names_the_first_line(write_jsonl, make_cfg, tokenizer):
    path = write_jsonl(["{oops", "[1, 2]"])
    with pytest.raises(DataError) as error:
        build_datasets(make_cfg(path=str(path)), tokenizer)
    assert str(error.value).startswith(f"{path} row 0: line 1 is not valid JSON")
    assert str(error.value).endswith(f"(no row of {path} could be read)")


def test_data_error_is_a_user_error():
    """The CLI prints UserErrors as one line without a traceback; callers may catch ValueError."""
    from alignlab.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# --- CSV / TSV, save_to_disk folders, the local Hugging Face cache --------------------------------


def test_csv_values_typed_like_datasets_and_bad_rows_named(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "rows.csv"
    path.write_text(
        'prompt,completion,label\n"the film, at last",really great .,true\n'
        'the show was,"very\ndull .",0\nthe play was,,1\n'
    )
    records = read_source(str(path))
    assert [row for _, row in records] == [
        {"prompt": "the film, at last", "completion": "really great .", "label": True},
        {"prompt": "the show was", "completion": "very\ndull .", "label": False},
        {"prompt": "the play was", "completion": "", "label": True},
    ]  # 0/1 and true/false: one bool column
    with pytest.raises(DataError, match=r"rows\.csv row 2: .*'completion'.*empty"):
        build_datasets(make_cfg(path=str(path)), tokenizer, responses=("completion",), fields=("label",))


def test_malformed_csv_line_is_one_line(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("prompt\tchosen\trejected\na\tb\tc\nonly\ttwo\n")
    with pytest.raises(
        DataError, match=r"rows\.tsv: cannot read the TSV file \(.*Expected 3 columns, got 2.*Fix:"
    ):
        read_source(str(path))


@pytest.fixture
def saved_dict(tmp_path, pairs):
    """A DatasetDict folder written by save_to_disk: train = 4 pairs, test = the next 2 (one bad)."""
    rows = pairs(6)
    rows[5] = {**rows[5], "rejected": rows[5]["chosen"]}
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    ).save_to_disk(str(folder))
    return folder


def test_save_to_disk_dataset_dict_with_splits(saved_dict, make_cfg, tokenizer, words):
    prepared = build_datasets(make_cfg(path=str(saved_dict), eval_split="test", on_bad_row="skip"), tokenizer)
    assert prompts(prepared.train, words) == ["the film was", "the movie was", "the show was", "the book was"]
    assert prompts(prepared.eval, words) == ["the play was"]
    assert prepared.report.skipped["identical responses"].examples == [f"{saved_dict}[test] row 1"]
    with pytest.raises(DataError, match=r"saved\[test\] row 1: .*identical"):
        build_datasets(make_cfg(path=str(saved_dict), split="test"), tokenizer)
    with pytest.raises(DataError, match="DatasetDict without the split 'valid'.*one of train, test"):
        build_datasets(make_cfg(path=str(saved_dict), eval_split="valid"), tokenizer)


def test_save_to_disk_dataset(tmp_path, pairs, make_cfg, tokenizer, words):
    datasets.Dataset.from_list(pairs(3)).save_to_disk(str(tmp_path / "one"))
    prepared = build_datasets(make_cfg(path=str(tmp_path / "one")), tokenizer)
    assert prompts(prepared.train, words) == ["the film was", "the movie was", "the show was"]


def test_a_file_has_no_splits(write_jsonl, pairs, make_cfg, tokenizer):
    with pytest.raises(DataError, match="has no splits. Fix: set data.eval_path"):
        build_datasets(make_cfg(path=str(write_jsonl(pairs(3))), eval_split="test"), tokenizer)


def test_dataset_by_name_from_the_local_cache_offline(
    tmp_path, monkeypatch, pairs, make_cfg, tokenizer, words
):
    """A dataset in the Hugging Face datasets cache (as a download leaves it: <cache>/someone___prefs/
    default/0.0.0/<hash>/prefs-<split>.arrow) is read by name with the hub unreachable."""
    from datasets.packaged_modules.json.json import Json

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rows = pairs(5)
    rows[3] = {**rows[3], "chosen": ""}
    source = tmp_path / "source.jsonl"
    source.write_text("\n".join(map(json.dumps, rows)))
    builder = Json(
        dataset_name="someone___prefs",
        config_id="default",
        data_files={"train": str(source)},
        hash="0123abcd",
        cache_dir=str(tmp_path / "hf"),
    )
    builder.download_and_prepare()
    folder = tmp_path / "hf" / "someone___prefs" / "default" / "0.0.0" / "0123abcd"
    (folder / "someone___prefs-train.arrow").rename(folder / "prefs-train.arrow")  # a download's file name
    prepared = build_datasets(make_cfg(path="someone/prefs", limit=3), tokenizer)
    assert prompts(prepared.train, words) == ["the film was", "the movie was", "the show was"]
    with pytest.raises(DataError, match=r"hub someone/prefs\[train\] row 3: field 'chosen'.*empty"):
        build_datasets(make_cfg(path="someone/prefs"), tokenizer)
