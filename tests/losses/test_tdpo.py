"""TDPO₁ / TDPO₂ (spec part 2 §1) on hand-made logits, one pair of one-token responses, vocabulary 2.

Chosen (token 0): policy logits [0, 0] → p = (½, ½); reference [ln 3, 0] → q = (¾, ¼).
  Δ_w = ln ½ − ln ¾ = −0.40546511;  KL(q‖p) = ¾ ln(3/2) + ¼ ln(1/2) = 0.13081204
Rejected (token 1): policy [0, ln 3] → p = (¼, ¾); reference [0, 0] → q = (½, ½).
  Δ_l = ln ¾ − ln ½ = 0.40546511;   KL(q‖p) = ½ ln 2 + ½ ln(2/3) = 0.14384104
u = Δ_w − Δ_l = −0.81093022
TDPO₁: x = u − (0.14384104 − 0.13081204) = −0.82395922;  TDPO₂ (α = ½): x = u − ½·0.01302900 = −0.81744472
L = softplus(−β·x), β = ½.
"""

import math

import pytest
import torch
from loss_helpers import softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs, SequenceLogps
from alignlab.losses.tdpo import TDPOConfig

LN3 = math.log(3.0)
KL_W = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
KL_L = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
U = (math.log(0.5) - math.log(0.75)) - (math.log(0.75) - math.log(0.5))


def response(logits: list[float], token: int, grad: bool = False) -> SequenceLogps:
    z = torch.tensor([[logits]], dtype=torch.float64, requires_grad=grad)  # (1, 1, 2)
    logp = z.log_softmax(-1)[..., token]
    mask = torch.ones(1, 1, dtype=torch.bool)
    return SequenceLogps(token_logps=logp, mask=mask, logits=z, input_mask=mask)


def pair(grad: bool = False) -> LossInputs:
    return LossInputs(
        policy={"chosen": response([0.0, 0.0], 0, grad), "rejected": response([0.0, LN3], 1, grad)},
        reference={"chosen": response([LN3, 0.0], 0), "rejected": response([0.0, 0.0], 1)},
    )


def test_hand_values():
    assert KL_W == pytest.approx(0.13081204, abs=1e-8) and KL_L == pytest.approx(0.14384104, abs=1e-8)
    assert U == pytest.approx(-0.81093022, abs=1e-8)


@pytest.mark.parametrize("variant, x", [("tdpo1", U - (KL_L - KL_W)), ("tdpo2", U - 0.5 * (KL_L - KL_W))])
def test_loss(variant, x):
    out = build(TDPOConfig(beta=0.5, variant=variant))(pair())
    assert out.losses.item() == pytest.approx(softplus(-0.5 * x), rel=1e-10)
    # rewards β·(ΣΔ + SeqKL), as the official code logs them
    assert out.metrics["rewards/chosen"].item() == pytest.approx(
        0.5 * (math.log(0.5 / 0.75) + KL_W), rel=1e-10
    )
    assert out.metrics["kl/rejected"].item() == pytest.approx(KL_L, rel=1e-10)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_stop_gradient_on_the_chosen_kl(variant):
    """dL/dz_w = −β σ(−βx)·(dΔ_w/dz + [TDPO₁ only] dKL_w/dz), dΔ_w/dz = e₀ − p = (½, −½),
    dKL/dz = p − q = (−¼, ¼)."""
    batch = pair(grad=True)
    build(TDPOConfig(beta=0.5, variant=variant))(batch).losses.sum().backward()
    x = U - (KL_L - KL_W) if variant == "tdpo1" else U - 0.5 * (KL_L - KL_W)
    scale = -0.5 / (1 + math.exp(0.5 * x))
    direction = (0.25, -0.25) if variant == "tdpo1" else (0.5, -0.5)
    grad = batch.policy["chosen"].logits.grad[0, 0].tolist()
    assert grad == pytest.approx([scale * d for d in direction], rel=1e-9)


def test_no_nan_on_huge_logit_gaps():
    # A probability that underflows in fp32: softmax().log() gives −inf and a NaN KL; log_softmax does not.
    batch = LossInputs(
        policy={"chosen": response([0.0, 0.0], 0), "rejected": response([0.0, 0.0], 1)},
        reference={"chosen": response([200.0, 0.0], 0), "rejected": response([0.0, -200.0], 1)},
    )
    for s in (*batch.policy.values(), *batch.reference.values()):
        s.logits = s.logits.float()
    out = build(TDPOConfig(variant="tdpo1"))(batch)
    assert torch.isfinite(out.losses).all()


def test_config():
    assert build(TDPOConfig()).needs.full_logits
    with pytest.raises(ValueError, match="loss.variant"):
        TDPOConfig(variant="tdpo3")
