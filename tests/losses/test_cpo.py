"""CPO (Xu et al. 2024, arXiv:2401.08417, L_prefer + L_NLL) against hand-worked values.

Worked pair (no reference): chosen tokens (−2, −3): S(y_w) = −5, A = −2.5; rejected four tokens of −2:
S(y_l) = −8, A = −2. So u = S(y_w) − S(y_l) = 3; the chosen NLL (token mean) is 5/2 = 2.5.
"""

import math

import pytest
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.cpo import CPOConfig

CHOSEN, REJECTED = [[-2.0, -3.0]], [[-2.0] * 4]


def pair(chosen=CHOSEN, rejected=REJECTED, grad=False) -> LossInputs:
    return LossInputs(policy={"chosen": seq(chosen, grad), "rejected": seq(rejected, grad)})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_defaults_are_the_paper():
    cfg = CPOConfig()
    assert (cfg.beta, cfg.nll_weight, cfg.loss_type, cfg.alpha) == (0.1, 1.0, "sigmoid", 0.0)
    assert not build(cfg).needs.reference


def test_sigmoid_with_nll():
    # −log σ(0.1·3) + 2.5 = softplus(−0.3) + 2.5 = 0.55435524 + 2.5
    out = build(CPOConfig())(pair())
    assert out.losses.item() == pytest.approx(softplus(-0.3) + 2.5, rel=1e-12)
    assert out.losses.item() == pytest.approx(3.05435524, abs=1e-8)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.5)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-0.5)  # β·S(y_w)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"loss_type": "hinge"}, 0.7 + 2.5),  # max(0, 1 − 0.3) + NLL
        ({"loss_type": "ipo", "beta": 0.5}, (-0.5 - 1.0) ** 2 + 2.5),  # (ΔA − 1/(2β))² + NLL, ΔA = −0.5
        ({"label_smoothing": 0.1}, 0.9 * softplus(-0.3) + 0.1 * softplus(0.3) + 2.5),
        ({"nll_weight": 0.0}, softplus(-0.3)),
        ({"nll_weight": 0.5, "beta": 1.0}, softplus(-3.0) + 1.25),
    ],
)
def test_forms(cfg, expected):
    assert build(CPOConfig(**cfg))(pair()).losses.item() == pytest.approx(expected, rel=1e-12)


def test_alpha_reward_shape():
    # α = 0.5 on summed log-probs: r(−5) = 2(1 − e^{2.5}) = −22.36498792, r(−8) = 2(1 − e^4) = −107.19630007;
    # β·(r_w − r_l) = 0.1·84.83131215 = 8.48313122
    r_w, r_l = 2 * (1 - math.exp(2.5)), 2 * (1 - math.exp(4.0))
    assert 0.1 * (r_w - r_l) == pytest.approx(8.48313122, abs=1e-8)
    out = build(CPOConfig(alpha=0.5, nll_weight=0.0))(pair())
    assert out.losses.item() == pytest.approx(softplus(-0.1 * (r_w - r_l)), rel=1e-10)


def test_nll_reductions_differ_on_uneven_lengths():
    # chosen NLL sums 5 (2 tokens) and 4 (1 token): token mean (5 + 4)/3 = 3; sequence mean (2.5 + 4)/2 = 3.25
    batch = pair(chosen=[[-2.0, -3.0], [-4.0]], rejected=[[-2.0] * 4, [-4.0]])
    pref = (softplus(-0.3) + softplus(0.0)) / 2
    tok = build(CPOConfig())(batch).losses.mean().item()
    per_seq = build(CPOConfig(nll_reduction="sequence_mean"))(batch).losses.mean().item()
    assert tok == pytest.approx(pref + 3.0, rel=1e-12)
    assert per_seq == pytest.approx(pref + 3.25, rel=1e-12)


def test_gradient():
    # ∂/∂token(y_w) = −β σ(−βu) − 1/|y_w| (NLL token mean); ∂/∂token(y_l) = +β σ(−βu)
    batch = pair(grad=True)
    build(CPOConfig())(batch).losses.sum().backward()
    g = 0.1 * sigmoid(-0.3)
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([-g - 0.5] * 2, rel=1e-12)
    assert batch.policy["rejected"].token_logps.grad[0].tolist() == pytest.approx([g] * 4, rel=1e-12)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"beta": 0.0}, "loss.beta"),
        ({"loss_type": "simpo"}, "loss.loss_type"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"nll_reduction": "sum"}, "nll_reduction"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid only"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        CPOConfig(**cfg)
