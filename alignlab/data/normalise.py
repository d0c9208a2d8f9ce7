"""Stage 2, normalise: from raw rows of any preference format to one canonical shape, ``{prompt: str,
<response>: str, ...}`` (plus one scalar per requested field, e.g. ``label: bool``).

`normalise` is the stage (the plan of the train source, applied to it and to a separate eval source);
`reshape_pairs` runs after the hold-out, to swap or unpair the canonical pairs.

`plan_format` decides once per dataset how its rows are read (the `Plan`); `normalize` applies
the plan to every row and sorts rows into usable ones and `BadRow`s. Kinds of plan:

* ``explicit`` — ``{prompt, chosen, rejected}`` strings.
* ``hh`` — Anthropic HH-RLHF ``{chosen, rejected}`` transcripts; the prompt is the chosen
  transcript up to and including its last ``"\\n\\nAssistant:"``.
* ``pairwise`` — judgements ``{prompt, response_a, response_b, preference}`` (preference 1: a wins,
  2: b wins, anything else: a tie, which is a bad row), e.g. AlpacaEval annotations.
* ``conversational`` — ``{role, content}`` message lists, with an explicit ``prompt`` list or an
  implicit one (the leading messages the responses share), rendered with the chat template.
* ``sharegpt`` — ``{conversations: [{from, value}], chosen: {from, value}, rejected: {...}}``, as in
  LLaMA-Factory, rendered with the chat template.
* ``messages`` — one ``{role, content}`` conversation per row whose last message is the assistant's
  completion, the earlier ones its prompt (LLaMA-Factory's KTO data); only for the single response
  ``completion``.

Unpaired feedback (responses ``("completion",)`` with the field ``label``) is read from rows
``{prompt, completion, label}`` (strings or message lists) or ``{messages, label}``; paired data of
any kind is read as pairs and then unpaired (`unpair`): each pair gives ``(prompt, chosen,
label=True)`` and ``(prompt, rejected, label=False)``. `Plan.unpair` says so.

With ``data.swap_pairs`` every canonical pair has its chosen and rejected swapped (`swap`).

`data.columns` (canonical field -> source column) renames fields for any kind; it is also how the
pairwise kind is selected. Conversational rows are rendered to strings here, so the tokenizer
only ever sees strings (`Plan.chat` tells it not to add special tokens to a rendered prompt).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from alignlab.data.rows import (
    BAD_DETAIL,
    BAD_REASON,
    RAW,
    ROW,
    SOURCE,
    ArrowRows,
    BadRow,
    DataError,
    DataReport,
    Normalized,
    Reason,
    Record,
    RowRef,
    raw_row,
)
from alignlab.data.split import Splits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from alignlab.config import DataConfig
    from alignlab.data.read import ArrowRecords, Sources

KINDS = ("explicit", "hh", "pairwise", "conversational", "sharegpt", "messages")
CHAT_KINDS = ("conversational", "sharegpt", "messages")
PAIRWISE_FIELDS = ("prompt", "response_a", "response_b", "preference")
#: the data.columns keys that select the pairwise kind.
PAIRWISE_KEYS = ("response_a", "response_b", "preference")
PAIR = ("chosen", "rejected")
#: the single response of unpaired feedback and of forget sets.
UNPAIRED = ("completion",)
#: the field of unpaired feedback: True = desirable.
LABEL = "label"
HH_ASSISTANT = "\n\nAssistant:"
#: ShareGPT speaker -> chat-template role.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class RowProblem(Exception):
    """Raised while normalizing one row; becomes a `BadRow` for that row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Plan:
    """How the rows of one dataset are read.

    Attributes:
        kind: one of `KINDS`.
        responses: the response names to produce, e.g. ("chosen", "rejected").
        columns: canonical field -> source column, for renamed fields only.
        fields: scalar fields read from every row besides the texts, e.g. ("label",).
        unpair: the rows are pairs (`responses` is ("chosen", "rejected")) to be unpaired into
            labelled single completions after reading (see `unpair`).
        own_prompts: responses with a prompt of their own, read from ``<response>_prompt``
            (`Needs.own_prompts`); explicit rows only.
    """

    kind: str
    responses: tuple[str, ...]
    columns: Mapping[str, str] = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    unpair: bool = False
    own_prompts: tuple[str, ...] = ()

    @property
    def chat(self) -> bool:
        """Whether rows are rendered with the chat template (so carry their own special tokens)."""
        return self.kind in CHAT_KINDS

    def source(self, name: str) -> str:
        """The source column that holds canonical field `name`."""
        return self.columns.get(name, name)

    def label(self, name: str) -> str:
        """How messages name a field: its source column, plus the canonical name if renamed."""
        column = self.source(name)
        return f"'{column}'" if column == name else f"'{column}' ({name})"

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt fields of an explicit row: ``prompt`` unless every response has its own, then
        ``<response>_prompt`` for each response that has one."""
        shared = ("prompt",) if set(self.responses) - set(self.own_prompts) else ()
        return (*shared, *(prompt_field(name) for name in self.own_prompts))

    @property
    def required(self) -> tuple[str, ...]:
        """Canonical fields every dataset of this kind must have somewhere."""
        if self.kind == "pairwise":
            return (*PAIRWISE_FIELDS, *self.fields)
        if self.kind == "explicit":
            return (*self.prompts, *self.responses, *self.fields)
        if self.kind == "sharegpt":
            return ("conversations", *self.responses, *self.fields)
        if self.kind == "messages":
            return ("messages", *self.fields)
        return (*self.responses, *self.fields)


def prompt_field(response: str) -> str:
    """The column of a response's own prompt (`Needs.own_prompts`), e.g. ``chosen_prompt``."""
    return f"{response}_prompt"


