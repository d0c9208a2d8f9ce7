"""SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6) and AlphaPO's reward shape against hand-worked values.

Worked pair (no reference): chosen tokens (−2, −3), A(y_w) = −2.5; rejected four tokens of −2, A(y_l) = −2.
With β = 2, γ = 0.5: z = β·A(y_w) − β·A(y_l) − γ = −5 + 4 − 0.5 = −1.5.
"""

import math

import pytest
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.simpo import SimPOConfig

CHOSEN, REJECTED = [[-2.0, -3.0]], [[-2.0] * 4]


def pair(chosen=CHOSEN, rejected=REJECTED, grad=False) -> LossInputs:
    return LossInputs(policy={"chosen": seq(chosen, grad), "rejected": seq(rejected, grad)})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sigmoid_worked_example():
    # −log σ(−1.5) = softplus(1.5) = 1.70141328
    out = build(SimPOConfig())(pair())
    assert out.losses.item() == pytest.approx(softplus(1.5), rel=1e-12)
    assert out.losses.item() == pytest.approx(1.70141328, abs=1e-8)


def test_defaults_are_the_official_code():
    cfg = SimPOConfig()
    assert (cfg.beta, cfg.gamma, cfg.gamma / cfg.beta, cfg.loss_type) == (2.0, 0.5, 0.25, "sigmoid")
    needs = build(cfg).needs
    assert not needs.reference and needs.responses == ("chosen", "rejected")


def test_margin_shifts_the_argument():
    # γ = 0: −log σ(−1) = softplus(1); γ = 2: softplus(3)
    assert build(SimPOConfig(gamma=0.0))(pair()).losses.item() == pytest.approx(softplus(1.0), rel=1e-12)
    assert build(SimPOConfig(gamma=2.0))(pair()).losses.item() == pytest.approx(softplus(3.0), rel=1e-12)


def test_hinge_and_label_smoothing():
    # hinge: max(0, 1 − z) = 2.5; ε = 0.1: 0.9·softplus(1.5) + 0.1·softplus(−1.5)
    assert build(SimPOConfig(loss_type="hinge"))(pair()).losses.item() == pytest.approx(2.5, rel=1e-12)
    out = build(SimPOConfig(label_smoothing=0.1))(pair()).losses.item()
    assert out == pytest.approx(0.9 * softplus(1.5) + 0.1 * softplus(-1.5), rel=1e-12)


def test_alphapo_reward_shape():
    # α = 0.5: r(A) = (1 − e^{−αA})/α; r(−2.5) = 2(1 − e^{1.25}) = −4.98068591,
    # r(−2) = 2(1 − e) = −3.43656366;
    # z = 2·(−4.98068591 + 3.43656366) − 0.5 = −3.58824452
    r_w, r_l = (1 - math.exp(1.25)) / 0.5, (1 - math.exp(1.0)) / 0.5
    z = 2 * (r_w - r_l) - 0.5
    assert z == pytest.approx(-3.58824452, abs=1e-8)
    out = build(SimPOConfig(alpha=0.5))(pair())
    assert out.losses.item() == pytest.approx(softplus(-z), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(2 * r_w, rel=1e-12)


def test_alpha_tends_to_simpo():
    near = build(SimPOConfig(alpha=1e-7))(pair()).losses.item()
    assert near == pytest.approx(softplus(1.5), rel=1e-6)


def test_sft_weight_adds_chosen_token_mean_nll():
    # two pairs, chosen NLL sums 5 (2 tokens) and 1 (1 token): batch token mean 6/3 = 2 for both shares' mean
    batch = pair(chosen=[[-2.0, -3.0], [-1.0]], rejected=[[-2.0] * 4, [-1.0]])
    base = [softplus(1.5), softplus(0.5)]  # pair 2: z = −2 + 2 − 0.5
    out = build(SimPOConfig(sft_weight=0.5))(batch)
    assert out.losses.mean().item() == pytest.approx(sum(base) / 2 + 0.5 * 2.0, rel=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.0, rel=1e-12)


def test_gradient():
    # ∂/∂z softplus(−z) = −σ(−z) = −σ(1.5); dz/d token of y_w = β/|y_w| = 1, of y_l = −β/|y_l| = −0.5
    batch = pair(grad=True)
    build(SimPOConfig())(batch).losses.sum().backward()
    g = sigmoid(1.5)
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([-g, -g], rel=1e-12)
    assert batch.policy["rejected"].token_logps.grad[0].tolist() == pytest.approx([g / 2] * 4, rel=1e-12)


def test_metrics_are_the_length_normalised_rewards():
    m = build(SimPOConfig())(pair()).metrics
    assert m["rewards/chosen"].item() == pytest.approx(-5.0)
    assert m["rewards/rejected"].item() == pytest.approx(-4.0)
    assert m["rewards/accuracies"].item() == 0.0 and m["logps/chosen"].item() == pytest.approx(-5.0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"beta": 0.0}, "loss.beta"),
        ({"loss_type": "ipo"}, "loss.loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "sigmoid only"),
        ({"sft_weight": -1.0}, "sft_weight"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        SimPOConfig(**cfg)
