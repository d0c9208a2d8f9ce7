"""KTO (Ethayarajh et al. 2024): hand-worked losses, the KL reference point z_ref from the mismatched
completions (clamped, detached), λ_D / λ_U, metrics and config checks. Expected values are written out
here from the formula, never computed by the code under test."""

import math

import pytest
import torch
from loss_helpers import seq

from alignlab.losses import build, get
from alignlab.losses.base import LossInputs
from alignlab.losses.kto import KL_COMPLETION, KTOConfig


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def inputs(ratios, kl_ratios, labels, requires_grad=False) -> LossInputs:
    """One-token completions: policy log-prob = the log-ratio, reference 0; likewise the KL completions."""
    return LossInputs(
        policy={
            "completion": seq([[r] for r in ratios], requires_grad),
            KL_COMPLETION: seq([[r] for r in kl_ratios], requires_grad),
        },
        reference={"completion": seq([[0.0]] * len(ratios)), KL_COMPLETION: seq([[0.0]] * len(kl_ratios))},
        fields={"label": torch.tensor(labels)},
    )


def test_defaults_are_trl_and_the_paper():
    cfg = KTOConfig()
    assert (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == (0.1, 1.0, 1.0)


def test_needs_declare_the_mismatched_completion():
    needs = get("kto").loss.needs
    assert needs.responses == ("completion", KL_COMPLETION)
    assert needs.mismatched == ((KL_COMPLETION, "completion"),)
    assert needs.fields == ("label",) and needs.reference
    assert get("kto").loss.per_batch_state


def test_hand_worked_losses():
    loss = build(KTOConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.0))
    # rewards r = 0.5·[2, −1, 1]; mismatched log-ratios [1, 0.2, 0.6] → z = 0.5·0.6 = 0.3
    out = loss(inputs([2.0, -1.0, 1.0], [1.0, 0.2, 0.6], [True, False, False]))
    z = 0.3
    want = [1 - sigmoid(1.0 - z), 1 - sigmoid(z - (-0.5)), 1 - sigmoid(z - 0.5)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(z, rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(1.0)
    assert out.metrics["rewards/rejected"].item() == pytest.approx((-0.5 + 0.5) / 2)
    assert out.metrics["rewards/margins"].item() == pytest.approx(1.0)


def test_z_ref_is_clamped_at_zero():
    loss = build(KTOConfig(beta=1.0))
    out = loss(inputs([0.4, 0.4], [-3.0, 1.0], [True, False]))  # mean −1 → z = 0
    assert out.metrics["kl"].item() == 0.0
    assert out.losses.tolist() == pytest.approx([1 - sigmoid(0.4), 1 - sigmoid(-0.4)], rel=1e-12)


def test_weights_lambda_d_and_lambda_u():
    loss = build(KTOConfig(beta=1.0, desirable_weight=1.33, undesirable_weight=0.7))
    out = loss(inputs([0.2, -0.3], [0.0, 0.0], [True, False]))
    assert out.losses.tolist() == pytest.approx(
        [1.33 * (1 - sigmoid(0.2)), 0.7 * (1 - sigmoid(0.3))], rel=1e-12
    )


def test_no_gradient_through_z_ref():
    loss = build(KTOConfig(beta=1.0))
    batch = inputs([0.5, -0.5], [0.3, 0.9], [True, False], requires_grad=True)
    loss(batch).losses.mean().backward()
    assert (
        batch.policy[KL_COMPLETION].token_logps.grad is None
        or not batch.policy[KL_COMPLETION].token_logps.grad.any()
    )
    # d/dr of mean(1 − σ(r − z)) for the desirable row: −σ'(r − z)/2, z = 0.6
    s = sigmoid(0.5 - 0.6)
    grad = batch.policy["completion"].token_logps.grad
    assert grad[0, 0].item() == pytest.approx(-s * (1 - s) / 2, rel=1e-12)
    s = sigmoid(0.6 + 0.5)  # undesirable: 1 − σ(z − r), d/dr = +σ'(z − r)
    assert grad[1, 0].item() == pytest.approx(s * (1 - s) / 2, rel=1e-12)


def test_summed_log_probs_over_tokens():
    loss = build(KTOConfig(beta=0.1))
    batch = LossInputs(
        policy={"completion": seq([[-1.0, -2.0]]), KL_COMPLETION: seq([[-3.0, -1.0, -1.0]])},
        reference={"completion": seq([[-2.0, -2.5]]), KL_COMPLETION: seq([[-2.0, -1.5, -1.0]])},
        fields={"label": torch.tensor([True])},
    )
    # r = 0.1·(−3 − (−4.5)) = 0.15; z = max(0, 0.1·(−5 − (−4.5))) = 0
    assert loss(batch).losses.item() == pytest.approx(1 - sigmoid(0.15), rel=1e-12)


def test_one_kind_only_batch_has_no_margin():
    out = build(KTOConfig())(inputs([1.0], [0.0], [False]))
    assert "rewards/margins" not in out.metrics and "rewards/chosen" not in out.metrics


@pytest.mark.parametrize("kw", [{"beta": 0.0}, {"desirable_weight": 0.0}, {"undesirable_weight": -1.0}])
def test_config_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        KTOConfig(**kw)