def normalise(
    sources: Sources,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    responses: tuple[str, ...],
    fields: tuple[str, ...],
    report: DataReport,
    own_prompts: tuple[str, ...] = (),
) -> tuple[Plan, Splits]:
    """The format plan of the train source (`plan_of`), applied to its records and to the separate eval
    source's, if any (`normalize_arrow`, in `data.num_proc` processes): usable canonical rows and bad
    rows (not settled yet: `rows.settle`)."""
    plan = plan_of(
        sources.train.sample,
        cfg.format,
        cfg.columns or {},
        responses,
        fields,
        tokenizer,
        cfg.path,
        "",
        own_prompts,
    )
    report.format = plan.kind
    held_out = (
        normalize_arrow(sources.eval, plan, tokenizer, cfg.num_proc) if sources.eval is not None else None
    )
    return plan, Splits(normalize_arrow(sources.train, plan, tokenizer, cfg.num_proc), held_out)


def plan_of(
    records: Sequence[Record],
    fmt: str,
    columns: Mapping[str, str],
    responses: tuple[str, ...],
    fields: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    what: str = "",
    own_prompts: tuple[str, ...] = (),
) -> Plan:
    """`plan_format` from the readable rows of `records` (`what`: how messages name the source), and a chat
    template when the rows need one."""
    raw_rows = [row for _, row in records if isinstance(row, dict)]
    if not raw_rows:  # every record is unreadable: say why, rather than "no columns"
        raise DataError(f"{records[0][1].message()} (no row of {what or source} could be read)")
    plan = plan_format(fmt, columns, raw_rows, responses, source, fields, own_prompts)
    if plan.chat:
        require_chat_template(tokenizer)
    return plan


def reshape_pairs(splits: Splits, plan: Plan, cfg: DataConfig, report: DataReport) -> Splits:
    """After the hold-out (so that every setting holds out the same pairs): swap the pairs
    (`data.swap_pairs`), or unpair them when the loss needs labelled single completions (`Plan.unpair`)."""
    pairs = sum(len(part.rows) for part in splits.parts())
    if cfg.swap_pairs:
        report.pairs_swapped = pairs
        splits = splits.map(swap)
    if plan.unpair:
        report.unpaired_from_pairs = True
        report.pairs_unpaired = pairs
        splits = splits.map(unpair)
    return splits


def unpairs(responses: tuple[str, ...], fields: tuple[str, ...]) -> bool:
    """Whether paired data is unpaired for these needs: one labelled completion per example."""
    return tuple(responses) == UNPAIRED and LABEL in fields


def check_columns(
    fmt: str,
    columns: Mapping[str, str],
    responses: tuple[str, ...],
    fields: tuple[str, ...] = (),
    own_prompts: tuple[str, ...] = (),
) -> None:
    """The checks of `data.format` and `data.columns` that need no data (see `plan_format`).

    Raises:
        DataError: `data.columns` names an unknown field or maps pairwise fields for a format or
            responses that cannot use them, or data.format=columns comes without data.columns.
    """
    _check_column_map(columns, responses, fields, own_prompts)
    if own_prompts and fmt not in ("auto", "explicit", "columns"):
        raise DataError(
            f"responses with their own prompts ({', '.join(map(prompt_field, own_prompts))}) are read "
            f"from explicit string rows, not data.format={fmt}. Fix: set data.format=explicit (or auto)"
        )
    if set(columns) & set(PAIRWISE_KEYS):
        _check_pairwise(fmt, responses, fields)
    elif fmt == "columns" and not columns:
        raise DataError(
            "data.format=columns needs data.columns, e.g. data.columns={prompt: instruction, "
            "chosen: good, rejected: bad}"
        )


