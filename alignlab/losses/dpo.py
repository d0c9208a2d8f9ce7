"""DPO — Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.

Variants (spec/losses.md §1):
  * ``sigmoid``: −log σ(β·h), with h = ρ(y_w) − ρ(y_l) and ρ = logπθ − logπref (summed over tokens).
  * cDPO (``sigmoid`` with ``label_smoothing`` = ε > 0): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    (Mitchell 2023, "A note on DPO with noisy preferences"); its minimum is at σ(β·h) = 1 − ε.
  * ``ipo``: (h − 1/(2β))², Azar et al. 2023, arXiv:2310.12036, eq. 17, β playing the role of τ.
    The paper and the official DPO repo use summed log-probs (default); TRL and LLaMA-Factory
    divide each log-prob by its response length: set ``ipo_length_normalize=true`` for that form.
  * ``hinge``: max(0, 1 − β·h), SLiC (Zhao et al. 2023) normalised by the reference; β acts as 1/margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, log_ratios, preference_metrics, register

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig:
    name: str = "dpo"
    #: strength of the implicit KL anchor to the reference; larger stays closer (spec default 0.1).
    beta: float = 0.1
    #: one of sigmoid | ipo | hinge.
    loss_type: str = "sigmoid"
    #: cDPO's ε, the assumed probability that a label is flipped; sigmoid only. 0 gives plain DPO.
    label_smoothing: float = 0.0
    #: IPO only: length-average the log-probs (TRL's form) instead of summing them (paper, default).
    ipo_length_normalize: bool = False

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing (cDPO's ε) must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"loss.label_smoothing is cDPO and applies to loss_type=sigmoid only, not {self.loss_type!r}; "
                "set loss.label_smoothing=0 (for noisy labels with other forms see the rdpo loss)"
            )
        if self.ipo_length_normalize and self.loss_type != "ipo":
            raise ValueError("loss.ipo_length_normalize applies to loss_type=ipo only")


@register("dpo", DPOConfig)
class DPO(Loss):
    """Direct Preference Optimization and its sigmoid/cDPO, IPO and hinge forms (module docstring)."""

    needs = Needs(reference=True)
    summary = "DPO with cDPO label smoothing, IPO and hinge forms"
    paper = "Rafailov et al. 2023, arXiv:2305.18290"
    options = {"loss_type": LOSS_TYPES}

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen_ratio, rejected_ratio = log_ratios(batch, cfg.ipo_length_normalize)
        h = chosen_ratio - rejected_ratio
        if cfg.loss_type == "sigmoid":
            eps = cfg.label_smoothing
            losses = (1 - eps) * F.softplus(-cfg.beta * h) + eps * F.softplus(cfg.beta * h)
        elif cfg.loss_type == "ipo":
            losses = (h - 1 / (2 * cfg.beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - cfg.beta * h)
        metrics = preference_metrics(batch, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        return LossOutput(losses, metrics)
