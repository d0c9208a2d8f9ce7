"""The preference-data pipeline: from `DataConfig` to tokenized train and eval datasets.

One line of stages (`pipeline.build_datasets`), each its own module:

    check needs -> 1. read (`read`) -> 2. normalise (`normalise`) -> 3. settle bad rows (`rows`)
    -> 4. hold out eval (`split`) [-> swap or unpair pairs (`normalise`)]
    -> 5. tokenise (`tokenize`), 6. cache (`cache`), settling the rows it flags (`rows`)
    [-> pair with retain rows] -> PreparedData(train, eval, report)

and batching for the trainer (`collate`).

Usage::

    needs = loss.needs
    check_data_needs(cfg.data, **needs.data_shape())  # cheap: no model loads
    prepared = build_datasets(cfg.data, tokenizer, seed=cfg.seed, **needs.data_shape())
    collator = PreferenceCollator(tokenizer.pad_token_id, responses=needs.responses, fields=needs.fields)

Data shapes served (`alignlab.losses.base.Needs`):

* responses sharing the row's prompt: pairs ``("chosen", "rejected")``, triples ``("gold",
  "chosen", "rejected")``, or one ``("completion",)`` (e.g. NPO's forget set);
* unpaired feedback, ``("completion",)`` with the field ``"label"``: labelled rows, or any pairs
  unpaired into ``(prompt, chosen, True)`` and ``(prompt, rejected, False)`` (reported in
  `DataReport.unpaired_from_pairs`);
* forget/retain, ``("completion", "retain")``: each row of `data.path` is paired with a row of
  `data.retain` (shuffled with the seed, cycled), which keeps its own prompt (``retain_prompt_ids``);
* mismatched responses (`Needs.mismatched`): each row also gets another
  row's completion, of another prompt, after its own prompt (`mismatched`);
* responses with their own prompts (`Needs.own_prompts`, JPO's joint pairs): explicit rows
  ``{chosen_prompt, chosen, rejected_prompt, rejected}``, served as ``<r>_prompt_ids`` with ``<r>_ids``.

Every data problem raises `DataError`, a `ValueError` with a one-line message naming the file,
row or field and the fix. With ``data.on_bad_row=skip`` bad rows are dropped and counted in
`DataReport.skipped` instead.
"""

from alignlab.data.collate import PreferenceCollator
from alignlab.data.pipeline import PreparedData, build_datasets, check_data_needs
from alignlab.data.rows import DataError, DataReport, SkipCount

__all__ = [
    "DataError",
    "DataReport",
    "PreferenceCollator",
    "PreparedData",
    "SkipCount",
    "build_datasets",
    "check_data_needs",
]
