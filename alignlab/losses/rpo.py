"""RPO — Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly
an Adversarial Regularizer", arXiv:2405.16436, eq. 4.3 and Appendix F (spec/losses.md §3).

DPO plus a weighted SFT term on the chosen response (y_base is the chosen response in practice):

* ``sft_reduction=sum`` (the paper's main text and its alignment-handbook code, default):
  L = L_DPO(β) + η·β·(−logπθ(y_w|x)), with the summed log-prob.
* ``sft_reduction=mean`` (Appendix F, the paper's OpenRLHF code, "average SFT loss"):
  L = L_DPO(β) + η·(−logπθ(y_w|x)/|y_w|), with **no** β factor.

η is not transferable between the two forms. η = 0 gives DPO exactly.

Not to be confused with Pang et al. 2024 (arXiv:2404.19733, "Iterative Reasoning Preference
Optimization"), whose DPO + α·NLL is TRL's `rpo_alpha` (a token mean over the batch, recommended
α = 1), nor with NeMo-Aligner's reward-aware "RPO", which regresses reward differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, log_ratios, preference_metrics, register

SFT_REDUCTIONS = ("sum", "mean")


@dataclass
class RPOConfig:
    name: str = "rpo"
    #: the paper's zephyr-7b-beta recipe: β = 0.01, η = 0.005 (summed form).
    beta: float = 0.01
    #: η, the weight of the SFT term. The OpenRLHF (mean) script uses β = 0.5, η = 0.2.
    eta: float = 0.005
    #: sum (paper main text, default) or mean (Appendix F / OpenRLHF): see the module docstring.
    sft_reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.eta < 0:
            raise ValueError(f"loss.eta must be >= 0, got {self.eta}")
        if self.sft_reduction not in SFT_REDUCTIONS:
            raise ValueError(f"loss.sft_reduction must be one of sum, mean; got {self.sft_reduction!r}")


@register("rpo", RPOConfig)
class RPO(Loss):
    """DPO regularised by the SFT loss of the chosen response (module docstring)."""

    needs = Needs(reference=True)
    summary = "DPO + SFT regulariser on the chosen response"
    paper = "Liu et al. 2024, arXiv:2405.16436"
    options = {"sft_reduction": SFT_REDUCTIONS}

    def forward(self, batch: LossInputs) -> LossOutput:
        beta, eta = self.cfg.beta, self.cfg.eta
        chosen_ratio, rejected_ratio = log_ratios(batch)
        dpo = F.softplus(-beta * (chosen_ratio - rejected_ratio))
        chosen = batch.policy["chosen"]
        if self.cfg.sft_reduction == "sum":
            nll = -chosen.logps
            sft = eta * beta * nll
        else:
            nll = -chosen.mean_logps
            sft = eta * nll
        metrics = preference_metrics(batch, beta * chosen_ratio, beta * rejected_ratio)
        metrics["nll_loss"] = nll.detach().mean()
        metrics["dpo_loss"] = dpo.detach().mean()
        return LossOutput(dpo + sft, metrics)
