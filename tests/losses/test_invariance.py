"""Properties every registered loss keeps, generated from the registry: a loss added later is covered
without editing this file. Float64, a real model (builtin:tiny in true float64, `model_helpers.tiny_fp64`),
per-example losses and gradients (policy and the loss's own parameters), through alignlab's own
collator, forward pass and `trainer.loss_inputs`:

a. padding: extra pad columns leave losses and gradients unchanged;
b. batch order: permuting the examples permutes the per-example losses, gradients unchanged;
d. forward switches: every combination of `model.logit_chunk_size` (0, 1, 128), `skip_unused_logits`,
   `padding_free`, `prefix_sharing`, `drop_padding_mask` and `reference_mode` gives the dense path's
   losses and gradients, or is refused before any model loads (`alignlab.train.forward_plan`) with a
   one-line reason.

(c, micro-batching and processes, goes through HF Trainer: tests/losses/test_invariance_steps.py.)

Cases (`registry_cases.CASES`): each loss with its defaults, each enumerable option value one at a
time, and each numeric option at a value other than its default (`losses.numeric_cases`: declared in
`Loss.numeric_options` or derived); the full switch grid runs once per distinct `Needs`, and each switch
alone (and all together) for every numeric option's case.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import fields, replace

import pytest
import registry_cases
import torch
from registry_cases import CASES, NUMERIC, UNDECLARED, Case, distinct_needs, distinct_needs_and_numeric

from alignlab import losses
from alignlab.config import ModelConfig
from alignlab.data.collate import PreferenceCollator
from alignlab.errors import ConfigError
from alignlab.reference import precompute
from alignlab.train import forward_plan

TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def models():
    return registry_cases.models()


def _same_grads(got, want):
    assert len(got) == len(want)
    assert any(w is not None and w.abs().sum() > 0 for w in want), "no gradient reaches the policy"
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("key", CASES)
def test_extra_padding_changes_nothing(key, models):
    """For each response, a batch where one of its rows is the longest (it fills the batch: no padding at
    its end) gives the same as that batch with 1 or 5 extra pad columns."""
    case = Case(key, models)
    for r in case.needs.responses:
        rows = copy.deepcopy(case.rows)
        rows[1][f"{r}_ids"] = rows[1][f"{r}_ids"] + [7] * 12  # the longest sequence of the batch
        want_losses, want_grads = case.evaluate(case.batch(rows))
        assert torch.isfinite(want_losses).all()
        for pad in (1, 5):
            got_losses, got_grads = case.evaluate(case.batch(rows, pad=pad))
            torch.testing.assert_close(
                got_losses, want_losses, **TOL, msg=lambda m, r=r, pad=pad: f"{r} longest, pad {pad}: {m}"
            )
            _same_grads(got_grads, want_grads)


@pytest.mark.parametrize("key", CASES)
def test_permuting_the_batch_permutes_the_losses(key, models):
    case = Case(key, models)
    want_losses, want_grads = case.evaluate(case.batch())
    order = [2, 0, 3, 1]
    got_losses, got_grads = case.evaluate(case.batch(rows=[case.rows[i] for i in order]))
    torch.testing.assert_close(got_losses, want_losses[order], **TOL)
    _same_grads(got_grads, want_grads)


#: (logit_chunk_size, skip_unused_logits, padding_free, prefix_sharing, drop_padding_mask, reference_mode);
#: drop_padding_mask only acts on padded batches (neither packing switch)
GRID = [
    combo
    for combo in itertools.product(
        (0, 1, 128), (False, True), (False, True), (False, True), (False, True), ("live", "precomputed")
    )
    if not (combo[4] and (combo[2] or combo[3]))
]


#: the numeric options' cases: each switch alone, and all of them together
ALONE = [
    (1, False, False, False, False, "live"),
    (128, False, False, False, False, "live"),
    (0, True, False, False, False, "live"),
    (0, False, True, False, False, "live"),
    (0, False, False, True, False, "live"),
    (0, False, False, False, True, "live"),
    (0, False, False, False, False, "precomputed"),
    (1, True, True, True, False, "live"),
    (1, True, True, True, False, "precomputed"),
    (1, True, False, False, True, "precomputed"),
]
FULL_GRID = set(distinct_needs())


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_option_changes_the_losses(key, models):
    """A numeric option's case changes the losses or gradients of the same batch against its config at
    the option's default: one that cannot show there needs the options it applies under declared in
    `Loss.numeric_options` (or a reason there), else its invariance checks would test nothing new."""
    name, option, kw = NUMERIC[key]
    case = Case(key, models)
    default = Case(key, models, config=(name, {k: v for k, v in kw.items() if k != option}))
    if case.needs != default.needs:
        return  # it changes what the loss reads (TPO's α = 0 drops the gold response)
    got_losses, got_grads = case.evaluate(case.batch())
    want_losses, want_grads = default.evaluate(default.batch())
    same = torch.allclose(got_losses, want_losses, **TOL) and all(
        (g is None and w is None) or (g is not None and w is not None and torch.allclose(g, w, **TOL))
        for g, w in zip(got_grads, want_grads)
    )
    assert not same, (
        f"{key}: {name}.{option} changes no loss or gradient here; declare in "
        f"{type(case.loss).__name__}.numeric_options the options it applies under, or why it cannot show"
    )


def test_every_numeric_option_has_a_case():
    for name, entry in losses.REGISTRY.items():
        numeric = {f.name for f in fields(entry.config) if f.type in ("int", "float", int, float)}
        unknown = set(entry.loss.numeric_options) - numeric
        assert not unknown, f"{name}.numeric_options declares {sorted(unknown)}: not int / float options"
    assert not UNDECLARED, (
        f"no value other than the default that the config accepts for {UNDECLARED}: "
        "declare one in the loss's numeric_options"
    )


@pytest.mark.parametrize("key", distinct_needs_and_numeric())
def test_every_forward_switch_gives_the_dense_losses_and_gradients(key, models, tmp_path):
    case = Case(key, models)
    want_losses, want_grads = case.evaluate(case.batch())
    refused = []
    for chunk, skip, packed, shared, drop, mode in GRID if key in FULL_GRID else ALONE:
        model_cfg = replace(
            ModelConfig(),
            logit_chunk_size=chunk,
            skip_unused_logits=skip,
            padding_free=packed,
            prefix_sharing=shared,
            drop_padding_mask=drop,
            reference_mode=mode,
        )
        try:
            plan = forward_plan(case.loss.registry_name, model_cfg, case.needs)
        except ConfigError as err:
            assert "\n" not in str(err) and "model.reference_mode" in str(err)
            refused.append(mode)
            continue
        precomputed = None
        if mode == "precomputed":
            collator = PreferenceCollator(0, responses=case.needs.responses, fields=case.needs.batch_fields)
            precomputed = precompute(
                case.reference,
                case.dataset,
                collator,
                plan,
                case.needs.responses,
                identity=key,
                batch_size=len(case.rows),
                device="cpu",
                cache_dir=tmp_path,
            )
        got_losses, got_grads = case.evaluate(
            case.batch(precomputed=precomputed), plan, precomputed=mode == "precomputed"
        )
        where = (
            f"logit_chunk_size={chunk} skip_unused_logits={skip} padding_free={packed} "
            f"prefix_sharing={shared} drop_padding_mask={drop} {mode}"
        )
        torch.testing.assert_close(got_losses, want_losses, **TOL, msg=lambda m, where=where: f"{where}: {m}")
        _same_grads(got_grads, want_grads)
    # only precomputed references are ever refused, and only for losses that read more than log-probs
    assert set(refused) <= {"precomputed"}
    needs_more = not case.needs.reference or case.needs.full_logits or case.needs.activations is not None
    assert bool(refused) == needs_more
