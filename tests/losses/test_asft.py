"""ASFT (spec §6): the closed form −(1+λ)·log P(y_w) − λ·log(1 − P(y_l)) with length-averaged P."""

import math

import pytest
import torch
from loss_helpers import softplus

from alignlab.losses import build
from alignlab.losses.asft import ASFTConfig

# log P(y_w) = mean(−2, −3) = −2.5 ; log P(y_l) = mean(−2, −2, −2, −2) = −2. The reference is ignored.
PC, PR = [[-2.0, -3.0]], [[-2.0] * 4]


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_closed_form(make_pair, lam):
    # λ = 1: 2·2.5 − log(1 − e^{−2}) = 5 + 0.14541345 = 5.14541345
    out = build(ASFTConfig(lam=lam))(make_pair(PC, PR, [[9.0, 9.0]], [[9.0]]))
    expected = (1 + lam) * 2.5 - lam * math.log(1 - math.exp(-2))
    assert out.losses.item() == pytest.approx(expected, rel=1e-10)
    if lam == 1.0:
        assert expected == pytest.approx(5.14541345, abs=1e-8)


def test_tempered_variant(make_pair):
    # β = 2: −log P(y_w) + λ[softplus(−2·o_w) + softplus(2·o_l)], o = log P − log(1 − P)
    o_w = -2.5 - math.log(1 - math.exp(-2.5))
    o_l = -2.0 - math.log(1 - math.exp(-2.0))
    out = build(ASFTConfig(beta=2.0, lam=0.5))(make_pair(PC, PR, PC, PR))
    assert out.losses.item() == pytest.approx(2.5 + 0.5 * (softplus(-2 * o_w) + softplus(2 * o_l)), rel=1e-10)


def test_finite_as_likelihood_reaches_one(make_pair):
    # P(y_l) = 1 exactly: log(1 − P) would be −inf; the clamp P ≤ 1 − 1e-7 keeps it at log(1e-7).
    batch = make_pair([[-1.0]], [[0.0, 0.0]], [[0.0]], [[0.0]], requires_grad=True)
    out = build(ASFTConfig())(batch).losses
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(2 * 1.0 - math.log(1e-7), rel=1e-5)
    out.sum().backward()
    assert torch.isfinite(batch.policy["rejected"].token_logps.grad).all()


def test_reference_free():
    assert build(ASFTConfig()).needs.reference is False


def test_saturated_rejected_response_keeps_its_gradient(make_pair):
    """#12.6: P is clamped inside log(1 − P) only (turbo-alignment ASFTLoss). For a rejected response with
    mean log P = −1e-9 (P > 1 − 1e-7), o = log P − log(1e-7) and ∂/∂ log P of λ·softplus(β·o) = λβ·σ(β·o),
    shared equally by its 2 tokens; clamping log P itself made it exactly 0."""
    batch = make_pair([[-1.0]], [[-1e-9, -1e-9]], [[0.0]], [[0.0, 0.0]], requires_grad=True)
    build(ASFTConfig(lam=0.5, beta=2.0))(batch).losses.sum().backward()
    o = -1e-9 - math.log1p(-(1 - 1e-7))
    expected = 0.5 * 2.0 / (1 + math.exp(-2.0 * o)) / 2
    assert batch.policy["rejected"].token_logps.grad[0].tolist() == pytest.approx(
        [expected, expected], rel=1e-6
    )
