"""Stage 5, tokenise: canonical rows to token ids, with length limits (cached by `cache`).

Each canonical row ``{prompt, <response>...}`` becomes ``prompt_ids`` and one ``<response>_ids``
column per response (response tokens + EOS), fitted so that ``len(prompt_ids) + len(<r>_ids) <=
max_length``; requested scalar fields (e.g. ``label``) are passed through as typed columns. Rows
that cannot be fitted are not dropped here: they are flagged in metadata columns (`META_COLUMNS`)
together with truncation counts, so that the cached result does not depend on `data.on_bad_row`
and a cache hit reports exactly what a fresh run would.

The tokenized dataset is cached under a sha256 fingerprint of the rows, the tokenizer and the
settings (`cache.fingerprint`). `tokenize_split` then settles the flagged rows like any bad row
(`rows.settle`) and counts truncations in the report.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignlab.data.cache import cached
from alignlab.data.rows import (
    BAD_DETAIL,
    BAD_REASON,
    ArrowRows,
    BadRow,
    DataError,
    DataReport,
    Normalized,
    Reason,
    nothing_left,
    settle,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig
    from alignlab.data.split import Splits
PROMPT_TRUNCATED = "_prompt_truncated"
RESPONSES_TRUNCATED = "_responses_truncated"
META_COLUMNS = (BAD_REASON, BAD_DETAIL, PROMPT_TRUNCATED, RESPONSES_TRUNCATED)
#: the `datasets` value types of scalar fields.
FIELD_DTYPES = ("bool", "int64", "float64")


def field_dtype(values: Sequence[Any]) -> str:
    """The column type of one field's values: bool if all are bools, float64 if any is a float, else int64."""
    if all(isinstance(value, bool) for value in values):
        return "bool"
    if any(isinstance(value, float) for value in values):
        return "float64"
    return "int64"


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides rows and tokenizer that decides the tokenized output.

    Attributes:
        max_length: prompt + response tokens at most.
        max_prompt_length: prompt tokens at most.
        prompt_truncation: error | keep_end | keep_start, for prompts over `max_prompt_length`.
        format: the format plan's kind (recorded in the fingerprint).
        chat: rows were rendered by a chat template: no special tokens are added to the prompt, and
            EOS is appended to a response only when the template did not put it there.
        responses: the response names, e.g. ("chosen", "rejected").
        fields: ``(name, dtype)`` of the scalar columns passed through, dtype one of `FIELD_DTYPES`.
        own_prompts: responses with a prompt of their own (``<response>_prompt``), each fitted with it
            and kept as ``<response>_prompt_ids`` (`Needs.own_prompts`).
    """

    max_length: int
    max_prompt_length: int
    prompt_truncation: str
    format: str
    chat: bool
    responses: tuple[str, ...]
    fields: tuple[tuple[str, str], ...] = ()
    own_prompts: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        cfg: DataConfig,
        kind: str,
        chat: bool,
        responses: tuple[str, ...],
        fields: tuple[str, ...],
        parts: Sequence[Normalized],
        own_prompts: tuple[str, ...] = (),
    ) -> TokenizeSettings:
        """The settings of a run's splits (`parts`, whose field values are cast to one type per field)."""
        return cls(
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.prompt_truncation,
            kind,
            chat,
            responses,
            field_types(fields, parts),
            tuple(own_prompts),
        )


def field_types(fields: tuple[str, ...], parts: Sequence[Normalized]) -> tuple[tuple[str, str], ...]:
    """One column type per field over all splits, with every row's value cast to it."""
    types = []
    for name in fields:
        if any(isinstance(part, ArrowRows) for part in parts):  # JSON text on Arrow: typed in place
            dtype = field_dtype([json.loads(value) for part in parts for value in part.rows[name]])
            for part in parts:
                part.rows = _cast_field(part.rows, name, dtype)
            types.append((name, dtype))
            continue
        rows = [row for part in parts for row in part.rows]
        dtype = field_dtype([row[name] for row in rows])
        cast = {"bool": bool, "int64": int, "float64": float}[dtype]
        for row in rows:
            row[name] = cast(row[name])
        types.append((name, dtype))
    return tuple(types)


