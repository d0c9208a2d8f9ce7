"""combo — Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed
Preference Optimization" (MPO), arXiv:2411.10442, §3.2: L = w_p·L_p + w_q·L_q + w_g·L_g, preference (DPO),
quality (BCO) and generation (SFT) losses; generalised to any registered losses, as TRL's ``loss_type``
list with ``loss_weights``.

Per example: Σ_k w_k · ℓ_k, each ℓ_k the per-example loss of registered loss k with its own options
(``term_options``), all on the same batch. The data and models served are the union of the terms' needs
(a reference if any term needs one, full logits if any reads them, ...); the terms must share one data
shape (pairs with pairs: `sft` reads the chosen responses of pairs, `bco` needs ``paired: true``). Each
term's metrics are logged under its name (``dpo/rewards/accuracies``), with ``<name>/loss`` its mean loss;
its state (BCO's δ) lives in this module's buffers, saved in checkpoints. The defaults are MPO's: DPO 0.8,
BCO 0.2 (paired), SFT 1. A weight of 0 drops a term (command-line dicts merge into the defaults:
``loss.terms='{bco: 0}'`` is DPO 0.8 + SFT 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from alignlab.losses.base import REGISTRY, Loss, LossInputs, LossOutput, Needs, PrepareContext, register


def _mpo_terms() -> dict[str, float]:
    return {"dpo": 0.8, "bco": 0.2, "sft": 1.0}


def _mpo_options() -> dict[str, Any]:
    return {"bco": {"paired": True}}


@dataclass
class ComboConfig:
    name: str = "combo"
    #: registered loss name -> its weight w_k (MPO: dpo 0.8, bco 0.2, sft 1.0).
    terms: dict[str, float] = field(default_factory=_mpo_terms)
    #: registered loss name -> that loss's options (its config fields), e.g. {bco: {paired: true}}.
    term_options: dict[str, Any] = field(default_factory=_mpo_options)

    def __post_init__(self) -> None:
        if not any(float(w) for w in self.terms.values()):
            raise ValueError("loss.terms names no loss with a weight > 0: give {loss name: weight, ...}")
        for name, weight in self.terms.items():
            if name == self.name:
                raise ValueError("loss.terms cannot nest combo")
            if name not in REGISTRY:
                raise ValueError(f"loss.terms names {name!r}, which is no registered loss (alignlab list)")
            if float(weight) < 0:
                raise ValueError(f"loss.terms.{name} must be >= 0, got {weight}")
        for name, options in self.term_options.items():
            if name not in self.terms:
                raise ValueError(f"loss.term_options names {name!r}, which is not in loss.terms")
            allowed = {f.name for f in fields(REGISTRY[name].config)} - {"name"}
            unknown = set(options) - allowed
            if unknown:
                raise ValueError(
                    f"loss.term_options.{name} has no option {sorted(unknown)}; its options: "
                    f"{', '.join(sorted(allowed))}"
                )
            REGISTRY[name].config(**options)  # its own checks


def merge_needs(needs: list[Needs]) -> Needs:
    """The union of the terms' needs; refused when their data shapes differ."""
    responses: list[str] = []
    for n in needs:
        responses += [r for r in n.responses if r not in responses]
    shapes = {("completion" in n.responses, "retain" in n.responses) for n in needs}
    if len(shapes) > 1:
        shapes_text = [n.responses for n in needs]
        raise ValueError(
            f"loss.terms need different data shapes ({shapes_text}): every term "
            "must train on the same rows (e.g. bco with term_options {bco: {paired: true}})"
        )
    activations = [n.activations for n in needs if n.activations is not None]
    if len(set(activations)) > 1:
        raise ValueError("loss.terms read different reference activations; combine them one at a time")

    def merged(name: str):
        """A flag: any term's; a tuple: the union of the terms', in order (`own_prompts`: jpo + sft
        sees each response after its own prompt); every field of `Needs` is merged, none by hand."""
        values = [getattr(n, name) for n in needs]
        if isinstance(values[0], bool):
            return any(values)
        return tuple(dict.fromkeys(x for value in values for x in value))

    special = {"responses": tuple(responses), "activations": activations[0] if activations else None}
    return Needs(**{f.name: special[f.name] if f.name in special else merged(f.name) for f in fields(Needs)})


@register("combo", ComboConfig)
class Combo(Loss):
    """Σ_k w_k · (registered loss k), on one batch (module docstring)."""

    summary = "weighted combination of registered losses (MPO: DPO 0.8 + BCO 0.2 + SFT 1; TRL's loss_weights)"
    paper = "Wang et al. 2024, arXiv:2411.10442"

    def __init__(self, cfg: ComboConfig) -> None:
        super().__init__(cfg)
        # a weight of 0 drops the term (Hydra merges dict overrides: `loss.terms='{bco: 0}'` removes BCO)
        self.weights = {name: float(w) for name, w in cfg.terms.items() if float(w) > 0}
        self.terms = nn.ModuleDict(
            {
                name: REGISTRY[name].loss(REGISTRY[name].config(**dict(cfg.term_options.get(name, {}))))
                for name in self.weights
            }
        )
        self.needs = merge_needs([term.needs for term in self.terms.values()])
        self.per_batch_state = "; ".join(
            f"{name}: {term.per_batch_state}" for name, term in self.terms.items() if term.per_batch_state
        )
        self.headline = {
            f"eval_{name}/{key[len('eval_') :]}": f"{name}: {text}"
            for name, term in self.terms.items()
            for key, text in term.headline.items()
        }
        self.curves = tuple(
            f"{name}/{c}"
            for name, term in self.terms.items()
            for c in ("loss", "rewards/accuracies", *term.curves)
        )

    def prepare(self, ctx: PrepareContext) -> None:
        for term in self.terms.values():
            term.prepare(ctx)

    def param_groups(self) -> list[dict]:
        return [group for term in self.terms.values() for group in term.param_groups()]

    def forward(self, batch: LossInputs) -> LossOutput:
        total: torch.Tensor | float = 0.0
        metrics = {}
        for name, term in self.terms.items():
            out = term(batch)
            total = total + self.weights[name] * out.losses
            metrics[f"{name}/loss"] = out.losses.detach().mean()
            metrics.update({f"{name}/{key}": value for key, value in out.metrics.items()})
        return LossOutput(total, metrics)
