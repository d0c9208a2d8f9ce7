"""Properties every registered loss keeps, generated from the registry: a loss added later is covered
without editing this file. Float64, a real model (builtin:tiny in true float64, `model_helpers.tiny_fp64`),
per-example losses and gradients (policy and the loss's own parameters), through alignlab's own
collator, forward pass and `trainer.loss_inputs`:

a. padding: extra pad columns leave losses and gradients unchanged;
b. batch order: permuting the examples permutes the per-example losses, gradients unchanged;
d. forward switches: every combination of `model.logit_chunk_size` (0, 1, 128), `skip_unused_logits`,
   `padding_free`, `prefix_sharing` and `reference_mode` gives the dense path's losses and gradients,
   or is refused before any model loads (`alignlab.train.check_forward`) with a one-line reason.

(c, micro-batching and processes, goes through HF Trainer: tests/integration/test_invariance_steps.py.)

Cases: each loss with its defaults, and each enumerable option value (`losses.option_values`: booleans,
and the string choices the loss's module lists) one at a time; the switch grid runs once per distinct
`Needs`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from alignlab import builtin, losses
from alignlab.config import ModelConfig
from alignlab.data.collate import PreferenceCollator
from alignlab.errors import ConfigError
from alignlab.forward import Forward
from alignlab.losses.base import PrepareContext
from alignlab.reference import column, precompute
from alignlab.train import check_forward
from alignlab.trainer import loss_inputs
from model_helpers import random_rows, tiny_fp64

TOL = dict(atol=1e-10, rtol=1e-10)
#: extra cases whose needs change with a numeric option (`option_values` enumerates choices only)
EXTRA = [("tpo", {"alpha": 0.0})]


def _cases() -> dict[str, tuple[str, dict]]:
    out = {}
    for name, entry in sorted(losses.REGISTRY.items()):
        for kw in [{}, *({option: value} for option, value in losses.option_values(entry))]:
            out[name + "".join(f"-{k}={v}" for k, v in kw.items())] = (name, kw)
    for name, kw in EXTRA:
        out[name + "".join(f"-{k}={v}" for k, v in kw.items())] = (name, kw)
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    policy, reference = tiny_fp64(0), tiny_fp64(1).eval().requires_grad_(False)
    teachers = [tiny_fp64(2 + i).eval().requires_grad_(False) for i in range(2)]
    return policy, reference, teachers


class Case:
    """One loss configuration, prepared on a small dataset of random rows, ready to evaluate batches."""

    def __init__(self, key: str, models, b: int = 4):
        name, kw = CASES[key]
        self.policy, self.reference, teacher_models = models
        self.loss = losses.build(losses.get(name).config(**kw)).double()
        self.needs = needs = self.loss.needs
        self.teachers = {t: m for (t, _), m in zip(needs.teachers, teacher_models)}
        fields = {f: (lambda i: i % 2 == 0) if f == "label" else (lambda i: 0.25 * (i + 1)) for f in needs.fields}
        own = tuple(r for r in needs.responses if r == "retain")
        rows = random_rows(needs.responses, self.policy.config.vocab_size, b=b, seed=len(key), own_prompt=own,
                           fields=fields)
        from datasets import Dataset

        ctx = PrepareContext(reference=self.reference, tokenizer=builtin.build_tokenizer(), train=Dataset.from_list(rows),
                             eval=None, device=torch.device("cpu"), seed=0, architecture=self.policy.config)
        self.loss.prepare(ctx)  # e.g. BCO's UDM classifier and weights column, SparsePO's mask heads
        self.loss.double()
        self.dataset = ctx.train
        self.rows = ctx.train.to_list()

    def batch(self, rows=None, pad: int = 0, precomputed=None) -> dict[str, torch.Tensor]:
        needs = self.needs
        seqs = tuple(column(r) for r in needs.responses) if precomputed is not None else ()
        collator = PreferenceCollator(0, responses=needs.responses, fields=(*needs.fields, *needs.prepared_fields),
                                      sequences=seqs)
        batch = collator(rows if rows is not None else (precomputed.to_list() if precomputed is not None else self.rows))
        if pad:
            for key, value in list(batch.items()):
                if key.endswith(("_input_ids", "_attention_mask", "_labels")):
                    fill = -100 if key.endswith("_labels") else 0
                    batch[key] = torch.cat([value, value.new_full((value.shape[0], pad), fill)], 1)
        return batch

    def evaluate(self, batch, forward: Forward | None = None, precomputed: bool = False):
        """Per-example losses and the gradients of their mean, from a fresh copy of the loss (its state)."""
        loss = copy.deepcopy(self.loss)
        forward = forward or Forward(0, False, False, False)
        inputs = loss_inputs(forward, self.needs, batch, self.policy, self.policy,
                             reference=None if precomputed else self.reference, teachers=self.teachers,
                             precomputed_reference=precomputed)
        out = loss(inputs)
        params = [*self.policy.parameters(), *(p for p in loss.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(out.losses.mean(), params, allow_unused=True)
        return out.losses.detach(), grads


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
            torch.testing.assert_close(got_losses, want_losses, **TOL, msg=lambda m: f"{r} longest, pad {pad}: {m}")
            _same_grads(got_grads, want_grads)


@pytest.mark.parametrize("key", CASES)
def test_permuting_the_batch_permutes_the_losses(key, models):
    case = Case(key, models)
    want_losses, want_grads = case.evaluate(case.batch())
    order = [2, 0, 3, 1]
    got_losses, got_grads = case.evaluate(case.batch(rows=[case.rows[i] for i in order]))
    torch.testing.assert_close(got_losses, want_losses[order], **TOL)
    _same_grads(got_grads, want_grads)


#: (logit_chunk_size, skip_unused_logits, padding_free, prefix_sharing, reference_mode)
GRID = list(itertools.product((0, 1, 128), (False, True), (False, True), (False, True), ("live", "precomputed")))


def _distinct_needs() -> list[str]:
    seen, keys = set(), []
    for key, (name, kw) in CASES.items():
        needs = losses.build(losses.get(name).config(**kw)).needs
        if (name, needs) not in seen:
            seen.add((name, needs))
            keys.append(key)
    return keys


@pytest.mark.parametrize("key", _distinct_needs())
def test_every_forward_switch_gives_the_dense_losses_and_gradients(key, models, tmp_path):
    case = Case(key, models)
    want_losses, want_grads = case.evaluate(case.batch())
    refused = []
    for chunk, skip, packed, shared, mode in GRID:
        model_cfg = replace(ModelConfig(), logit_chunk_size=chunk, skip_unused_logits=skip, padding_free=packed,
                            prefix_sharing=shared, reference_mode=mode)
        try:
            check_forward(case.loss.registry_name, model_cfg, case.needs)
        except ConfigError as err:
            assert "\n" not in str(err) and "model.reference_mode" in str(err)
            refused.append(mode)
            continue
        forward = Forward(chunk, skip, packed, shared)
        precomputed = None
        if mode == "precomputed":
            collator = PreferenceCollator(0, responses=case.needs.responses,
                                          fields=(*case.needs.fields, *case.needs.prepared_fields))
            precomputed = precompute(case.reference, case.dataset, collator, forward, case.needs.responses,
                                     identity=key, batch_size=len(case.rows), device="cpu", cache_dir=tmp_path)
        got_losses, got_grads = case.evaluate(case.batch(precomputed=precomputed), forward,
                                              precomputed=mode == "precomputed")
        where = f"logit_chunk_size={chunk} skip_unused_logits={skip} padding_free={packed} prefix_sharing={shared} {mode}"
        torch.testing.assert_close(got_losses, want_losses, **TOL, msg=lambda m: f"{where}: {m}")
        _same_grads(got_grads, want_grads)
    # only precomputed references are ever refused, and only for losses that read more than log-probs
    assert set(refused) <= {"precomputed"}
    needs_more = not case.needs.reference or case.needs.full_logits or case.needs.activations is not None
    assert bool(refused) == needs_more
