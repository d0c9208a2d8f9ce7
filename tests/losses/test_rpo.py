"""RPO (spec §3) against hand-computed values. Worked pair: h = 2, logπθ(y_w) = −5 over 2 tokens."""

import pytest
from loss_helpers import softplus

from alignlab.losses import build
from alignlab.losses.dpo import DPOConfig
from alignlab.losses.rpo import RPOConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0] * 4], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]


def test_summed_form(make_pair):
    # β = 0.25, η = 0.2: softplus(−0.25·2) + 0.2·0.25·5 = 0.47407698 + 0.25 = 0.72407698
    out = build(RPOConfig(beta=0.25, eta=0.2))(make_pair(PC, PR, RC, RR))
    assert out.losses.item() == pytest.approx(softplus(-0.5) + 0.25, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.72407698, abs=1e-8)
    assert out.metrics["nll_loss"].item() == pytest.approx(5.0)


def test_averaged_form_has_no_beta(make_pair):
    # β = 0.25, η = 0.2, mean: softplus(−0.5) + 0.2·(5/2) = 0.47407698 + 0.5 = 0.97407698
    out = build(RPOConfig(beta=0.25, eta=0.2, sft_reduction="mean"))(make_pair(PC, PR, RC, RR))
    assert out.losses.item() == pytest.approx(softplus(-0.5) + 0.5, rel=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_eta_zero_is_dpo(make_pair, reduction):
    batch = make_pair(PC, PR, RC, RR)
    rpo = build(RPOConfig(beta=0.25, eta=0.0, sft_reduction=reduction))(batch).losses.item()
    assert rpo == pytest.approx(softplus(-0.5), rel=1e-12)
    assert rpo == pytest.approx(build(DPOConfig(beta=0.25))(batch).losses.item(), rel=1e-12)


def test_sft_gradient_reaches_chosen(make_pair):
    # d/dlogπ(y_w) of η·β·(−logπ(y_w)) = −η·β per token, on top of the DPO term's −β·σ(−βh)
    batch = make_pair(PC, PR, RC, RR, requires_grad=True)
    build(RPOConfig(beta=0.25, eta=0.2))(batch).losses.sum().backward()
    import math

    dpo_grad = -0.25 / (1 + math.exp(0.5))
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([dpo_grad - 0.05] * 2)


def test_bad_reduction():
    with pytest.raises(ValueError, match="loss.sft_reduction"):
        RPOConfig(sft_reduction="token")
