"""ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6–7) against hand-worked values.

Worked pair (no reference): chosen tokens (−2, −3): A(y_w) = −2.5; rejected four tokens of −2: A(y_l) = −2.
log(1 − e^{−2.5}) = −0.08565048, log(1 − e^{−2}) = −0.14541345, so
log OR = (−2.5 + 2) − (−0.08565048 + 0.14541346) = −0.55976297; the chosen NLL (token mean) is 2.5.
"""

import math

import pytest
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.orpo import ORPOConfig, log1mexp

CHOSEN, REJECTED = [[-2.0, -3.0]], [[-2.0] * 4]
LOG_OR = (-2.5 + 2.0) - (math.log(1 - math.exp(-2.5)) - math.log(1 - math.exp(-2.0)))


def pair(chosen=CHOSEN, rejected=REJECTED, grad=False) -> LossInputs:
    return LossInputs(policy={"chosen": seq(chosen, grad), "rejected": seq(rejected, grad)})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_worked_example():
    assert LOG_OR == pytest.approx(-0.55976297, abs=1e-8)
    # NLL − λ·log σ(log OR) = 2.5 + 0.1·softplus(0.55976297)
    out = build(ORPOConfig())(pair())
    assert out.losses.item() == pytest.approx(2.5 + 0.1 * softplus(-LOG_OR), rel=1e-12)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["log_odds_chosen"] == pytest.approx(LOG_OR, rel=1e-12)
    assert m["log_odds_ratio"] == pytest.approx(-softplus(-LOG_OR), rel=1e-12)
    assert m["nll_loss"] == pytest.approx(2.5) and m["rewards/chosen"] == pytest.approx(-0.25)  # λ·A(y_w)


def test_lambda_and_defaults():
    assert ORPOConfig().lam == 0.1 and not build(ORPOConfig()).needs.reference
    expected = 2.5 + softplus(-LOG_OR)
    assert build(ORPOConfig(lam=1.0))(pair()).losses.item() == pytest.approx(expected, rel=1e-12)
    assert build(ORPOConfig(lam=0.0))(pair()).losses.item() == pytest.approx(2.5, rel=1e-12)


def test_nll_reductions_differ_on_uneven_lengths():
    # chosen NLL sums 5 (2 tokens) and 4 (1 token): token mean 9/3 = 3; sequence mean (2.5 + 4)/2 = 3.25
    batch = pair(chosen=[[-2.0, -3.0], [-4.0]], rejected=[[-2.0] * 4, [-4.0]])
    pref = 0.1 * (softplus(-LOG_OR) + softplus(0.0)) / 2  # pair 2: equal A, log OR = 0
    assert build(ORPOConfig())(batch).losses.mean().item() == pytest.approx(pref + 3.0, rel=1e-12)
    per_seq = build(ORPOConfig(nll_reduction="sequence_mean"))(batch).losses.mean().item()
    assert per_seq == pytest.approx(pref + 3.25, rel=1e-12)


def test_gradient():
    # d log OR/dA_w = 1/(1 − e^{A_w}), d log OR/dA_l = −1/(1 − e^{A_l});
    # d/d log OR of −λ log σ(log OR) = −λ σ(−log OR)
    batch = pair(grad=True)
    build(ORPOConfig())(batch).losses.sum().backward()
    s = 0.1 * sigmoid(-LOG_OR)
    chosen = -s / (1 - math.exp(-2.5)) / 2 - 0.5  # the NLL token mean adds −1/2 per chosen token
    rejected = s / (1 - math.exp(-2.0)) / 4
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([chosen] * 2, rel=1e-12)
    assert batch.policy["rejected"].token_logps.grad[0].tolist() == pytest.approx([rejected] * 4, rel=1e-12)


@pytest.mark.parametrize("x", [-1e-8, -0.5, -math.log(2), -0.7, -5.0, -40.0])
def test_log1mexp_is_accurate_on_both_branches(x):
    import torch

    # written two independent ways, each exact where it does not cancel (threshold −1, not the code's −ln 2)
    expected = math.log1p(-math.exp(x)) if x < -1 else math.log(-math.expm1(x))
    got = log1mexp(torch.tensor(x, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-14, abs=1e-300)


@pytest.mark.parametrize(
    "cfg, message", [({"lam": -0.1}, "loss.lam"), ({"nll_reduction": "sum"}, "nll_reduction")]
)
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        ORPOConfig(**cfg)
