"""SimPO — Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
arXiv:2405.14734, eqs. 4–6; official code princeton-nlp/SimPO, `scripts/simpo_trainer.py` `simpo_loss`.
AlphaPO — Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv:2501.03884 (ICML
2025), §3: SimPO with the reward reshaped by α.

Reference-free, on pairs. With A(y) = logπθ(y|x)/|y| the length-averaged policy log-prob (eq. 4: the
reward is β·A(y)) and the target reward margin γ of the Bradley–Terry model (eq. 5):

* ``sigmoid`` (eq. 6):  −log σ(β·A(y_w) − β·A(y_l) − γ)
  (with ``label_smoothing`` ε, as the official code: −(1−ε)·log σ(z) − ε·log σ(−z), z the argument)
* ``hinge`` (official code):  max(0, 1 − (β·A(y_w) − β·A(y_l) − γ))

AlphaPO (``alpha`` = α ≠ 0) replaces A(y) by r_α(y) = (1 − e^{−α·A(y)})/α = (1 − p̄(y)^{−α})/α, p̄ the
per-token geometric-mean probability: the paper's reward (β/α)(1 − πθ(y|x)^{−α/|y|}); α → 0 gives
SimPO. ``sft_weight`` adds the official code's optional NLL of the chosen responses, one token mean
over the optimizer step's chosen tokens (`batch_token_mean_nll`, as `nn.CrossEntropyLoss` over the
batch). The official code names the margin by the ratio γ/β (``gamma_beta_ratio`` = 0.25 at β = 2,
i.e. γ = 0.5); TRL's CPOTrainer ``loss_type=simpo`` takes ``simpo_gamma`` = γ. Here γ itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.losses.base import (
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    batch_token_mean_nll,
    preference_metrics,
    register,
    shaped_reward,
)

LOSS_TYPES = ("sigmoid", "hinge")


@dataclass
class SimPOConfig:
    name: str = "simpo"
    #: β, the reward scale: official default 2.0 (README: 2.0–2.5, up to 10); much larger than DPO's.
    beta: float = 2.0
    #: γ, the target reward margin (eq. 5); official gamma_beta_ratio 0.25 × β 2.0 = 0.5, TRL simpo_gamma 0.5.
    gamma: float = 0.5
    #: sigmoid (eq. 6) | hinge (official code).
    loss_type: str = "sigmoid"
    #: ε of the official code's label smoothing (sigmoid only); 0 is the paper.
    label_smoothing: float = 0.0
    #: AlphaPO's α (Gupta et al. 2025); 0 is SimPO. The paper's runs use small positive α (e.g. 0.25).
    alpha: float = 0.0
    #: weight of the official code's optional chosen NLL (sft_weight, default 0: the paper's SimPO has none).
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("loss.label_smoothing applies to loss_type=sigmoid only")
        if self.sft_weight < 0:
            raise ValueError(f"loss.sft_weight must be >= 0, got {self.sft_weight}")


def margin_loss(z: torch.Tensor, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z) (sigmoid) or max(0, 1 − z) (hinge), per example."""
    if loss_type == "hinge":
        return torch.relu(1 - z)
    eps = label_smoothing
    return (1 - eps) * F.softplus(-z) + eps * F.softplus(z) if eps else F.softplus(-z)


@register("simpo", SimPOConfig)
class SimPO(Loss):
    """Simple preference optimisation (and AlphaPO's reward shape), reference-free (module docstring)."""

    needs = Needs(reference=False)
    summary = "SimPO: length-normalised reward, margin γ, no reference; AlphaPO's reward shape α"
    paper = "Meng, Xia & Chen 2024, arXiv:2405.14734"
    options = {"loss_type": LOSS_TYPES}
    curves = ("nll_loss",)

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen, rejected = batch.policy["chosen"], batch.policy["rejected"]
        chosen_reward = cfg.beta * shaped_reward(chosen.mean_logps, cfg.alpha)
        rejected_reward = cfg.beta * shaped_reward(rejected.mean_logps, cfg.alpha)
        losses = margin_loss(chosen_reward - rejected_reward - cfg.gamma, cfg.loss_type, cfg.label_smoothing)
        metrics = preference_metrics(batch, chosen_reward, rejected_reward)
        if cfg.sft_weight > 0:
            nll = batch_token_mean_nll(batch, "chosen")
            metrics["nll_loss"] = nll.detach().mean()
            losses = losses + cfg.sft_weight * nll
        return LossOutput(losses, metrics)
