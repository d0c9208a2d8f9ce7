"""AlignDistil (spec part 2 §5): the extrapolated teacher and the weighted reverse KL, by hand.

One response position, vocabulary 2. Teachers: z_dpo = [ln 3, 0] → π_dpo = (¾, ¼); z_rdpo = [0, 0] →
(½, ½). TV = ¼ + ¼ = ½; with β₂ = 2: α = 2·½ + 1e-3 = 1.001.
z* = z_dpo + α(z_dpo − z_rdpo) = [2.001·ln 3, 0] → π*₀ = 3^2.001 / (3^2.001 + 1) = 0.90009883.
Student z = [0, 0] → (½, ½): KL(πθ‖π*) = ½ ln(½/π*₀) + ½ ln(½/π*₁) = 0.51126512.
L = (β/α)·KL / |y| = (0.1/1.001)·0.51126512 = 0.05107544.
"""

import math

import pytest
import torch

from alignlab.losses import build
from alignlab.losses.aligndistil import AlignDistilConfig, extrapolated_teacher
from alignlab.losses.base import LossInputs, SequenceLogps

LN3 = math.log(3.0)


def one_position(logits: list[list[float]], grad: bool = False) -> SequenceLogps:
    z = torch.tensor([logits], dtype=torch.float64, requires_grad=grad)  # (1, T, 2)
    mask = torch.ones(1, len(logits), dtype=torch.bool)
    return SequenceLogps(token_logps=z.log_softmax(-1)[..., 0], mask=mask, logits=z, input_mask=mask)


def test_teacher_construction_by_hand():
    alpha, log_t = extrapolated_teacher(
        torch.tensor([LN3, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        beta2=2.0,
        temperature=1.0,
    )
    p0 = 3**2.001 / (3**2.001 + 1)
    assert alpha.item() == pytest.approx(1.001, rel=1e-12)
    assert log_t.exp().tolist() == pytest.approx([p0, 1 - p0], rel=1e-10)
    assert p0 == pytest.approx(0.90009883, abs=1e-8)


def test_temperature_divides_the_extrapolated_logits():
    _, log_t = extrapolated_teacher(
        torch.tensor([LN3, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        beta2=2.0,
        temperature=2.0,
    )
    z0 = 2.001 * LN3 / 2
    assert log_t.exp()[0].item() == pytest.approx(math.exp(z0) / (math.exp(z0) + 1), rel=1e-10)


def test_loss_by_hand_and_no_gradient_to_teachers():
    p0 = 3**2.001 / (3**2.001 + 1)
    kl = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    batch = LossInputs(
        policy={"chosen": one_position([[0.0, 0.0]], grad=True)},
        teachers={
            "dpo": {"chosen": one_position([[LN3, 0.0]], grad=True)},
            "reverse": {"chosen": one_position([[0.0, 0.0]], grad=True)},
        },
    )
    out = build(AlignDistilConfig(beta=0.1, beta2=2.0))(batch)
    assert out.losses.item() == pytest.approx(0.1 / 1.001 * kl, rel=1e-10)
    assert out.losses.item() == pytest.approx(0.05107544, abs=1e-8)
    assert out.metrics["mean_weight"].item() == pytest.approx(1.001)
    out.losses.sum().backward()
    assert batch.policy["chosen"].logits.grad.abs().sum() > 0
    assert batch.teachers["dpo"]["chosen"].logits.grad is None  # α_t and z* carry no gradient


def test_length_average_over_response_positions():
    # Two positions with identical teachers (TV = 0, α = 1e-3, π* = π_dpo) and a student equal to the
    # teacher at the first position: the loss is the second position's (β/α)·KL over |y| = 2.
    teacher = [[LN3, 0.0], [LN3, 0.0]]
    batch = LossInputs(
        policy={"chosen": one_position([[LN3, 0.0], [0.0, 0.0]])},
        teachers={"dpo": {"chosen": one_position(teacher)}, "reverse": {"chosen": one_position(teacher)}},
    )
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    out = build(AlignDistilConfig(beta=0.1, beta2=10.0))(batch)
    assert out.losses.item() == pytest.approx((0.1 / 1e-3) * kl / 2, rel=1e-9)


def test_needs():
    needs = build(AlignDistilConfig(dpo_teacher="a", reverse_teacher="b")).needs
    assert needs.teachers == (("dpo", "a"), ("reverse", "b")) and needs.full_logits and not needs.reference
    assert needs.responses == ("chosen",)
