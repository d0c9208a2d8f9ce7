"""rDPO (spec §2) against hand-computed values. Worked pair as in test_dpo: h = 2."""

import math

import pytest
from loss_helpers import softplus

from alignlab.losses import build
from alignlab.losses.dpo import DPOConfig
from alignlab.losses.rdpo import RDPOConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0] * 4], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]


def test_worked_example(make_pair):
    # β = 0.5 → z = 1; ε = 0.1: [0.9·softplus(−1) − 0.1·softplus(1)] / 0.8
    #   = (0.9·0.31326169 − 0.1·1.31326169) / 0.8 = (0.28193552 − 0.13132617) / 0.8 = 0.18826169
    out = build(RDPOConfig(beta=0.5, epsilon=0.1))(make_pair(PC, PR, RC, RR))
    assert out.losses.item() == pytest.approx(0.18826169, abs=1e-8)
    assert out.losses.item() == pytest.approx((0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8, rel=1e-12)


def test_epsilon_zero_is_dpo(make_pair):
    batch = make_pair(
        [[-2.0, -3.0], [-4.0]],
        [[-2.0] * 4, [-0.5]],
        [[-3.0, -3.0], [-1.0]],
        [[-1.0, -2.0, -2.0, -2.0], [-2.0]],
    )
    rdpo = build(RDPOConfig(beta=0.3, epsilon=0.0))(batch).losses
    # DPO from the formula: −log σ(β h), h = (−5+6) − (−8+7) = 2 and (−4+1) − (−0.5+2) = −4.5
    assert rdpo.tolist() == pytest.approx([softplus(-0.3 * 2), softplus(-0.3 * -4.5)], rel=1e-12)
    assert rdpo.tolist() == pytest.approx(build(DPOConfig(beta=0.3))(batch).losses.tolist(), rel=1e-12)


def test_differs_from_cdpo(make_pair):
    rdpo = build(RDPOConfig(beta=0.5, epsilon=0.1))(make_pair(PC, PR, RC, RR)).losses.item()
    cdpo = build(DPOConfig(beta=0.5, label_smoothing=0.1))(make_pair(PC, PR, RC, RR)).losses.item()
    assert cdpo == pytest.approx(0.41326169, abs=1e-8) and abs(rdpo - cdpo) > 0.2


def test_unbounded_below_with_nonvanishing_gradient(make_pair):
    # h = 200, β = 0.5 → z = 100: L ≈ −ε·z/(1−2ε) < 0 and dL/dz → −ε/(1−2ε) = −0.125, so dL/dρ_w = −0.0625
    batch = make_pair([[100.0]], [[-100.0]], [[0.0]], [[0.0]], requires_grad=True)
    out = build(RDPOConfig(beta=0.5, epsilon=0.1))(batch).losses
    assert out.item() == pytest.approx(-0.1 * softplus(100) / 0.8, rel=1e-9) and out.item() < 0
    out.sum().backward()
    assert batch.policy["chosen"].token_logps.grad[0, 0].item() == pytest.approx(-0.0625, rel=1e-9)


@pytest.mark.parametrize("eps", [0.5, -0.1])
def test_epsilon_range(eps):
    with pytest.raises(ValueError, match=r"loss.epsilon"):
        RDPOConfig(epsilon=eps)


def test_padding_invariance(make_pair):
    a = build(RDPOConfig(beta=0.5))(make_pair(PC, PR, RC, RR)).losses
    b = build(RDPOConfig(beta=0.5))(
        make_pair(
            [[-2.0, -3.0], [-1.0]],
            [[-2.0] * 4, [-1.0]],
            [[-3.0, -3.0], [-1.0]],
            [[-1.0, -2.0, -2.0, -2.0], [-1.0]],
        )
    ).losses
    assert b[0].item() == pytest.approx(a.item(), rel=1e-12)  # same pair, now padded beside a shorter one
    assert not math.isnan(b[1].item())
