"""ASFT — Wang, Sun, Hua & Fang 2024, "ASFT: Aligned Supervised Fine-Tuning through Absolute
Likelihood", arXiv:2409.10571 (spec/losses.md §6); tempered form from Gorbatovski et al. 2025,
"The Differences Between Direct Alignment Algorithms are a Blur", §2.4.

Reference-free. With the length-averaged likelihood P(y|x) = exp(Σ_t logπθ(y_t|·)/|y|) and the
log-odds o(y) = log P − log(1 − P):

    L = −ce_coef·log P(y_w|x) + λ·[−log σ(β·o(y_w)) − log σ(−β·o(y_l))]

a binary cross-entropy on the absolute likelihood of each response (not a Bradley–Terry
difference). With β = 1 (the paper) σ(o) = P, so L = −(1+λ)·log P(y_w|x) − λ·log(1 − P(y_l|x)):
the align term already contains −log P(y_w), so the effective SFT weight is ce_coef + λ.
P is clamped to ≤ 1 − 1e-7 inside log(1 − P) only, so that it stays finite as P → 1, as in the
reference code (turbo-alignment `ASFTLoss`): the log P term keeps its gradient at saturation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, preference_metrics, register

#: log P is clamped to log(1 − 1e-7) so that log(1 − P) = log1p(−P) stays finite.
MAX_LOG_P = math.log1p(-1e-7)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """o = log P − log(1 − P) for log P = `mean_logps` ≤ 0; P is clamped inside log(1 − P) only."""
    return mean_logps - torch.log1p(-torch.exp(mean_logps.clamp(max=MAX_LOG_P)))


@dataclass
class ASFTConfig:
    name: str = "asft"
    #: λ, the weight of the alignment term (turbo-alignment default 1; best of {0.1,…,1} in the comparison).
    lam: float = 1.0
    #: temperature of the odds; 1 is the paper, other values the tempered variant.
    beta: float = 1.0
    #: weight of the plain SFT term −log P(y_w|x).
    ce_coef: float = 1.0

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"loss.lam must be >= 0, got {self.lam}")
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.ce_coef < 0:
            raise ValueError(f"loss.ce_coef must be >= 0, got {self.ce_coef}")


@register("asft", ASFTConfig)
class ASFT(Loss):
    """Aligned SFT on absolute likelihoods, reference-free (module docstring)."""

    needs = Needs(reference=False)
    summary = "aligned SFT: BCE on absolute length-averaged likelihoods, no reference"
    paper = "Wang, Sun, Hua & Fang 2024, arXiv:2409.10571"

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen, rejected = batch.policy["chosen"].mean_logps, batch.policy["rejected"].mean_logps
        align = F.softplus(-cfg.beta * log_odds(chosen)) + F.softplus(cfg.beta * log_odds(rejected))
        sft = -chosen
        metrics = preference_metrics(batch, cfg.beta * chosen, cfg.beta * rejected)
        metrics["nll_loss"] = sft.detach().mean()
        return LossOutput(cfg.ce_coef * sft + cfg.lam * align, metrics)
