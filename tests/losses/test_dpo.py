"""DPO and its variants against values worked out by hand from spec/losses.md §1.

Shared worked example (one pair): policy log-probs chosen −5 (tokens −2, −3), rejected −8 (four
tokens of −2); reference chosen −6 (−3, −3), rejected −7 (−1, −2, −2, −2). So ρ(y_w) = −5 − (−6) = 1,
ρ(y_l) = −8 − (−7) = −1 and h = ρ(y_w) − ρ(y_l) = 2.
"""

import math

import pytest
import torch

from alignlab.losses import build
from alignlab.losses.dpo import DPOConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0, -2.0, -2.0, -2.0]], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]


def loss_of(make_pair, **cfg) -> torch.Tensor:
    return build(DPOConfig(**cfg))(make_pair(PC, PR, RC, RR)).losses


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # policy == reference: h = 0
        ({}, math.log(2)),  # −log σ(0) = ln 2
        ({"label_smoothing": 0.2}, math.log(2)),  # 0.8·ln2 + 0.2·ln2
        ({"loss_type": "ipo", "beta": 0.1}, 25.0),  # (0 − 1/(2·0.1))² = 5² = 25
        ({"loss_type": "hinge"}, 1.0),  # max(0, 1 − 0)
    ],
)
def test_policy_equal_to_reference(make_pair, cfg, expected):
    same = make_pair(PC, PR, PC, PR)
    out = build(DPOConfig(**cfg))(same)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 0.0  # a tie is not a win (strict >)


def test_sigmoid_worked_example(make_pair):
    # β = 0.5: −log σ(0.5·2) = log(1 + e^{−1}) = 0.31326168751822286
    assert loss_of(make_pair, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


def test_cdpo_worked_example(make_pair):
    # ε = 0.1, β = 0.5: 0.9·log(1 + e^{−1}) + 0.1·log(1 + e^{1}) = 0.28193552 + 0.13132617 = 0.41326169
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert loss_of(make_pair, beta=0.5, label_smoothing=0.1).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.41326169, abs=1e-8)


def test_ipo_summed_worked_example(make_pair):
    # β = 0.5 (τ): (h − 1/(2β))² = (2 − 1)² = 1
    assert loss_of(make_pair, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0, rel=1e-12)


def test_ipo_length_normalized_worked_example(make_pair):
    # Token means: ρ(y_w) = −2.5 − (−3) = 0.5, ρ(y_l) = −2 − (−1.75) = −0.25, h = 0.75;
    # β = 0.5: (0.75 − 1)² = 0.0625
    out = loss_of(make_pair, beta=0.5, loss_type="ipo", ipo_length_normalize=True)
    assert out.item() == pytest.approx(0.0625, rel=1e-12)


@pytest.mark.parametrize("beta, expected", [(0.5, 0.0), (0.25, 0.5), (0.1, 0.8)])
def test_hinge_worked_example(make_pair, beta, expected):
    # max(0, 1 − β·2)
    assert loss_of(make_pair, beta=beta, loss_type="hinge").item() == pytest.approx(expected, abs=1e-12)


def test_metrics(make_pair):
    out = build(DPOConfig(beta=0.5))(make_pair(PC, PR, RC, RR))
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["rewards/chosen"] == pytest.approx(0.5)  # β·ρ(y_w) = 0.5·1
    assert m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/margins"] == pytest.approx(1.0)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-5.0)
    assert m["logps/rejected"] == pytest.approx(-8.0)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_batch_loss_is_per_example(make_pair):
    # Two pairs: the worked one (h = 2) and a tie (h = 0): per-example losses, not a batch scalar.
    batch = make_pair(
        [[-2.0, -3.0], [-1.0]],
        [[-2.0] * 4, [-1.0]],
        [[-3.0, -3.0], [-1.0]],
        [[-1.0, -2.0, -2.0, -2.0], [-1.0]],
    )
    losses = build(DPOConfig(beta=0.5))(batch).losses
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)], rel=1e-12)


def test_padding_does_not_change_loss(make_pair):
    base = build(DPOConfig())(make_pair(PC, PR, RC, RR)).losses
    padded = make_pair(PC, PR, RC, RR)
    for s in (*padded.policy.values(), *padded.reference.values()):
        s.token_logps = torch.cat([s.token_logps, torch.zeros(1, 3, dtype=s.token_logps.dtype)], 1)
        s.mask = torch.cat([s.mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    assert build(DPOConfig())(padded).losses.item() == pytest.approx(base.item(), rel=1e-12)


def test_gradient_reaches_policy_only(make_pair):
    batch = make_pair(PC, PR, RC, RR, requires_grad=True)
    build(DPOConfig(beta=0.5))(batch).losses.sum().backward()
    # d/dρw of −log σ(β h) = −β σ(−β h) = −0.5·σ(−1) per chosen token
    g = -0.5 * (1 / (1 + math.e))
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([g, g])
    assert batch.policy["rejected"].token_logps.grad[0].tolist() == pytest.approx([-g] * 4)
    assert batch.reference["chosen"].token_logps.grad is None


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"beta": 0.0}, "loss.beta"),
        ({"loss_type": "sigmod"}, "loss.loss_type"),
        ({"label_smoothing": 0.5}, "[0, 0.5)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "loss_type=sigmoid only"),
        ({"ipo_length_normalize": True}, "loss_type=ipo only"),
    ],
)
def test_config_errors_name_the_field(cfg, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        DPOConfig(**cfg)
