"""The registry's losses as test cases: each loss with its defaults, each enumerable option value
(`losses.option_values`: booleans, and the string choices the loss's module lists) one at a time, and
each numeric option at a value other than its default (`losses.numeric_cases`), prepared on random rows
of a real model in true float64. Used by the suites that every loss must pass."""

from __future__ import annotations

import copy

import torch
from model_helpers import pad_columns, random_rows, tiny_fp64

from alignlab import builtin, losses
from alignlab.data.collate import PreferenceCollator
from alignlab.forward import ForwardPlan, ModelPlans
from alignlab.losses.base import PrepareContext
from alignlab.reference import column
from alignlab.trainer import loss_inputs


def models():
    """(policy, reference, [two teachers]): builtin:tiny in true float64, different seeds."""
    torch.manual_seed(0)
    return (
        tiny_fp64(0),
        tiny_fp64(1).eval().requires_grad_(False),
        [tiny_fp64(2 + i).eval().requires_grad_(False) for i in range(2)],
    )


def _key(name: str, kw: dict) -> str:
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def _cases() -> tuple[dict[str, tuple[str, dict]], dict[str, tuple[str, str, dict]], list[str]]:
    cases, numeric, undeclared = {}, {}, []
    for name, entry in sorted(losses.REGISTRY.items()):
        for kw in [{}, *({option: value} for option, value in losses.option_values(entry))]:
            cases[_key(name, kw)] = (name, kw)
        for option, kw in losses.numeric_cases(entry):
            if kw is None:
                undeclared.append(f"{name}.{option}")
                continue
            cases[_key(name, kw)] = (name, kw)
            numeric[_key(name, kw)] = (name, option, kw)
    return cases, numeric, undeclared


#: key -> (loss, config kwargs); NUMERIC: the numeric options' keys -> (loss, option, kwargs);
#: UNDECLARED: `loss.option` of the numeric options with no value the config accepts
CASES, NUMERIC, UNDECLARED = _cases()


class Case:
    """One loss configuration, prepared on a small dataset of random rows, ready to evaluate batches."""

    def __init__(self, key: str, models, b: int = 4, config: tuple[str, dict] | None = None):
        """`models`: `models()`'s (policy, reference, teachers); `b` rows (random, seeded by the key);
        `config`: (loss, kwargs) instead of the key's."""
        name, kw = config or CASES[key]
        self.policy, self.reference, teacher_models = models
        self.loss = losses.build(losses.get(name).config(**kw)).double()
        self.needs = needs = self.loss.needs
        self.teachers = {t: m for (t, _), m in zip(needs.teachers, teacher_models)}
        fields = {
            f: (lambda i: i % 2 == 0) if f == "label" else (lambda i: 0.25 * (i + 1)) for f in needs.fields
        }
        own = tuple(r for r in needs.responses if r == "retain" or r in needs.own_prompts)
        rows = random_rows(
            needs.responses,
            self.policy.config.vocab_size,
            b=b,
            seed=len(key) + b,
            own_prompt=own,
            fields=fields,
        )
        from datasets import Dataset

        from alignlab.scorers import prompt_embedder

        tokenizer = builtin.build_tokenizer()
        embed = (
            None
            if self.reference is None
            else prompt_embedder(self.reference, tokenizer.pad_token_id, torch.device("cpu"))
        )
        ctx = PrepareContext(
            reference=self.reference,
            tokenizer=tokenizer,
            train=Dataset.from_list(rows),
            eval=None,
            device=torch.device("cpu"),
            seed=0,
            architecture=self.policy.config,
            embed_prompts=embed,
        )
        torch.manual_seed(0)  # parameters a loss builds (SparsePO's heads) do not depend on the test order
        self.loss.prepare(ctx)  # e.g. BCO's UDM classifier and weights column, SparsePO's mask heads
        self.loss.double()
        self.dataset = ctx.train
        self.rows = ctx.train.to_list()

    def batch(self, rows=None, pad: int = 0, precomputed=None) -> dict[str, torch.Tensor]:
        needs = self.needs
        seqs = tuple(column(r) for r in needs.responses) if precomputed is not None else ()
        collator = PreferenceCollator(0, responses=needs.responses, fields=needs.batch_fields, sequences=seqs)
        batch = collator(
            rows if rows is not None else (precomputed.to_list() if precomputed is not None else self.rows)
        )
        return pad_columns(batch, pad) if pad else batch

    def evaluate(self, batch, plan: ForwardPlan | None = None, precomputed: bool = False):
        """Per-example losses and the gradients of their mean, from a fresh copy of the loss (its state),
        through the run's forward `plan` (by default dense logits on padded batches)."""
        loss = copy.deepcopy(self.loss)
        plan = plan or ForwardPlan.of(self.needs, skip_unused_logits=False)
        plans = ModelPlans.fit(plan, self.policy, None if precomputed else self.reference, self.teachers)
        inputs = loss_inputs(
            plans,
            self.needs,
            batch,
            self.policy,
            self.policy,
            reference=None if precomputed else self.reference,
            teachers=self.teachers,
            precomputed_reference=precomputed,
        )
        out = loss(inputs)
        params = [*self.policy.parameters(), *(p for p in loss.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(out.losses.mean(), params, allow_unused=True)
        return out.losses.detach(), grads


def distinct_needs() -> list[str]:
    seen, keys = set(), []
    for key, (name, kw) in CASES.items():
        needs = losses.build(losses.get(name).config(**kw)).needs
        if (name, needs) not in seen:
            seen.add((name, needs))
            keys.append(key)
    return keys


def distinct_needs_and_numeric() -> list[str]:
    """One case per distinct `Needs` of each loss, and every numeric option's case: a numeric option
    changes the arithmetic on the same inputs, which may read what the defaults do not (LD-DPO's masks)."""
    keys = distinct_needs()
    return keys + [key for key in NUMERIC if key not in keys]