def plan_format(
    fmt: str,
    columns: Mapping[str, str],
    rows: Sequence[Mapping[str, Any]],
    responses: tuple[str, ...],
    label: str,
    fields: tuple[str, ...] = (),
    own_prompts: tuple[str, ...] = (),
) -> Plan:
    """Decide how to read a dataset, and check that its required columns exist.

    With responses ("completion",) and the field "label", rows without a completion (or messages)
    column but with chosen/rejected pairs of any kind are planned as pairs with `Plan.unpair` set.

    Args:
        fmt: `data.format`: auto | explicit | conversational | hh | columns.
        columns: `data.columns`, canonical field -> source column.
        rows: the dataset's raw rows (bad records left out).
        responses: the response names to produce.
        label: the data source, for messages.
        fields: the scalar fields to read from every row.
        own_prompts: responses with a prompt of their own (`Needs.own_prompts`): explicit rows.

    Raises:
        DataError: `data.columns` names an unknown field, no format matches the columns, or a
            required column is absent from every row.
    """
    columns, fields = dict(columns), tuple(fields)
    check_columns(fmt, columns, responses, fields, own_prompts)
    found = {key for row in rows for key in row}
    plan = Plan(fmt, responses, columns, fields, own_prompts=tuple(own_prompts))  # the kind is settled below
    if own_prompts:
        _check_strings(plan, rows, label)
        plan = replace(plan, kind="explicit")
        _check_required(plan, found, label)
        return plan
    if unpairs(responses, fields) and _looks_paired(plan, found):
        pair_columns = {
            key: value for key, value in columns.items() if key not in (LABEL, *UNPAIRED, "messages")
        }
        other_fields = tuple(name for name in fields if name != LABEL)
        return replace(plan_format(fmt, pair_columns, rows, PAIR, label, other_fields), unpair=True)
    if set(columns) & set(PAIRWISE_KEYS):
        kind = "pairwise"
    elif fmt in ("auto", "columns"):
        kind = _detect(plan, found, rows, label)
    elif fmt == "conversational" and _is_sharegpt(plan, found):
        kind = "sharegpt"
    elif fmt == "conversational" and _is_messages(plan, found):
        kind = "messages"
    else:
        kind = fmt
    plan = replace(plan, kind=kind)
    _check_required(plan, found, label)
    return plan


def _looks_paired(plan: Plan, found: set[str]) -> bool:
    """Rows to unpair: pairwise judgements, or chosen/rejected columns and no completion column."""
    if set(plan.columns) & set(PAIRWISE_KEYS):
        return True
    if plan.source("completion") in found or plan.source("messages") in found:
        return False
    return any(plan.source(name) in found for name in PAIR)


def _check_column_map(
    columns: Mapping[str, str],
    responses: tuple[str, ...],
    fields: tuple[str, ...],
    own_prompts: tuple[str, ...] = (),
) -> None:
    """Reject `data.columns` keys that no format reads."""
    allowed = ("prompt", *responses, *fields, "conversations", "response_a", "response_b", "preference")
    if own_prompts:  # explicit rows only: no pairwise judgements, one prompt per response
        allowed = ("prompt", *responses, *map(prompt_field, own_prompts), *fields)
    if tuple(responses) == UNPAIRED:
        allowed += ("messages",)
    if unpairs(responses, fields):
        allowed += PAIR
    for key, value in columns.items():
        if key not in allowed:
            raise DataError(
                f"data.columns has unknown field {key!r}. Fix: use fields among "
                f"{', '.join(allowed)} (canonical field -> your column)"
            )
        if not isinstance(value, str):
            raise DataError(f"data.columns.{key} must be a column name, got {value!r}")


