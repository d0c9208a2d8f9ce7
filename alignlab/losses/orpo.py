"""ORPO — Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
arXiv:2403.07691 (EMNLP 2024), eqs. 6–7 (L_ORPO = L_SFT + λ·L_OR, L_OR = −log σ(log odds(y_w)/odds(y_l)),
odds as in eq. 4); official code xfactlab/orpo `src/orpo_trainer.py`, TRL's experimental `ORPOTrainer`.

Reference-free, on pairs; one stage that is SFT and preference alignment at once. With
P(y) = exp(A(y)), A(y) = logπθ(y|x)/|y| the length-averaged log-prob (the official `compute_logps`),
odds(y) = P/(1 − P) and

    log OR = (A(y_w) − A(y_l)) − (log(1 − e^{A(y_w)}) − log(1 − e^{A(y_l)})),

the per-example loss is NLL(y_w) − λ·log σ(log OR). NLL(y_w) is the chosen responses' token-mean
cross-entropy, one mean over all chosen tokens of the batch (the official `outputs_pos.loss`, TRL's
`nn.CrossEntropyLoss`; here over the optimizer step, `batch_token_mean_nll`), or each response's own
token mean (``nll_reduction=sequence_mean``). The official code and TRL also count the *prompt* tokens
in this NLL (the official `--disable_prompt_loss` turns that off); alignlab's loss inputs carry response
log-probs only, so the NLL here is over the response, as the paper writes L_SFT (docs/losses.md).
"""

from __future__ import annotations

import math
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


@dataclass
class ORPOConfig:
    name: str = "orpo"
    #: λ, the weight of the odds-ratio term: the official Mistral-ORPO-β script and TRL (its `beta`) use 0.1;
    #: the paper's runs use 0.1–0.25 by model (the official argparse default is 1).
    lam: float = 0.1
    #: batch_token_mean (official code, TRL) | sequence_mean.
    nll_reduction: str = "batch_token_mean"

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"loss.lam must be >= 0, got {self.lam}")
        if self.nll_reduction not in NLL_REDUCTIONS:
            raise ValueError(
                f"loss.nll_reduction must be one of {', '.join(NLL_REDUCTIONS)}; got {self.nll_reduction!r}"
            )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo", ORPOConfig)
class ORPO(Loss):
    """Odds-ratio preference optimisation: SFT + λ·odds-ratio term, reference-free (module docstring)."""

    needs = Needs(reference=False)
    summary = "ORPO: chosen NLL + λ·odds-ratio term, no reference, no SFT stage"
    paper = "Hong, Lee & Thorne 2024, arXiv:2403.07691"
    options = {"nll_reduction": NLL_REDUCTIONS}
    curves = ("log_odds_ratio", "nll_loss")

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen, rejected = batch.policy["chosen"].mean_logps, batch.policy["rejected"].mean_logps
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = nll_shares(batch, "chosen", cfg.nll_reduction)
        metrics = preference_metrics(batch, cfg.lam * chosen, cfg.lam * rejected)
        metrics["log_odds_ratio"] = ratio.detach().mean()
        metrics["log_odds_chosen"] = log_odds.detach().mean()
        metrics["nll_loss"] = nll.detach().mean()
        return LossOutput(nll - cfg.lam * ratio, metrics)
