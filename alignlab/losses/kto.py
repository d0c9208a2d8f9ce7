"""KTO — Ethayarajh et al. 2024 (Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela), "KTO: Model Alignment
as Prospect Theoretic Optimization", arXiv:2402.01306, §4.1 (the KTO loss; the equation number, 8 in
the issue's brief, could not be checked against the paper's text in this session); read in TRL's
`KTOTrainer._compute_loss` (`loss_type="kto"`) and the authors' ContextualAI/HALOs.

Unpaired thumbs-up/down rows ``{prompt, completion, label}`` (paired data is unpaired by the
pipeline: chosen → desirable, rejected → undesirable). With the implicit reward
r = β·(logπθ(y|x) − logπref(y|x)) (log-probs summed over the response tokens) and the reference point

    z_ref = max(0, mean_i β·(logπθ(y'_i|x_i) − logπref(y'_i|x_i)))

the biased estimate of β·KL(πθ‖πref) of §4.1 over *mismatched* pairs (x_i, y'_i): y'_i the completion of
another example (another prompt), served by the pipeline as the response ``kl_completion``
(`Needs.mismatched`), averaged over the batch and over data-parallel processes, then clamped at 0; it
is detached (no gradient flows through it, as in the paper and TRL):

* desirable:    λ_D·(1 − σ(r − z_ref))
* undesirable:  λ_U·(1 − σ(z_ref − r))

averaged over all examples (the paper's expectation; TRL's ``losses.nanmean()``). (The paper and TRL
write β·(logratio − KL) with the KL unscaled; clamping commutes with β > 0, so it is the same value.)
z_ref is a statistic of the batch the loss sees: with gradient accumulation each micro-batch has its
own, as in TRL (`per_batch_state`). The mismatched completions are drawn from the whole split (another
prompt's row, `alignlab.data.mismatched`), not rotated within the trained batch as in TRL, so a row
carries its own partner and the loss does not depend on the batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from alignlab.losses.base import (
    PAIRWISE_HEADLINE,
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    register,
    unpaired_metrics,
)

#: the response that holds each example's mismatched completion (another row's, after this prompt).
KL_COMPLETION = "kl_completion"


@dataclass
class KTOConfig:
    name: str = "kto"
    #: β, TRL KTOConfig default (the paper's runs use 0.1 too).
    beta: float = 0.1
    #: λ_D, weight of desirable examples (TRL desirable_weight; the paper recommends
    #: λ_D·n_D / (λ_U·n_U) in [1, 4/3]).
    desirable_weight: float = 1.0
    #: λ_U, weight of undesirable examples (TRL undesirable_weight).
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(
                "loss.desirable_weight and loss.undesirable_weight must be > 0, got "
                f"{self.desirable_weight}, {self.undesirable_weight}"
            )


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over every data-parallel process (this batch's mean in a single process)."""
    stacked = torch.stack([values.sum().double(), torch.tensor(float(values.numel()), dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
    return stacked[0] / stacked[1]


@register("kto", KTOConfig)
class KTO(Loss):
    """Kahneman–Tversky optimisation on unpaired desirable/undesirable feedback (module docstring)."""

    needs = Needs(
        reference=True,
        responses=("completion", KL_COMPLETION),
        fields=("label",),
        mismatched=((KL_COMPLETION, "completion"),),
    )
    summary = "Kahneman–Tversky optimisation on thumbs-up/down feedback, KL reference point, λ_D/λ_U"
    paper = "Ethayarajh et al. 2024, arXiv:2402.01306"
    headline = {**PAIRWISE_HEADLINE, "eval_kl": "KL point z_ref     {:.4f}"}
    curves = ("kl",)
    per_batch_state = (
        "z_ref is the mean reward of the batch's mismatched pairs (the paper's and TRL's KL estimate): "
        "with gradient accumulation each micro-batch has its own"
    )

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        completion = batch.policy["completion"]
        rewards = cfg.beta * (completion.logps - batch.reference["completion"].logps)
        mismatched = cfg.beta * (batch.policy[KL_COMPLETION].logps - batch.reference[KL_COMPLETION].logps)
        z_ref = _global_mean(mismatched.detach()).clamp(min=0).to(rewards.dtype)
        desirable = batch.fields["label"].bool()
        losses = torch.where(
            desirable,
            cfg.desirable_weight * (1 - torch.sigmoid(rewards - z_ref)),
            cfg.undesirable_weight * (1 - torch.sigmoid(z_ref - rewards)),
        )
        metrics = {"kl": z_ref.detach().clone(), **unpaired_metrics(completion, rewards, desirable)}
        return LossOutput(losses, metrics)
