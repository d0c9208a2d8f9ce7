"""The preference-data pipeline as one line of stages, from `DataConfig` to tokenized datasets.

    check needs -> 1. read (`read`) -> 2. normalise (`normalise`) -> 3. settle bad rows (`rows`)
    -> 4. hold out eval (`split`) [-> swap or unpair pairs (`normalise`)]
    -> 5. tokenise (`tokenize`), 6. cache (`cache`), settling the rows it flags (`rows`)
    [-> mismatched responses: other rows' completions after each row's prompt (`mismatched`)]
    [-> pair with retain rows, read through the same stages] -> PreparedData(train, eval, report)

`build_datasets` is that line; each stage is its own module, and only this one calls them in turn.
From reading to tokenising, the rows live in Arrow files in a temporary work folder (memory-mapped
`datasets.Dataset`s, each stage a batched `Dataset.map` over `data.num_proc` processes), never as one
Python dict per row; the work folder is made in `data.cache_dir` (on disk beside the cache) and removed
at the end: the tokenised splits are read back from the cache (`cache`), so nothing returned points
into it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from datasets.utils import logging as datasets_logging

from alignlab.data.cache import cache_root
from alignlab.data.mismatched import with_mismatched
from alignlab.data.normalise import LABEL, PAIR, UNPAIRED, check_columns, normalise, reshape_pairs
from alignlab.data.read import read
from alignlab.data.retain import RETAIN, with_retain
from alignlab.data.rows import DataError, DataReport, settle
from alignlab.data.split import hold_out
from alignlab.data.tokenize import TokenizedSplits, TokenizeSettings, eos_id, tokenize_splits

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig

#: suffixes of the collated and tokenized columns, which field names must not end with.
TOKEN_SUFFIXES = ("_ids", "_attention_mask", "_labels")


@dataclass
class PreparedData:
    """The output of `build_datasets`.

    Attributes:
        train: columns ``prompt_ids``, ``<r>_ids`` for each response name, ``retain_prompt_ids``
            with ``retain_ids`` for the retain response (its own prompt), ``<r>_prompt_ids`` for each
            response with its own prompt (`Needs.own_prompts`), ``<new>_ids`` for each
            mismatched response (another row's completion after this row's prompt), and one scalar column per
            field (``label``: bool; other fields bool, int64 or float64).
        eval: the same columns, or None when there is no eval split.
        report: counts of what was read, kept, skipped and truncated.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport


def check_data_needs(
    cfg: DataConfig,
    responses: Sequence[str],
    fields: Sequence[str] = (),
    mismatched: Sequence[tuple[str, str]] = (),
    own_prompts: Sequence[str] = (),
) -> None:
    """Check that the data config can serve a loss's needs, without reading any file.

    Cheap enough to run before any model loads; `build_datasets` runs it too.

    Args:
        cfg: the data config.
        responses: `Needs.responses`.
        fields: `Needs.fields`.
        mismatched: `Needs.mismatched`.
        own_prompts: `Needs.own_prompts`.

    Raises:
        DataError: bad response or field names, or mismatched pairs that are not (a response, a
            response read from the data); a retain response without `data.retain`, or
            `data.retain` for a loss without a retain response; `data.swap_pairs` for a loss whose
            responses are not pairs; a combination the pipeline does not serve; `data.columns` /
            `data.format` that cannot work for these responses.
    """
    _check_needs(cfg, responses, fields, mismatched, own_prompts)


