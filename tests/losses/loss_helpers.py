"""Helpers to build loss inputs from hand-written per-token log-probs (no model involved)."""

from __future__ import annotations

import math

import torch

from alignlab.losses.base import LossInputs, SequenceLogps


def seq(rows: list[list[float]], requires_grad: bool = False) -> SequenceLogps:
    """Right-padded per-token log-probs; the mask is True on the given tokens."""
    width = max(len(r) for r in rows)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, : len(r)] = True
    values.requires_grad_(requires_grad)
    return SequenceLogps(token_logps=values, mask=mask)


def pair_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, requires_grad=False) -> LossInputs:
    return LossInputs(
        policy={"chosen": seq(policy_chosen, requires_grad), "rejected": seq(policy_rejected, requires_grad)},
        reference={"chosen": seq(ref_chosen), "rejected": seq(ref_rejected)},
    )


def softplus(x: float) -> float:
    """log(1 + e^x), written out so expected values never call the code under test."""
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))
