"""AlignDistil — Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment as Adaptive
Policy Distillation", arXiv:2503.02832, eqs. 9–12 (spec/losses.md part 2 §5); official code
songmzhang/AlignDistil @f80ca4e (`aligndistil_offpolicy_trainer.py`).

Two frozen teachers trained from the same initial model: π_dpo (DPO on (y_w, y_l)) and π_rdpo (DPO
on the swapped pairs). At each response position t, with teacher logits z_dpo and z_rdpo:

    TV_t = Σ_v |π_dpo − π_rdpo|,           α_t = β₂·TV_t + 1e-3
    z*_t = z_dpo + α_t·(z_dpo − z_rdpo),    π*_t = softmax(z*_t / T)
    L_i  = (1/|y|)·Σ_t (β/α_t)·KL(πθ(·|s_t) ‖ π*_t)

a reverse KL (student first) to a token-adaptively extrapolated teacher; no gradient flows through
α_t or z*. Off-policy form: trained on the dataset's chosen responses only. The per-token
coefficient β/α_t ranges over [β/(2β₂ + 1e-3), 1000·β].

Departure from the official code, on purpose: its off-policy loss is off by one position (it skips
the distribution predicting the first response token and includes the one after EOS); here the
positions are exactly those that predict the response tokens, as for every other loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlab.chunked import kl, per_token
from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, register


@dataclass
class AlignDistilConfig:
    name: str = "aligndistil"
    #: β, equal to the teachers' DPO β (0.1).
    beta: float = 0.1
    #: β₂, which scales the total-variation distance into α_t (off-policy 10, on-policy 15).
    beta2: float = 10.0
    #: T, the teacher's softmax temperature.
    temperature: float = 1.0
    #: the DPO teacher; by default the `dpo_teacher` stage of the aligndistil recipe.
    dpo_teacher: str = "${stage:dpo_teacher}/model"
    #: the reverse-DPO teacher (DPO on swapped pairs); by default the `reverse_teacher` stage.
    reverse_teacher: str = "${stage:reverse_teacher}/model"

    def __post_init__(self) -> None:
        for key in ("beta", "beta2", "temperature"):
            if getattr(self, key) <= 0:
                raise ValueError(f"loss.{key} must be > 0, got {getattr(self, key)}")


def extrapolated_teacher(z_dpo: torch.Tensor, z_rdpo: torch.Tensor, beta2: float, temperature: float):
    """α_t and log π*_t from the teachers' logits `(…, V)` (no gradient)."""
    with torch.no_grad():
        tv = (z_dpo.softmax(-1) - z_rdpo.softmax(-1)).abs().sum(-1)
        alpha = beta2 * tv + 1e-3
        z_star = z_dpo + alpha.unsqueeze(-1) * (z_dpo - z_rdpo)
        return alpha, (z_star / temperature).log_softmax(-1)


@register("aligndistil", AlignDistilConfig)
class AlignDistil(Loss):
    """Token-adaptive distillation from a DPO and a reverse-DPO teacher (module docstring)."""

    summary = "token-level alignment as adaptive distillation from DPO and reverse-DPO teachers"
    paper = "Zhang et al. 2025, arXiv:2503.02832"
    curves = ("mean_weight",)

    def __init__(self, cfg: AlignDistilConfig) -> None:
        super().__init__(cfg)
        self.needs = Needs(
            reference=False,
            full_logits=True,
            responses=("chosen",),
            teachers=(("dpo", cfg.dpo_teacher), ("reverse", cfg.reverse_teacher)),
        )

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        student = batch.policy["chosen"]
        dpo, reverse = batch.teachers["dpo"]["chosen"], batch.teachers["reverse"]["chosen"]

        def per_position(z_student, z_dpo, z_rdpo):
            alpha, log_teacher = extrapolated_teacher(z_dpo, z_rdpo, cfg.beta2, cfg.temperature)
            to_teacher = kl(z_student.log_softmax(-1), log_teacher)
            return torch.stack([cfg.beta / alpha * to_teacher, alpha, to_teacher.detach()], -1)

        out = per_token(per_position, student.logits, dpo.logits, reverse.logits)  # (B, T, 3)
        mask, lengths = student.mask, student.lengths.clamp(min=1)
        losses = (out[..., 0] * mask).sum(-1) / lengths
        metrics = {
            "mean_weight": ((out[..., 1] * mask).sum() / mask.sum().clamp(min=1)).detach(),
            "kl/teacher": ((out[..., 2] * mask).sum(-1) / lengths).mean().detach(),
            "logps/chosen": student.logps.detach().mean(),
        }
        return LossOutput(losses, metrics)
