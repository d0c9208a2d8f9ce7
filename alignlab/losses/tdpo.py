"""TDPO — Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv:2404.11999, eqs. 14
(TDPO₁) and 17 (TDPO₂) (spec/losses.md part 2 §1); official code Vance0124/Token-level-Direct-
Preference-Optimization @2a736ec, `tdpo_loss`.

With Δ_t = logπθ(y_t|·) − logπref(y_t|·), u = ΣΔ_t(y_w) − ΣΔ_t(y_l), and the sequential forward KL
SeqKL(y) = Σ_t KL(πref(·|x, y_<t) ‖ πθ(·|x, y_<t)) over the full vocabulary and the response tokens:

* TDPO₁: L = −log σ(β·[u − (SeqKL(y_l) − SeqKL(y_w))])
* TDPO₂: L = −log σ(β·[u − α·(SeqKL(y_l) − sg(SeqKL(y_w)))]), sg the stop-gradient

β also scales the KL term; gradient flows through SeqKL(y_l) in both and through SeqKL(y_w) only in
TDPO₁. Log-probabilities come from log_softmax (the official reference path's softmax().log()
gives NaN when a probability underflows). The official repo's `tdpo.yaml` defaults to TDPO₁
(`if_tdpo2: false`) although its README's TDPO₂ command does not override it; here the variant is
explicit and TDPO₂ is the default, the paper's main method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.chunked import token_kl
from alignlab.losses.base import (
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    SequenceLogps,
    preference_metrics,
    register,
)

VARIANTS = ("tdpo1", "tdpo2")


@dataclass
class TDPOConfig:
    name: str = "tdpo"
    beta: float = 0.1
    #: α, TDPO₂'s weight of the KL margin (official default 0.5).
    alpha: float = 0.5
    #: tdpo1 | tdpo2.
    variant: str = "tdpo2"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.variant not in VARIANTS:
            raise ValueError(f"loss.variant must be one of tdpo1, tdpo2; got {self.variant!r}")
        if self.variant == "tdpo1" and self.alpha != 0.5:
            raise ValueError(
                "loss.alpha is TDPO2's weight; TDPO1 has none: leave it at 0.5 or use loss.variant=tdpo2"
            )


def sequence_kl(policy: SequenceLogps, reference: SequenceLogps) -> torch.Tensor:
    """SeqKL(y) = Σ_t KL(πref‖πθ) over the response tokens, `(B,)`."""
    return (token_kl(reference.logits, policy.logits) * policy.mask).sum(-1)


@register("tdpo", TDPOConfig)
class TDPO(Loss):
    """Token-level DPO with the sequential forward KL (module docstring)."""

    needs = Needs(reference=True, full_logits=True)
    summary = "token-level DPO: sequential forward KL on the full vocabulary, TDPO1/TDPO2"
    paper = "Zeng et al. 2024, arXiv:2404.11999"
    options = {"variant": VARIANTS}
    curves = ("kl/chosen",)

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        margins, kls = {}, {}
        for name in ("chosen", "rejected"):
            policy, reference = batch.policy[name], batch.reference[name]
            margins[name] = policy.logps - reference.logps
            kls[name] = sequence_kl(policy, reference)
        u = margins["chosen"] - margins["rejected"]
        if cfg.variant == "tdpo1":
            logits = u - (kls["rejected"] - kls["chosen"])
        else:
            logits = u - cfg.alpha * (kls["rejected"] - kls["chosen"].detach())
        losses = F.softplus(-cfg.beta * logits)
        # the official code's rewards: β·(ΣΔ + SeqKL), detached
        metrics = preference_metrics(
            batch,
            cfg.beta * (margins["chosen"] + kls["chosen"]),
            cfg.beta * (margins["rejected"] + kls["rejected"]),
        )
        metrics["kl/chosen"] = kls["chosen"].detach().mean()
        metrics["kl/rejected"] = kls["rejected"].detach().mean()
        metrics["kl/margin"] = (kls["rejected"] - kls["chosen"]).detach().mean()
        return LossOutput(losses, metrics)