def _check_pairwise(fmt: str, responses: tuple[str, ...], fields: tuple[str, ...]) -> None:
    """A pairwise judgement yields exactly one chosen and one rejected response (or their unpairing)."""
    if fmt not in ("auto", "columns"):
        raise DataError(
            f"data.columns maps pairwise judgement fields, which need data.format=columns "
            f"(or auto), not {fmt}"
        )
    if tuple(responses) != PAIR and not unpairs(responses, fields):
        raise DataError(
            f"pairwise judgements give only chosen/rejected pairs, but {responses} are "
            "needed. Fix: use a dataset with those responses"
        )


def _check_strings(plan: Plan, rows: Sequence[Mapping[str, Any]], label: str) -> None:
    """Rows with a prompt per response are explicit strings: refuse message lists up front."""
    for name in (*plan.prompts, *plan.responses):
        value = next((row[plan.source(name)] for row in rows if row.get(plan.source(name)) is not None), None)
        if isinstance(value, (list, dict)):
            raise DataError(
                f"{label}: field {plan.label(name)} holds messages, but responses with their own prompts "
                "are read from explicit string rows {"
                + ", ".join(f"{key}: ..." for key in (*plan.prompts, *plan.responses))
                + "}. Fix: render the conversations to strings first"
            )


def _is_sharegpt(plan: Plan, found: set[str]) -> bool:
    """ShareGPT rows hold their prompt in `conversations` and have no prompt column."""
    return plan.source("conversations") in found and plan.source("prompt") not in found


def _is_messages(plan: Plan, found: set[str]) -> bool:
    """One conversation per row (`messages`) whose last message is the single response."""
    return (
        plan.responses == UNPAIRED
        and plan.source("messages") in found
        and plan.source(plan.responses[0]) not in found
    )


def _detect(plan: Plan, found: set[str], rows: Sequence[Mapping[str, Any]], label: str) -> str:
    """The kind of a dataset from its columns and the type of its first response present."""
    if _is_sharegpt(plan, found):
        return "sharegpt"
    if _is_messages(plan, found):
        return "messages"
    prompt = plan.source("prompt")
    # the first response present decides (a response absent from every row is reported later)
    value = next(
        (
            row[column]
            for column in map(plan.source, plan.responses)
            for row in rows
            if row.get(column) is not None
        ),
        None,
    )
    if isinstance(value, list):
        return "conversational"
    if isinstance(value, str):  # a prompt mapped in data.columns means explicit rows, missing or not
        return "explicit" if prompt in found or "prompt" in plan.columns else "hh"
    if value is None and prompt in found:  # no response column at all: say which one is missing
        return "explicit"
    example = ", ".join(f"{name}: ..." for name in ("prompt", *plan.responses))
    raise DataError(
        f"{label}: cannot tell the data format from the columns found ({_names(found)}). Fix: "
        "set data.format=explicit|conversational|hh, or map your columns with "
        f"data.columns={{{example}}}"
    )


def _check_required(plan: Plan, found: set[str], label: str) -> None:
    """Every required column must appear in at least one row."""
    for name in plan.required:
        column = plan.source(name)
        if column not in found:
            hint = ""
            if unpairs(plan.responses, plan.fields):
                hint = (
                    " (unpaired feedback is read from {prompt, completion, label} or {messages, label} "
                    "rows, or unpaired from chosen/rejected pairs)"
                )
            raise DataError(
                f"{label}: column {column!r} ({plan.kind} format) is in no row; columns found: "
                f"{_names(found)}. Fix: map it with data.columns={{{name}: <your column>}} or "
                f"set data.format{hint}"
            )


def _names(found: Iterable[str]) -> str:
    return ", ".join(sorted(found)) or "none"


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Conversational data is rendered with the tokenizer's chat template, so it needs one.

    Raises:
        DataError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"conversational data needs a chat template, and tokenizer {name!r} has none. Fix: "
            "set model.chat_template='...' (a Jinja template) or use a tokenizer that has one"
        )


def normalize(records: Iterable[Record], plan: Plan, tokenizer: PreTrainedTokenizerBase) -> Normalized:
    """Apply `plan` to every record.

    Args:
        records: the source's records.
        plan: from `plan_format`.
        tokenizer: renders conversational rows with its chat template.

    Returns:
        The usable canonical rows and the bad ones, in source order.
    """
    out = Normalized()
    for ref, row in records:
        if isinstance(row, BadRow):
            out.bad.append(row)
            continue
        try:
            canonical = canonical_row(row, plan, tokenizer)
        except RowProblem as problem:
            out.bad.append(BadRow(ref, problem.reason, problem.detail))
            continue
        out.rows.append(canonical)
        out.refs.append(ref)
    return out


