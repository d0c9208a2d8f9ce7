"""Stage 6, cache: a tokenised split on disk, keyed by what decides it.

The key is a sha256 fingerprint of the canonical rows' content, the tokenizer (`tokenizer_signature`)
and the settings that decide the output (`fingerprint`); the dataset is written to a temporary
folder and renamed into place, so an interrupted run never leaves a partial cache behind, and two
processes that write the same entry at once both end with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

#: bump when the tokenized output changes for the same inputs, to invalidate old caches.
CACHE_VERSION = 2


def tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour, for the cache fingerprint."""
    if getattr(tokenizer, "is_fast", False):
        backend = tokenizer.backend_tokenizer.to_str()
    else:  # slow tokenizers have no serialisation; their vocabulary is the next best thing
        backend = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "backend_sha256": hashlib.sha256(backend.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_ids": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
        },
    }


def fingerprint(
    rows: Sequence[dict[str, Any]] | datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: Any
) -> str:
    """sha256 over the rows' content, the tokenizer and the settings (`tokenize.TokenizeSettings`)."""
    digest = hashlib.sha256()
    header = {
        "version": CACHE_VERSION,
        "settings": asdict(settings),
        "tokenizer": tokenizer_signature(tokenizer),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for row in _row_dicts(rows):
        digest.update(b"\n")
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def _row_dicts(rows: Sequence[dict[str, Any]] | datasets.Dataset) -> Iterator[dict[str, Any]]:
    """The rows as dicts; a `datasets.Dataset` read in batches (the same dicts as its rows)."""
    import datasets

    if not isinstance(rows, datasets.Dataset):
        yield from rows
        return
    for batch in rows.iter(batch_size=1000):
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(batch, values, strict=True))


def default_cache_dir() -> Path:
    """``~/.cache/alignlab/tokenized``."""
    return Path.home() / ".cache" / "alignlab" / "tokenized"


def cache_root(cache_dir: str | Path | None) -> Path:
    """`data.cache_dir`, or `default_cache_dir()`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def cached(
    rows: Sequence[dict[str, Any]] | datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: Any,
    build: Callable[[str], datasets.Dataset],
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, bool]:
    """The cached dataset of these rows, tokenizer and settings, or `build(key)`'s, saved first.

    Returns:
        The dataset (read back from the cache) and whether it was there already.
    """
    import datasets

    root = cache_root(cache_dir)
    key = fingerprint(rows, tokenizer, settings)
    target = root / key
    if target.is_dir():
        return datasets.load_from_disk(str(target)), True
    _save_atomically(build(key), root, key)
    return datasets.load_from_disk(str(target)), False


def _save_atomically(dataset: datasets.Dataset, root: Path, key: str) -> None:
    """Save to a temporary folder, then rename it to `root/key` in one step."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex}"
    try:
        dataset.save_to_disk(str(tmp))
        os.rename(tmp, root / key)
    except OSError:
        if not (root / key).is_dir():  # not a lost race with an identical writer: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
