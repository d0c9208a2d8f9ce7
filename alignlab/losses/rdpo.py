"""rDPO — Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with
Noisy Feedback", arXiv:2403.00409, eq. 8 (spec/losses.md §2).

With z = β·h (h the DPO margin of summed log-ratios) and a known flip rate ε ∈ [0, ½):

    L = [(1 − ε)·softplus(−z) − ε·softplus(z)] / (1 − 2ε)
      = [(1 − ε)·ℓ(y_w ≻ y_l) − ε·ℓ(y_l ≻ y_w)] / (1 − 2ε),   ℓ the DPO loss.

This is an unbiased estimate of the clean-label DPO loss. Unlike cDPO (`dpo` with
`label_smoothing`), it is unbounded below: ∂L/∂z → −ε/(1−2ε) as z → ∞, so negative loss values are
expected and the gradient never vanishes. ε = 0 gives DPO exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, log_ratios, preference_metrics, register


@dataclass
class RDPOConfig:
    name: str = "rdpo"
    beta: float = 0.1
    #: the assumed probability ε that a preference label is flipped, in [0, 0.5). The paper treats
    #: it as known or tuned; its experiments inject 10–40% flips. 0 reduces to DPO.
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.epsilon < 0.5:
            raise ValueError(f"loss.epsilon (the label flip rate) must be in [0, 0.5), got {self.epsilon}")


@register("rdpo", RDPOConfig)
class RDPO(Loss):
    """Robust DPO for a known label-flip rate ε (module docstring)."""

    needs = Needs(reference=True)
    summary = "robust DPO, de-biased for a known label flip rate"
    paper = "Chowdhury, Kini & Natarajan 2024, arXiv:2403.00409"

    def forward(self, batch: LossInputs) -> LossOutput:
        beta, eps = self.cfg.beta, self.cfg.epsilon
        chosen_ratio, rejected_ratio = log_ratios(batch)
        z = beta * (chosen_ratio - rejected_ratio)
        losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
        return LossOutput(losses, preference_metrics(batch, beta * chosen_ratio, beta * rejected_ratio))