def canonical_row(row: Mapping[str, Any], plan: Plan, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """One raw row read by `plan`: ``{prompt, <response>..., <field>...}``; a `RowProblem` if it is bad."""
    canonical = _READERS[plan.kind](row, plan, tokenizer)
    _check_responses(canonical, plan)
    canonical.update({name: _field(row, plan, name) for name in plan.fields})
    return canonical


def canonical_texts(plan: Plan) -> tuple[str, ...]:
    """The string columns of the canonical rows `plan` gives (`canonical_row`), fields aside: the
    prompt, the responses and the responses' own prompts (`Needs.own_prompts`)."""
    return ("prompt", *plan.responses, *map(prompt_field, plan.own_prompts))


def normalize_arrow(
    records: ArrowRecords, plan: Plan, tokenizer: PreTrainedTokenizerBase, num_proc: int = 1
) -> ArrowRows:
    """`normalize` on Arrow: every record read by `plan` in a batched `Dataset.map` (`num_proc` worker
    processes), written next to the records' file; fields are kept as JSON text until
    `tokenize.field_types` types them over all splits.

    Returns:
        The usable canonical rows (memory-mapped) and the bad ones, in source order.
    """
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Features, Value

    texts = canonical_texts(plan)
    features = Features(
        {
            SOURCE: Value("int32"),
            ROW: Value("int64"),
            **{name: Value("string") for name in (*texts, *plan.fields, BAD_REASON, BAD_DETAIL)},
        }
    )
    mapped = records.dataset.map(
        _normalize_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=records.dataset.column_names,
        features=features,
        new_fingerprint=uuid.uuid4().hex,  # a run's own intermediate file, never reused
        fn_kwargs={"plan": plan, "tokenizer": tokenizer},
        desc="Normalising",
    )
    bad_mask = pc.not_equal(mapped.data.column(BAD_REASON), "").to_numpy(zero_copy_only=False)
    bad = []
    if bad_mask.any():
        found = mapped.select(np.flatnonzero(bad_mask)).select_columns([SOURCE, ROW, BAD_REASON, BAD_DETAIL])
        bad = [
            BadRow(RowRef(records.labels[source], index), reason, detail)
            for source, index, reason, detail in zip(*found.to_dict().values(), strict=True)
        ]
    rows = mapped.remove_columns([BAD_REASON, BAD_DETAIL])
    if bad:
        rows = rows.select(np.flatnonzero(~bad_mask))
    return ArrowRows(rows, records.labels, bad)


def _normalize_batch(
    batch: dict[str, list[Any]], plan: Plan, tokenizer: PreTrainedTokenizerBase
) -> dict[str, list[Any]]:
    """`Dataset.map` function (batched) of `normalize_arrow`: records -> canonical columns, a bad row
    marked by its reason and detail (its texts "")."""
    texts = canonical_texts(plan)
    out: dict[str, list[Any]] = {
        name: [] for name in (SOURCE, ROW, *texts, *plan.fields, BAD_REASON, BAD_DETAIL)
    }
    for i, raw in enumerate(batch[RAW]):
        reason, detail, canonical = batch[BAD_REASON][i], batch[BAD_DETAIL][i], {}
        if not reason:
            try:
                canonical = canonical_row(raw_row(raw), plan, tokenizer)
            except RowProblem as problem:
                reason, detail = problem.reason, problem.detail
            extra = set(canonical) - {*texts, *plan.fields}
            if extra:  # a column the Arrow schema lacks: never drop it silently
                raise AssertionError(
                    f"canonical_texts() lacks the columns {sorted(extra)} of {plan.kind} rows"
                )
        out[SOURCE].append(batch[SOURCE][i])
        out[ROW].append(batch[ROW][i])
        for name in texts:
            out[name].append(canonical.get(name, ""))
        for name in plan.fields:
            out[name].append(json.dumps(canonical[name]) if canonical else "")
        out[BAD_REASON].append(reason)
        out[BAD_DETAIL].append(detail)
    return out


def unpair(rows: Normalized) -> Normalized:
    """Unpair canonical pairs: each ``{prompt, chosen, rejected, ...}`` becomes two examples.

    ``{prompt, completion: chosen, label: True, ...}`` then ``{prompt, completion: rejected,
    label: False, ...}``, both with the pair's row reference; other fields are copied to both.
    """
    if isinstance(rows, ArrowRows):
        return _unpair_arrow(rows)
    out = Normalized(bad=list(rows.bad))
    for row, ref in zip(rows.rows, rows.refs, strict=True):
        other = {key: value for key, value in row.items() if key not in ("prompt", *PAIR)}
        for name, label in zip(PAIR, (True, False), strict=True):
            out.rows.append({"prompt": row["prompt"], UNPAIRED[0]: row[name], **other, LABEL: label})
            out.refs.append(ref)
    return out


def swap(rows: Normalized) -> Normalized:
    """Swap chosen and rejected in every canonical pair (``data.swap_pairs``).

    A per-response field travels with its response: ``<x>_chosen`` and ``<x>_rejected`` (e.g.
    MODPO's margin scores) are swapped too when a row has both.
    """
    if isinstance(rows, ArrowRows):
        columns = rows.rows.column_names
        pairs = {key: key.removesuffix(PAIR[0]) + PAIR[1] for key in columns if key.endswith(PAIR[0])}
        pairs = {key: partner for key, partner in pairs.items() if partner in columns}
        swapped = rows.rows.rename_columns({**pairs, **{partner: key for key, partner in pairs.items()}})
        return ArrowRows(swapped, rows.labels, list(rows.bad))
    out = Normalized(refs=list(rows.refs), bad=list(rows.bad))
    for row in rows.rows:
        swapped = dict(row)
        for key in row:
            partner = key.removesuffix(PAIR[0]) + PAIR[1]
            if key.endswith(PAIR[0]) and partner in row:
                swapped[key], swapped[partner] = row[partner], row[key]
        out.rows.append(swapped)
    return out


def _unpair_arrow(rows: ArrowRows) -> ArrowRows:
    """`unpair` on Arrow: the label as JSON text, like every field before `tokenize.field_types`."""
    from datasets import Features, Value

    other = [name for name in rows.rows.column_names if name not in ("prompt", *PAIR)]
    features = Features(
        {
            "prompt": Value("string"),
            UNPAIRED[0]: Value("string"),
            **{name: rows.rows.features[name] for name in other},
            LABEL: Value("string"),
        }
    )

    def split(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in features}
        for i, prompt in enumerate(batch["prompt"]):
            for name, label in zip(PAIR, ("true", "false"), strict=True):
                out["prompt"].append(prompt)
                out[UNPAIRED[0]].append(batch[name][i])
                for key in other:
                    out[key].append(batch[key][i])
                out[LABEL].append(label)
        return out

    unpaired = rows.rows.map(
        split,
        batched=True,
        remove_columns=rows.rows.column_names,
        features=features,
        new_fingerprint=uuid.uuid4().hex,
        desc="Unpairing",
    )
    return ArrowRows(unpaired, rows.labels, list(rows.bad))


def _check_responses(row: Mapping[str, str], plan: Plan) -> None:
    """Shared checks on a canonical row: nothing blank, no two responses alike (under the same prompt:
    one answer to two different instructions is a valid joint pair)."""
    for name in ("prompt", *plan.responses, *map(prompt_field, plan.own_prompts)):
        if not row[name].strip():
            raise RowProblem(Reason.EMPTY, f"the {name} is empty or whitespace")

    def prompt_of(name: str) -> str:
        return row[prompt_field(name)] if name in plan.own_prompts else row["prompt"]

    for i, first in enumerate(plan.responses):
        for second in plan.responses[i + 1 :]:
            if row[first] == row[second] and prompt_of(first) == prompt_of(second):
                raise RowProblem(Reason.IDENTICAL, f"{first} and {second} are identical")


# --- field access ---------------------------------------------------------------------------------


def _value(row: Mapping[str, Any], plan: Plan, name: str) -> Any:
    """The value of canonical field `name`; a missing or null field is a `RowProblem`."""
    value = row.get(plan.source(name))
    if value is None:
        raise RowProblem(Reason.MISSING, f"field {plan.label(name)} is missing")
    return value


def _text(row: Mapping[str, Any], plan: Plan, name: str) -> str:
    """The non-blank string of canonical field `name`."""
    value = _value(row, plan, name)
    if not isinstance(value, str):
        raise RowProblem(
            Reason.NOT_A_STRING, f"field {plan.label(name)} is a {type(value).__name__}, expected a string"
        )
    if not value.strip():
        raise RowProblem(Reason.EMPTY, f"field {plan.label(name)} is empty or whitespace")
    return value


def _field(row: Mapping[str, Any], plan: Plan, name: str) -> bool | int | float:
    """Scalar field `name`: the label is a bool (true/false or 1/0), any other field a number."""
    value = _value(row, plan, name)
    if name == LABEL:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise RowProblem(
            Reason.BAD_LABEL, f"field {plan.label(name)} is {value!r}, not true or false (or 1 or 0)"
        )
    if isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise RowProblem(Reason.BAD_FIELD, f"field {plan.label(name)} is {value!r}, expected a number")


def _messages(
    row: Mapping[str, Any],
    plan: Plan,
    name: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    roles: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """Canonical field `name` as ``[{role, content}]`` messages (a single message is accepted).

    Args:
        row: the raw row.
        plan: the dataset's plan.
        name: the canonical field.
        role_key: the key that holds the speaker (ShareGPT: ``from``).
        content_key: the key that holds the text (ShareGPT: ``value``).
        roles: speaker -> role mapping; None keeps speakers as they are.
    """
    value = _value(row, plan, name)
    items = [value] if isinstance(value, dict) else value
    shape = f"{{{role_key}: str, {content_key}: str}}"
    if not isinstance(items, list):
        raise RowProblem(
            Reason.BAD_MESSAGES,
            f"field {plan.label(name)} is a {type(value).__name__}, expected a list of {shape} messages",
        )
    if not items:
        raise RowProblem(Reason.EMPTY, f"field {plan.label(name)} is an empty list")
    messages = []
    for i, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get(role_key), str)
            and isinstance(item.get(content_key), str)
        ):
            raise RowProblem(Reason.BAD_MESSAGES, f"{plan.label(name)}[{i}] is not a {shape} message")
        role = item[role_key] if roles is None else roles.get(item[role_key])
        if role is None:
            expected = ", ".join(roles or ())
            raise RowProblem(
                Reason.BAD_MESSAGES,
                f"{plan.label(name)}[{i}] has unknown speaker {item[role_key]!r}; expected one of {expected}",
            )
        messages.append({"role": role, "content": item[content_key]})
    return messages


