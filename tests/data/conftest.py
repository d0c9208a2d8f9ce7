"""Fixtures of the data-pipeline tests: the builtin word-level tokenizer, files, configs.

Expected token ids are computed here by looking words up in the tokenizer's vocabulary (the
builtin tokenizer splits on whitespace), never by calling the code under test.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignlab.builtin import build_tokenizer
from alignlab.config import DataConfig

SUBJECTS = [
    "film",
    "movie",
    "show",
    "book",
    "play",
    "album",
    "series",
    "novel",
    "story",
    "song",
    "game",
    "musical",
    "comic",
    "documentary",
]


@pytest.fixture(scope="session")
def tokenizer():
    """The builtin word-level tokenizer: pad 0, eos 1, unk 2, <|user|> 3, <|assistant|> 4, <|system|> 5."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def ids(tokenizer) -> Callable[[str], list[int]]:
    """Expected ids of a whitespace-separated text, unknown words as <unk>."""
    vocab = tokenizer.get_vocab()

    def lookup(text: str) -> list[int]:
        return [vocab.get(word, vocab["<unk>"]) for word in text.split()]

    return lookup


@pytest.fixture(scope="session")
def words(tokenizer) -> Callable[[list[int]], str]:
    """The text of ids (inverse of `ids` for known words)."""
    inverse = {i: w for w, i in tokenizer.get_vocab().items()}
    return lambda token_ids: " ".join(inverse[i] for i in token_ids)


def _pair_rows(n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"the {subject} was", "chosen": "really great .", "rejected": "very dull ."}
        for subject in SUBJECTS[:n]
    ]


@pytest.fixture(scope="session")
def pairs() -> Callable[[int], list[dict[str, str]]]:
    """`pairs(n)`: n (<= 14) explicit rows with distinct prompts ``the <subject> was``, all in vocabulary."""
    return _pair_rows


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One line per row: dicts as JSON, strings verbatim (to write corrupt lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., Path]:
    """`write_jsonl(rows, name="data.jsonl")`: write rows into tmp_path (see `_write_jsonl`)."""
    return lambda rows, name="data.jsonl": _write_jsonl(tmp_path / name, rows)


@pytest.fixture
def make_cfg(tmp_path) -> Callable[..., DataConfig]:
    """`make_cfg(rows, **fields)`: a DataConfig over `rows` written to tmp_path/data.jsonl.

    Unless overridden: no eval split and a cache in tmp_path; pass `path=` instead of rows to read
    another source.
    """

    def make(rows: list[Any] | None = None, **overrides: Any) -> DataConfig:
        if rows is not None:
            overrides.setdefault("path", str(_write_jsonl(tmp_path / "data.jsonl", rows)))
        overrides.setdefault("eval_size", 0)
        overrides.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataConfig(**overrides)

    return make