def _cast_field(dataset: datasets.Dataset, name: str, dtype: str) -> datasets.Dataset:
    """`dataset` with the JSON-text column `name` parsed and cast to `dtype`."""
    from datasets import Value

    cast = {"bool": bool, "int64": int, "float64": float}[dtype]
    features = dataset.features.copy()
    features[name] = Value(dtype)
    return dataset.map(
        lambda batch: {name: [cast(json.loads(value)) for value in batch[name]]},
        batched=True,
        features=features,
        new_fingerprint=uuid.uuid4().hex,
        desc=f"Typing {name}",
    )


@dataclass
class Fitted:
    """One row's token ids after EOS and length limits.

    Attributes:
        prompt_ids: the (possibly truncated) prompt.
        response_ids: one list per response, EOS included unless truncated away.
        own_prompt_ids: one list per response of `TokenizeSettings.own_prompts`, its own prompt.
        prompt_truncated: whether the prompt was cut.
        responses_truncated: how many responses were cut.
        reason: a `Reason` when the row cannot be used, else "".
        detail: what is wrong with it.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]] = field(default_factory=list)
    own_prompt_ids: list[list[int]] = field(default_factory=list)
    prompt_truncated: bool = False
    responses_truncated: int = 0
    reason: str = ""
    detail: str = ""

    @classmethod
    def bad(cls, reason: str, detail: str, settings: TokenizeSettings) -> Fitted:
        """A row that cannot be used: empty ids, and why."""
        empty = [[] for _ in settings.own_prompts]
        return cls([], [[] for _ in settings.responses], empty, reason=reason, detail=detail)


def fit_row(
    prompt_ids: list[int],
    response_ids: Sequence[list[int]],
    own_prompt_ids: Sequence[list[int]],
    eos_token_id: int,
    settings: TokenizeSettings,
) -> Fitted:
    """`fit` the responses that share the row's prompt with it, and each response with a prompt of its
    own (`settings.own_prompts`) with that prompt; the row is bad if any of them is."""
    if not settings.own_prompts:
        return fit(prompt_ids, response_ids, eos_token_id, settings)
    ids = dict(zip(settings.responses, response_ids, strict=True))
    shared = tuple(name for name in settings.responses if name not in settings.own_prompts)
    out = fit(prompt_ids, [ids[name] for name in shared], eos_token_id, replace(settings, responses=shared))
    fitted = dict(zip(shared, out.response_ids))
    for name, own in zip(settings.own_prompts, own_prompt_ids, strict=True):
        one = fit(own, [ids[name]], eos_token_id, replace(settings, responses=(name,)), f"{name}_prompt")
        bad = one if one.reason else out
        if bad.reason:
            return Fitted.bad(bad.reason, bad.detail, settings)
        fitted[name] = one.response_ids[0]
        out.own_prompt_ids.append(one.prompt_ids)
        out.prompt_truncated |= one.prompt_truncated
        out.responses_truncated += one.responses_truncated
    out.response_ids = [fitted[name] for name in settings.responses]
    return out


def fit(
    prompt_ids: list[int],
    response_ids: Sequence[list[int]],
    eos_token_id: int,
    settings: TokenizeSettings,
    prompt_name: str = "prompt",
) -> Fitted:
    """Append EOS to each response and apply the length limits.

    A prompt over `max_prompt_length` is a bad row (`prompt_truncation=error`) or keeps its last
    (`keep_end`) or first (`keep_start`) tokens. Responses are then cut on the right to fit
    `max_length`, losing their EOS; a response left with no token makes the row bad.

    Args:
        prompt_ids: the tokenized prompt.
        response_ids: the tokenized responses, in `settings.responses` order, without EOS.
        eos_token_id: the tokenizer's EOS id.
        settings: the limits.
        prompt_name: how messages name the prompt (a response's own, e.g. ``chosen_prompt``).
    """
    out = Fitted(prompt_ids)
    if len(prompt_ids) > settings.max_prompt_length:
        if settings.prompt_truncation == "error":
            return Fitted.bad(
                Reason.PROMPT_TOO_LONG,
                f"the {prompt_name} has {len(prompt_ids)} tokens, more than "
                f"data.max_prompt_length={settings.max_prompt_length}",
                settings,
            )
        keep = settings.max_prompt_length
        out.prompt_ids = prompt_ids[-keep:] if settings.prompt_truncation == "keep_end" else prompt_ids[:keep]
        out.prompt_truncated = True
    budget = settings.max_length - len(out.prompt_ids)
    for name, ids in zip(settings.responses, response_ids, strict=True):
        ids = _with_eos(ids, eos_token_id, settings.chat)
        if len(ids) > budget:
            ids = ids[: max(budget, 0)]
            out.responses_truncated += 1
        if not ids:
            detail = (
                f"the {name} response has no token left after a {len(out.prompt_ids)}-token {prompt_name} "
                f"within data.max_length={settings.max_length}"
            )
            return Fitted.bad(Reason.EMPTY_AFTER_TRUNCATION, detail, settings)
        out.response_ids.append(ids)
    return out


def _with_eos(ids: list[int], eos_token_id: int, chat: bool) -> list[int]:
    """`ids` followed by EOS, unless already there.

    A chat template closes a turn with its own end token, often followed by a newline (e.g.
    ``<|im_end|>\\n``), so for rendered conversations any EOS in the response counts.
    """
    present = eos_token_id in ids if chat else bool(ids) and ids[-1] == eos_token_id
    return list(ids) if present else [*ids, eos_token_id]


def encode_batch(
    batch: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    eos_token_id: int,
) -> dict[str, list[Any]]:
    """`datasets.Dataset.map` function (batched): canonical strings -> fitted ids and metadata."""
    prompts = tokenizer(batch["prompt"], add_special_tokens=not settings.chat)["input_ids"]
    responses = [tokenizer(batch[name], add_special_tokens=False)["input_ids"] for name in settings.responses]
    own = [
        tokenizer(batch[f"{name}_prompt"], add_special_tokens=not settings.chat)["input_ids"]
        for name in settings.own_prompts
    ]
    out: dict[str, list[Any]] = {column: [] for column in output_columns(settings)}
    for i, prompt in enumerate(prompts):
        row = fit_row(prompt, [ids[i] for ids in responses], [ids[i] for ids in own], eos_token_id, settings)
        out["prompt_ids"].append(row.prompt_ids)
        for name, ids in zip(settings.responses, row.response_ids, strict=True):
            out[f"{name}_ids"].append(ids)
        for name, ids in zip(settings.own_prompts, row.own_prompt_ids, strict=True):
            out[f"{name}_prompt_ids"].append(ids)
        for name, _ in settings.fields:
            out[name].append(batch[name][i])
        out[BAD_REASON].append(row.reason)
        out[BAD_DETAIL].append(row.detail)
        out[PROMPT_TRUNCATED].append(row.prompt_truncated)
        out[RESPONSES_TRUNCATED].append(row.responses_truncated)
    return out


def output_columns(settings: TokenizeSettings) -> list[str]:
    """The token columns, the field columns, then the metadata columns."""
    return [
        *_id_columns(settings),
        *(name for name, _ in settings.fields),
        *META_COLUMNS,
    ]


def _id_columns(settings: TokenizeSettings) -> list[str]:
    """``prompt_ids``, ``<response>_ids`` for each response, ``<response>_prompt_ids`` for own prompts."""
    return [
        "prompt_ids",
        *(f"{name}_ids" for name in settings.responses),
        *(f"{name}_prompt_ids" for name in settings.own_prompts),
    ]


def _features(settings: TokenizeSettings) -> datasets.Features:
    """Explicit column types, so a batch of only bad (empty) rows still types as int lists."""
    from datasets import Features, List, Value

    ids = {column: List(Value("int32")) for column in _id_columns(settings)}
    fields = {name: Value(dtype) for name, dtype in settings.fields}
    return Features(
        {
            **ids,
            **fields,
            BAD_REASON: Value("string"),
            BAD_DETAIL: Value("string"),
            PROMPT_TRUNCATED: Value("bool"),
            RESPONSES_TRUNCATED: Value("int32"),
        }
    )


def tokenize_rows(
    rows: Sequence[dict[str, Any]] | datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    *,
    eos_token_id: int,
    cache_dir: str | Path | None = None,
    num_proc: int = 1,
    desc: str = "Tokenizing",
) -> tuple[datasets.Dataset, bool]:
    """Tokenize canonical rows, or load the result of an identical earlier call (`cache.cached`).

    Args:
        rows: canonical rows (at least one): dicts, or a `datasets.Dataset` of their columns (read where
            it is, e.g. memory-mapped).
        tokenizer: the model's tokenizer.
        settings: length limits and format.
        eos_token_id: appended to every response.
        cache_dir: where tokenized datasets are kept; None: `cache.default_cache_dir()`.
        num_proc: worker processes for `Dataset.map` (1: none).
        desc: progress-bar label.

    Returns:
        The dataset (token columns and `META_COLUMNS`, one row per input row, same order) and
        whether it came from the cache.
    """
    import datasets

    def build(key: str) -> datasets.Dataset:
        table = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
        return table.map(
            encode_batch,
            batched=True,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=table.column_names,
            features=_features(settings),
            new_fingerprint=key[:32],
            desc=desc,  # datasets caps fingerprints at 64 characters
            fn_kwargs={"tokenizer": tokenizer, "settings": settings, "eos_token_id": eos_token_id},
        )

    return cached(rows, tokenizer, settings, build, cache_dir)


@dataclass
class TokenizedSplits:
    """The tokenized train and eval datasets, and whether every one came from the cache."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    cache_hit: bool


def tokenize_splits(
    rows: Splits,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    eos_token_id: int,
    cfg: DataConfig,
    report: DataReport,
) -> TokenizedSplits:
    """Stages 5 and 6 for the train and eval splits (`tokenize_split`)."""
    report.eval_rows = len(rows.eval.rows) if rows.eval is not None else 0  # for a message; counted at last
    train, train_hit = tokenize_split("train", rows.train, tokenizer, settings, eos_token_id, cfg, report)
    held_out, eval_hit = (
        tokenize_split("eval", rows.eval, tokenizer, settings, eos_token_id, cfg, report)
        if rows.eval is not None
        else (None, True)
    )
    return TokenizedSplits(train, held_out, train_hit and eval_hit)


def tokenize_split(
    name: str,
    part: Normalized | ArrowRows,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    eos_token_id: int,
    cfg: DataConfig,
    report: DataReport,
) -> tuple[datasets.Dataset, bool]:
    """Stage 5: tokenize one split (train, eval or retain; or load it from the cache), settle the rows
    that tokenization flagged (`rows.settle`), count truncations, and drop the metadata columns.

    Returns:
        The split's dataset and whether it was a cache hit.

    Raises:
        DataError: no usable row is left.
    """
    dataset, hit = None, True
    if part.rows:
        tokenized, hit = tokenize_rows(
            part.canonical() if isinstance(part, ArrowRows) else part.rows,
            tokenizer,
            settings,
            eos_token_id=eos_token_id,
            cache_dir=cfg.cache_dir,
            num_proc=cfg.num_proc,
            desc=f"Tokenizing {name}",
        )
        meta = tokenized.select_columns(list(META_COLUMNS)).to_dict()
        reasons = meta[BAD_REASON]
        bad = [
            BadRow(part.refs[i], reason, meta[BAD_DETAIL][i]) for i, reason in enumerate(reasons) if reason
        ]
        bad = list(dict.fromkeys(bad))  # the two examples of an unpaired pair fail together: one bad row
        settle(Normalized(bad=bad), cfg, report)
        good = [i for i, reason in enumerate(reasons) if not reason]
        report.prompts_truncated += sum(meta[PROMPT_TRUNCATED])  # bad rows carry False / 0
        report.responses_truncated += sum(meta[RESPONSES_TRUNCATED])
        if len(good) < len(tokenized):
            tokenized = tokenized.select(good)
        dataset = tokenized.remove_columns(list(META_COLUMNS))
    if dataset is None or len(dataset) == 0:
        source = {"eval": cfg.eval_path or cfg.path, "retain": cfg.retain}.get(name, cfg.path)
        raise nothing_left(source, name, report)
    return dataset, hit


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id appended to every response."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "")
        raise DataError(
            f"tokenizer {name!r} has no eos_token_id, which ends every response. Fix: set "
            "tokenizer.eos_token, or use a tokenizer that has one"
        )
    return int(eos)
