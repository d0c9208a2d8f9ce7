"""CPO — Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance
in Machine Translation", arXiv:2401.08417 (ICML 2024), §2.3: L_CPO = L_prefer + L_NLL, L_prefer its
eq. 3 (as the first author's code, fe1ixxu/ALMA `utils/cpo_trainer.py`, cites it; merged into TRL as
`CPOTrainer`). AlphaPO's reward shape (Gupta et al. 2025, arXiv:2501.03884) as TRL's ``alpha``.

Reference-free, on pairs; DPO with a uniform reference (π_ref dropped) plus the chosen NLL. With S(y) the
summed and A(y) = S(y)/|y| the averaged policy log-prob, and u = S(y_w) − S(y_l):

* ``sigmoid`` (eq. 3):  −(1−ε)·log σ(β·u) − ε·log σ(−β·u) + λ·NLL(y_w)   (ε = ``label_smoothing``, paper: 0)
* ``hinge``:            max(0, 1 − β·u) + λ·NLL(y_w)
* ``ipo``:              (A(y_w) − A(y_l) − 1/(2β))² + λ·NLL(y_w)   (IPO's form; averaged log-probs, as TRL)

NLL(y_w) is the token-mean cross-entropy of the chosen responses, one mean over all chosen tokens of the
batch (the official code's and TRL's `nn.CrossEntropyLoss` over the batch; here over the optimizer step,
`batch_token_mean_nll`); ``nll_reduction=sequence_mean`` averages each response's token mean instead.
``alpha`` = α ≠ 0 applies AlphaPO's shape r_α(s) = (1 − e^{−α·s})/α to each log-prob s before the
difference (TRL's CPOTrainer ``alpha``; AlphaPO itself, the paper's method, is `simpo` with ``alpha``).
TRL's ``loss_type=simpo`` is the `simpo` loss with ``sft_weight`` = TRL's ``cpo_alpha``.
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
    shaped_reward,
)

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class CPOConfig:
    name: str = "cpo"
    #: β; the paper's and the official script's 0.1 (TRL's default too).
    beta: float = 0.1
    #: sigmoid (the paper) | hinge | ipo.
    loss_type: str = "sigmoid"
    #: ε, label smoothing of the sigmoid form (official code and TRL; 0 is the paper).
    label_smoothing: float = 0.0
    #: λ, the weight of the chosen NLL: 1 in the paper (L_prefer + L_NLL); TRL's `cpo_alpha`.
    nll_weight: float = 1.0
    #: batch_token_mean (official code, TRL) | sequence_mean.
    nll_reduction: str = "batch_token_mean"
    #: AlphaPO's reward shape α on each log-prob (TRL's `alpha`); 0 is CPO.
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
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
        if self.nll_weight < 0:
            raise ValueError(f"loss.nll_weight must be >= 0, got {self.nll_weight}")


@register("cpo", CPOConfig)
class CPO(Loss):
    """Contrastive preference optimisation, reference-free, with the chosen NLL (module docstring)."""

    needs = Needs(reference=False)
    summary = "CPO: reference-free DPO (uniform reference) + chosen NLL; AlphaPO's reward shape α"
    paper = "Xu et al. 2024, arXiv:2401.08417"
    options = {"loss_type": LOSS_TYPES, "nll_reduction": NLL_REDUCTIONS}
    curves = ("nll_loss",)

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen, rejected = batch.policy["chosen"], batch.policy["rejected"]
        averaged = cfg.loss_type == "ipo"
        chosen_score = shaped_reward(chosen.mean_logps if averaged else chosen.logps, cfg.alpha)
        rejected_score = shaped_reward(rejected.mean_logps if averaged else rejected.logps, cfg.alpha)
        u = chosen_score - rejected_score
        if cfg.loss_type == "ipo":
            pref = (u - 1 / (2 * cfg.beta)) ** 2
        else:
            z, eps = cfg.beta * u, cfg.label_smoothing
            hinge = cfg.loss_type == "hinge"
            pref = torch.relu(1 - z) if hinge else (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
        metrics = preference_metrics(batch, cfg.beta * chosen_score, cfg.beta * rejected_score)
        if cfg.nll_weight == 0:
            return LossOutput(pref, metrics)
        nll = nll_shares(batch, "chosen", cfg.nll_reduction)
        metrics["nll_loss"] = nll.detach().mean()
        return LossOutput(pref + cfg.nll_weight * nll, metrics)
