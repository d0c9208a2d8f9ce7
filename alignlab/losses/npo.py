"""NPO — Zhang, Lin, Bai & Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning", arXiv:2404.05868, eq. 3 and §5 (spec/losses.md §5); official code
licong-lin/negative-preference-optimization @1207bbe (`npo`, `npo_grad_diff`, `npo_KL`).

Unlearning a forget set: with ρ(y) = logπθ(y|x) − logπref(y|x) summed over answer tokens,

    L_NPO = (2/β)·E_forget[softplus(β·ρ)] = −(2/β)·E_forget[log σ(−β·ρ)]

As β → 0 it tends to gradient ascent, (2/β)·log 2 + ρ. Variants (``variant``):

* ``npo``:    L_NPO alone.
* ``npo_rt``: c_npo·L_NPO + c_rt·NLL_retain, NLL_retain the token-mean cross-entropy over the retain
  answers of the batch (HF ``outputs.loss``; the mean is over the whole optimizer step's batch, so
  gradient accumulation and data parallelism do not change it: `LossInputs.step`).
* ``npo_kl``: c_npo·L_NPO + c_kl·KL_retain, KL_retain = KL(πref‖πθ) summed over the vocabulary and
  averaged over positions. The official code (``F.kl_div(..., reduction="batchmean")`` on the
  flattened logits) averages over *every* position of the padded retain batch, padding and each
  row's last position (the prediction after its final token) included. Here the positions are those
  that predict a token of the retain sequence, prompt and answer (`SequenceLogps.input_mask`), so
  the term depends neither on how a batch is padded nor on how it is split into micro-batches.

The reference is the model before unlearning. Forget answers are masked to the answer (+EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.chunked import token_kl
from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, batch_token_mean_nll, register

VARIANTS = ("npo", "npo_rt", "npo_kl")


@dataclass
class NPOConfig:
    name: str = "npo"
    #: the official TOFU config: β = 0.1 (note NPO.__init__ in open-unlearning defaults to 1.0).
    beta: float = 0.1
    #: npo | npo_rt (retain NLL) | npo_kl (retain KL to the reference).
    variant: str = "npo"
    #: weights of the forget, retain-NLL and retain-KL terms (official: all 1.0).
    c_npo: float = 1.0
    c_rt: float = 1.0
    c_kl: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.variant not in VARIANTS:
            raise ValueError(f"loss.variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        for key in ("c_npo", "c_rt", "c_kl"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss.{key} must be >= 0, got {getattr(self, key)}")


def retain_kl(batch: LossInputs) -> torch.Tensor:
    """Per-example shares `(B,)` of KL(πref‖πθ) averaged over the retain positions of the batch."""
    policy, reference = batch.policy["retain"], batch.reference["retain"]
    kl = token_kl(reference.logits, policy.logits) * policy.input_mask  # (B, T)
    return batch.token_mean_share(kl.sum(-1), "retain", positions=True)


@register("npo", NPOConfig)
class NPO(Loss):
    """Negative preference optimisation for unlearning, with retain terms (module docstring)."""

    summary = "negative preference optimisation for unlearning; NPO+RT, NPO+KL"
    paper = "Zhang, Lin, Bai & Mei 2024, arXiv:2404.05868"
    options = {"variant": VARIANTS}
    numeric_options = {"c_rt": {"variant": "npo_rt", "c_rt": 0.5}, "c_kl": {"variant": "npo_kl", "c_kl": 0.5}}
    headline = {
        "eval_forget/logps": "forget log-lik.   {:.3f}",
        "eval_retain/nll": "retain NLL        {:.3f}",
    }
    curves = ("forget/logps", "retain/nll")

    def __init__(self, cfg: NPOConfig) -> None:
        super().__init__(cfg)
        if cfg.variant == "npo":
            self.needs = Needs(reference=True, responses=("completion",))
        else:
            kl = cfg.variant == "npo_kl"  # the retain KL reads every non-padding position
            self.needs = Needs(
                reference=True, responses=("completion", "retain"), full_logits=kl, logits_on_prompt=kl
            )

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        forget = batch.policy["completion"]
        ratio = forget.logps - batch.reference["completion"].logps
        npo = 2 / cfg.beta * F.softplus(cfg.beta * ratio)
        losses = cfg.c_npo * npo
        metrics = {
            "loss/npo": npo.detach().mean(),
            "forget/logps": forget.logps.detach().mean(),
            "forget/logratio": ratio.detach().mean(),
        }
        if cfg.variant != "npo":
            nll = batch_token_mean_nll(batch, "retain")
            metrics["retain/nll"] = nll.detach().mean()
            if cfg.variant == "npo_rt":
                losses = losses + cfg.c_rt * nll
            else:
                kl = retain_kl(batch)
                metrics["retain/kl"] = kl.detach().mean()
                losses = losses + cfg.c_kl * kl
        return LossOutput(losses, metrics)