# --- one reader per kind --------------------------------------------------------------------------


def _explicit(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    out = {name: _text(row, plan, name) for name in (*plan.prompts, *plan.responses)}
    if "prompt" not in out:  # every response has its own: the row's prompt is the first response's
        out["prompt"] = out[prompt_field(plan.responses[0])]
    return out


def _hh(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    """Split HH transcripts at the first response's last ``"\\n\\nAssistant:"``."""
    texts = {name: _text(row, plan, name) for name in plan.responses}
    first = plan.responses[0]
    cut = texts[first].rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowProblem(Reason.HH_MISMATCH, f"field {plan.label(first)} has no '\\n\\nAssistant:' turn")
    prompt = texts[first][: cut + len(HH_ASSISTANT)]
    for name, text in texts.items():
        if not text.startswith(prompt):
            raise RowProblem(
                Reason.HH_MISMATCH,
                f"field {plan.label(name)} does not start with the prompt "
                f"of {first} (its conversation up to the last "
                "'\\n\\nAssistant:')",
            )
    return {"prompt": prompt, **{name: text[len(prompt) :] for name, text in texts.items()}}


def _pairwise(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    """Order a judged pair by its preference (1: response_a wins, 2: response_b wins)."""
    prompt, a, b = (_text(row, plan, name) for name in ("prompt", "response_a", "response_b"))
    preference = _value(row, plan, "preference")
    if isinstance(preference, bool) or preference not in (1, 2):
        raise RowProblem(
            Reason.TIE,
            f"field {plan.label('preference')} is {preference!r}, not 1 "
            "(response_a wins) or 2 (response_b wins)",
        )
    chosen, rejected = (a, b) if preference == 1 else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversational(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    """Render message lists; without a prompt column, the prompt is the responses' shared prefix.

    A single response without a prompt column is one whole conversation, as in the messages kind.
    """
    conversations = {name: _messages(row, plan, name) for name in plan.responses}
    if row.get(plan.source("prompt")) is not None:
        prompt = _messages(row, plan, "prompt")
    elif len(plan.responses) == 1:
        name = plan.responses[0]
        prompt, last = _split_last(conversations[name], plan, name)
        conversations = {name: last}
    else:
        prompt, conversations = _shared_prefix(conversations, plan.responses)
    return render_chat(prompt, conversations, tokenizer)


def _messages_kind(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    """Render a ``{messages}`` row: the last message is the completion, the earlier ones its prompt."""
    prompt, last = _split_last(_messages(row, plan, "messages"), plan, "messages")
    return render_chat(prompt, {plan.responses[0]: last}, tokenizer)


def _split_last(
    messages: list[dict[str, str]], plan: Plan, name: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A conversation split into its prompt and its last message, which must be the assistant's."""
    if len(messages) < 2:
        raise RowProblem(
            Reason.BAD_MESSAGES,
            f"field {plan.label(name)} has a single message; expected "
            "prompt messages followed by the assistant's completion",
        )
    if messages[-1]["role"] != "assistant":
        raise RowProblem(
            Reason.BAD_MESSAGES,
            f"the last message of {plan.label(name)} is from "
            f"{messages[-1]['role']!r}, not the assistant's completion",
        )
    return messages[:-1], messages[-1:]


def _sharegpt(row: Mapping[str, Any], plan: Plan, tokenizer: Any) -> dict[str, str]:
    """Render a ShareGPT row: `conversations` is the prompt, each response one `{from, value}`."""
    sharegpt = {"role_key": "from", "content_key": "value", "roles": SHAREGPT_ROLES}
    prompt = _messages(row, plan, "conversations", **sharegpt)
    system = row.get("system")  # LLaMA-Factory's optional system column
    if isinstance(system, str) and system.strip():
        prompt = [{"role": "system", "content": system}, *prompt]
    responses = {name: _messages(row, plan, name, **sharegpt) for name in plan.responses}
    return render_chat(prompt, responses, tokenizer)


_READERS = {
    "explicit": _explicit,
    "hh": _hh,
    "pairwise": _pairwise,
    "conversational": _conversational,
    "sharegpt": _sharegpt,
    "messages": _messages_kind,
}


# --- chat rendering -------------------------------------------------------------------------------


def _shared_prefix(
    conversations: Mapping[str, list[dict[str, str]]], responses: tuple[str, ...]
) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Split full conversations into the prompt they share and what follows (`trl.extract_prompt`)."""
    from trl.data_utils import extract_prompt

    first = conversations[responses[0]]
    for name in responses[1:]:
        if conversations[name] == first:
            raise RowProblem(Reason.IDENTICAL, f"{responses[0]} and {name} are identical conversations")
    size = min(
        (
            len(extract_prompt({"chosen": first, "rejected": conversations[name]})["prompt"])
            for name in responses[1:]
        ),
        default=len(first) - 1,
    )
    if size == 0:
        raise RowProblem(
            Reason.EMPTY,
            "the prompt is empty: the conversations share no leading message "
            "(give a prompt column, or full conversations)",
        )
    return first[:size], {name: messages[size:] for name, messages in conversations.items()}


def render_chat(
    prompt: list[dict[str, str]],
    responses: Mapping[str, list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, str]:
    """Render a prompt and its responses to strings with the tokenizer's chat template.

    Each response is rendered as a prompt-completion pair by `trl.data_utils.apply_chat_template`
    (generation prompt after a user turn); the prompt is the longest rendered prompt common to all
    responses, and each response is the rest of its full rendering.

    Args:
        prompt: the prompt messages.
        responses: response name -> its messages.
        tokenizer: a tokenizer with a chat template.

    Returns:
        ``{prompt: str, <response>: str, ...}``.
    """
    from trl.data_utils import apply_chat_template

    for name, messages in {"prompt": prompt, **responses}.items():
        if not any(message["content"].strip() for message in messages):
            raise RowProblem(Reason.EMPTY, f"the {name} has no non-empty message")
    rendered = {}
    for name, messages in responses.items():
        try:
            rendered[name] = apply_chat_template({"prompt": prompt, "completion": messages}, tokenizer)
        except Exception as e:  # templates raise anything (jinja errors, raise_exception, bad roles)
            raise RowProblem(
                Reason.BAD_MESSAGES,
                f"the chat template rejected the {name} conversation "
                f"({type(e).__name__}: {str(e).strip()[:200]!r})",
            ) from e
    # Usually all rendered prompts are equal; a template that renders a prompt differently per
    # completion (see trl's DeepSeek-R1 note) leaves the differing tail to the responses.
    prompt_text = os.path.commonprefix([r["prompt"] for r in rendered.values()])
    full = {name: r["prompt"] + r["completion"] for name, r in rendered.items()}
    return {"prompt": prompt_text, **{name: text[len(prompt_text) :] for name, text in full.items()}}
