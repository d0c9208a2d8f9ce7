"""JPO — Bansal et al. 2024 (Bansal, Suvarna, Bhatt, Peng, Chang & Grover), "Comparing Bad Apples to Good
Oranges: Aligning Large Language Models via Joint Preference Optimization", arXiv:2404.00530 (named DOVE
in its first version); official code Hritikbansal/dove (`dove/custom_dove_trainer.py`, a TRL DPOTrainer).

Preferences between (instruction, response) pairs whose instructions may differ: (I_w, A_w) ≻ (I_l, A_l).
With the Bradley–Terry model over *joint* pairs and the KL-regularised objective over them, the
partition function does not depend on the instruction and cancels even when I_w ≠ I_l, which gives the
DPO form with each response under its own instruction:

    L = −log σ(β·log[πθ(A_w|I_w)/πref(A_w|I_w)] − β·log[πθ(A_l|I_l)/πref(A_l|I_l)])

log-probs summed over the response tokens. When I_w = I_l it is DPO (eq. 7 of Rafailov et al.), so
conditional pairs and joint pairs train together (the paper's proposed setup mixes both). The equation
number in the paper could not be checked in this change (docs/losses.md, "JPO").

Data: rows ``{chosen_prompt, chosen, rejected_prompt, rejected}`` (`Needs.own_prompts`); the official
data's ``{i_chosen, r_chosen, i_reject, r_reject}`` through ``data.columns``.
Default β = 0.1 (the official `train.py`).

Choice: the official README's DOVE command sets ``--joint_distribution True``, which also counts the
instruction's tokens in each log-prob (log π(I, A) rather than log π(A|I)); alignlab's loss inputs carry
response log-probs only, so that variant is not here (docs/losses.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, log_ratios, preference_metrics, register

#: both responses carry their own instruction: the row's `chosen_prompt` and `rejected_prompt`.
PAIR = ("chosen", "rejected")


@dataclass
class JPOConfig:
    name: str = "jpo"
    #: β, as DPO's (the official train.py default 0.1).
    beta: float = 0.1

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")


@register("jpo", JPOConfig)
class JPO(Loss):
    """Joint preference optimisation over (instruction, response) pairs (module docstring)."""

    needs = Needs(reference=True, responses=PAIR, own_prompts=PAIR)
    summary = "joint preferences between (instruction, response) pairs, each response with its own prompt"
    paper = "Bansal et al. 2024, arXiv:2404.00530"

    def forward(self, batch: LossInputs) -> LossOutput:
        beta = self.cfg.beta
        chosen_ratio, rejected_ratio = log_ratios(batch)  # each under its own instruction
        losses = F.softplus(-beta * (chosen_ratio - rejected_ratio))
        return LossOutput(losses, preference_metrics(batch, beta * chosen_ratio, beta * rejected_ratio))