def _check_needs(
    cfg: DataConfig,
    responses: Sequence[str],
    fields: Sequence[str],
    mismatched: Sequence[tuple[str, str]] = (),
    own_prompts: Sequence[str] = (),
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`check_data_needs`, returning the responses read from the data (the mismatched ones left out)
    and the fields as tuples."""
    responses = _check_responses(responses)
    fields = _check_fields(fields, responses)
    built = _check_mismatched(mismatched, responses)
    responses = tuple(name for name in responses if name not in built)
    main = tuple(name for name in responses if name != RETAIN)
    _check_own_prompts(cfg, tuple(own_prompts), main, responses, fields)
    if RETAIN in responses:
        if main != UNPAIRED:
            raise DataError(
                f"the pipeline serves a retain response only with the single response "
                f"'completion' (responses ('completion', 'retain'): each {{prompt, completion}} "
                f"row of data.path is paired with a row of data.retain), but the loss needs "
                f"{responses}"
            )
        if not cfg.retain:
            raise DataError(
                "this loss needs a retain set: set data.retain=<path> (e.g. the TOFU retain90.json)"
            )
    elif cfg.retain:
        raise DataError(
            f"data.retain={cfg.retain!r} is set, but this loss does not use a retain set (it "
            f"needs the responses {responses}). Fix: remove data.retain, or pick a loss variant "
            "that trains on a retain set"
        )
    if cfg.swap_pairs and responses != PAIR:
        raise DataError(
            f"data.swap_pairs=true swaps chosen and rejected of pairs, but this loss needs the "
            f"responses {responses}, not {PAIR}. Fix: remove data.swap_pairs"
        )
    if LABEL in fields and responses != UNPAIRED:
        raise DataError(
            f"the field 'label' (unpaired binary feedback) is served only with the single "
            f"response 'completion', but the loss needs the responses {responses}"
        )
    check_columns(cfg.format, cfg.columns or {}, main, fields, tuple(own_prompts))
    return responses, fields


def build_datasets(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    responses: Sequence[str] = ("chosen", "rejected"),
    seed: int = 42,
    fields: Sequence[str] = (),
    mismatched: Sequence[tuple[str, str]] = (),
    own_prompts: Sequence[str] = (),
) -> PreparedData:
    """Read, normalise, settle, hold out and tokenise (cached) the preference data described by `cfg`.

    Args:
        cfg: the data config (`alignlab.config.DataConfig`).
        tokenizer: the model's tokenizer; must have an EOS token (and a chat template for
            conversational data).
        responses: the response columns the loss needs (`Needs.responses`).
        seed: shuffles the held-out eval rows when there is no `cfg.eval_path`, and the retain
            rows.
        fields: the scalar columns the loss needs (`Needs.fields`), e.g. ("label",).
        mismatched: (new, source) responses built from other rows' completions (`Needs.mismatched`);
            the pairing is `alignlab.data.mismatched.partners`, seeded with `seed`.
        own_prompts: responses read with a prompt of their own, ``<response>_prompt`` (`Needs.own_prompts`).

    Returns:
        Train and eval datasets with a report.

    Raises:
        DataError: any problem with the data or its config; with ``on_bad_row=error``, the first
            bad row.
    """
    responses, fields = _check_needs(cfg, responses, fields, mismatched, own_prompts)
    main = tuple(name for name in responses if name != RETAIN)
    own_prompts = tuple(own_prompts)
    eos = eos_id(tokenizer)
    report = DataReport(
        source=cfg.path,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        responses_per_example=len(main),
    )
    root = cache_root(cfg.cache_dir)  # the work folder beside the cache: on disk, not in a RAM /tmp
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=root) as work:  # the run's Arrow files
        sources = read(cfg, report, work)  # 1. read
        size = len(sources.train) + (len(sources.eval) if sources.eval is not None else 0)
        with _progress_bars(size):
            plan, rows = normalise(sources, cfg, tokenizer, main, fields, report, own_prompts)  # 2. normalise
            del sources  # unmap the raw records: their pages no longer count in this process's memory
            rows = rows.map(partial(settle, cfg=cfg, report=report))  # 3. settle bad rows
            rows = hold_out(rows, cfg, seed, report)  # 4. hold out
            rows = reshape_pairs(rows, plan, cfg, report)  #    swap or unpair pairs
            settings = TokenizeSettings.of(cfg, plan.kind, plan.chat, main, fields, rows.parts(), own_prompts)
            data = tokenize_splits(rows, tokenizer, settings, eos, cfg, report)  # 5. tokenise, 6. cache
    data = with_mismatched(data, mismatched, cfg.max_length, seed)
    if RETAIN in responses:
        data = with_retain(data, cfg, tokenizer, settings, eos, seed, report)
    return _counted(data, fields, report)


#: files of fewer rows than this take seconds to prepare: no progress bars for them
PROGRESS_ROWS = 20_000


@contextmanager
def _progress_bars(rows: int):
    """`datasets`' progress bars only for data of `PROGRESS_ROWS` rows or more."""
    shown = datasets_logging.is_progress_bar_enabled()
    if shown and rows < PROGRESS_ROWS:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _counted(data: TokenizedSplits, fields: tuple[str, ...], report: DataReport) -> PreparedData:
    """The datasets, with the rows kept (and labels) counted in the report."""
    report.train_rows = len(data.train)
    report.eval_rows = len(data.eval) if data.eval is not None else 0
    report.cache_hit = data.cache_hit
    if LABEL in fields:
        labels = [label for part in (data.train, data.eval) if part is not None for label in part[LABEL]]
        report.desirable_rows = sum(labels)
        report.undesirable_rows = len(labels) - report.desirable_rows
    return PreparedData(data.train, data.eval, report)


