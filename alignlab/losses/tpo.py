"""TPO — Saeidi et al. 2024, "Triple Preference Optimization: Achieving Better Alignment using a
Single Step Optimization", arXiv:2405.16681 (spec/losses.md part 2 §3); official code
sahsaeedi/TPO @71a4425, `tpo_loss`.

Reference-free, on triples (prompt, gold, chosen, rejected). With S(y) the summed and A(y) = S/|y|
the length-averaged policy log-prob, ΔS = S(y_w) − S(y_l), ΔA = A(y_w) − A(y_l):

* ``sigmoid`` (default): −(1−ε)·log σ(β·ΔS) − ε·log σ(−β·ΔS) + α·NLL(y_gold)
* ``tpo_l`` (TPO-L):      −log σ(β·ΔA − γ) + α·NLL(y_gold); with α = 0 this is SimPO (Meng et al. 2024)
* ``hinge``:              max(0, 1 − β·ΔS) + α·NLL(y_gold)
* ``ipo``:                (ΔA − 1/(2β))² + α·NLL(y_gold)

NLL is the policy's token-mean cross-entropy on the gold response. The official code takes one mean
over all gold tokens of the batch (``nll_reduction=batch_token_mean``, default), so long gold
answers weigh more (here over the optimizer step's whole batch, so that gradient accumulation and
data parallelism do not change the objective: `LossInputs.step`); ``sequence_mean`` averages each
gold answer's token mean instead. With α = 0 the gold response is not needed at all (the official
code still runs its forward pass; this one asks the data for pairs only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.losses.base import (
    NLL_REDUCTIONS,
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    nll_shares,
    preference_metrics,
    register,
)

LOSS_TYPES = ("sigmoid", "tpo_l", "hinge", "ipo")


@dataclass
class TPOConfig:
    name: str = "tpo"
    #: run_tpo.sh and TRL: β = 0.01, α = 1 (the official dataclass says 0.1 / 0.05: defaults conflict).
    beta: float = 0.01
    #: α, the weight of the gold NLL term.
    alpha: float = 1.0
    #: sigmoid | tpo_l | hinge | ipo.
    loss_type: str = "sigmoid"
    #: γ, TPO-L's target margin (README: 0.3–10; Llama-3-Base 0.5).
    gamma: float = 0.5
    #: ε, label smoothing of the sigmoid form.
    label_smoothing: float = 0.0
    #: batch_token_mean (official) or sequence_mean.
    nll_reduction: str = "batch_token_mean"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"loss.alpha must be >= 0, got {self.alpha}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if self.nll_reduction not in NLL_REDUCTIONS:
            raise ValueError(
                f"loss.nll_reduction must be one of {', '.join(NLL_REDUCTIONS)}; got {self.nll_reduction!r}"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("loss.label_smoothing applies to loss_type=sigmoid only")


@register("tpo", TPOConfig)
class TPO(Loss):
    """Triple preference optimisation, reference-free (module docstring)."""

    summary = "triple preference optimisation: pairs + gold NLL, no reference; TPO-L/SimPO form"
    paper = "Saeidi et al. 2024, arXiv:2405.16681"
    options = {"loss_type": LOSS_TYPES, "nll_reduction": NLL_REDUCTIONS}
    #: α = 0 drops the gold response (its needs change); γ is TPO-L's
    numeric_options = {"alpha": {"alpha": 0.0}, "gamma": {"loss_type": "tpo_l", "gamma": 0.25}}

    def __init__(self, cfg: TPOConfig) -> None:
        super().__init__(cfg)
        responses = ("gold", "chosen", "rejected") if cfg.alpha > 0 else ("chosen", "rejected")
        self.needs = Needs(reference=False, responses=responses)

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen, rejected = batch.policy["chosen"], batch.policy["rejected"]
        averaged = cfg.loss_type in ("tpo_l", "ipo")
        chosen_score = chosen.mean_logps if averaged else chosen.logps
        rejected_score = rejected.mean_logps if averaged else rejected.logps
        delta = chosen_score - rejected_score
        if cfg.loss_type == "sigmoid":
            eps = cfg.label_smoothing
            pref = (1 - eps) * F.softplus(-cfg.beta * delta) + eps * F.softplus(cfg.beta * delta)
        elif cfg.loss_type == "tpo_l":
            pref = F.softplus(-(cfg.beta * delta - cfg.gamma))
        elif cfg.loss_type == "hinge":
            pref = torch.relu(1 - cfg.beta * delta)
        else:
            pref = (delta - 1 / (2 * cfg.beta)) ** 2
        metrics = preference_metrics(batch, cfg.beta * chosen_score, cfg.beta * rejected_score)
        if cfg.alpha == 0:
            return LossOutput(pref, metrics)
        nll = nll_shares(batch, "gold", cfg.nll_reduction)
        metrics["nll_loss"] = nll.detach().mean()
        return LossOutput(pref + cfg.alpha * nll, metrics)