def _check_responses(responses: Sequence[str]) -> tuple[str, ...]:
    """Response names must be distinct, non-empty and not `prompt`."""
    responses = tuple(responses)
    if not responses or len(set(responses)) != len(responses) or "prompt" in responses or "" in responses:
        raise DataError(f"responses must be distinct non-empty names other than 'prompt', got {responses}")
    return responses


def _check_mismatched(mismatched: Sequence[tuple[str, str]], responses: tuple[str, ...]) -> tuple[str, ...]:
    """Each (new, source) pair names a response of `responses` built from a response read from the
    data (not itself built, not the retain response); returns the built names."""
    pairs = [tuple(pair) for pair in mismatched]
    built = tuple(new for new, *_ in pairs)
    for pair in pairs:
        ok = len(pair) == 2 and pair[0] in responses and pair[0] != RETAIN
        if not ok or pair[1] not in responses or pair[1] in built or pair[1] == RETAIN:
            raise DataError(
                f"mismatched responses must be (new, source) pairs of the responses {responses}, the "
                f"source read from the data (not {RETAIN!r}, not another new one), got {tuple(pairs)}"
            )
    if len(set(built)) != len(built):
        raise DataError(f"mismatched responses must be distinct, got {tuple(pairs)}")
    return built


def _check_own_prompts(
    cfg: DataConfig,
    own_prompts: tuple[str, ...],
    main: tuple[str, ...],
    responses: tuple[str, ...],
    fields: tuple[str, ...],
) -> None:
    """Responses with their own prompts are distinct responses read from the data, and rows with them
    are neither unpaired nor swapped (their prompts would not follow)."""
    if not own_prompts:
        return
    if len(set(own_prompts)) != len(own_prompts) or not set(own_prompts) <= set(main) or RETAIN in responses:
        raise DataError(
            f"responses with their own prompts must be distinct responses {main} read from the data "
            f"(not {RETAIN!r}, not built by the pipeline), got {own_prompts}"
        )
    if LABEL in fields or cfg.swap_pairs:
        what = "data.swap_pairs=true" if cfg.swap_pairs else "unpaired feedback (the field 'label')"
        raise DataError(
            f"{what} is not served with responses that have their own prompts ({', '.join(own_prompts)}). "
            "Fix: remove data.swap_pairs, or use a loss whose responses share the row's prompt"
        )


def _check_fields(fields: Sequence[str], responses: tuple[str, ...]) -> tuple[str, ...]:
    """Field names must be distinct and clash with no prompt, response or token column."""
    fields = tuple(fields)
    for name in fields:
        if (
            not isinstance(name, str)
            or not name
            or name.startswith("_")
            or name in ("prompt", *responses)
            or name.endswith(TOKEN_SUFFIXES)
        ):
            raise DataError(
                f"fields must be distinct names other than 'prompt', the responses {responses} "
                f"and token columns (*{', *'.join(TOKEN_SUFFIXES)}), got {fields}"
            )
    if len(set(fields)) != len(fields):
        raise DataError(f"fields must be distinct, got {fields}")
    return fields
