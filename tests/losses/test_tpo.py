"""TPO (spec part 2 §3) against hand-computed values.

Worked triple: S(y_w) = −5 (A = −2.5), S(y_l) = −8 (A = −2), ΔS = 3, ΔA = −0.5.
"""

import pytest
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.tpo import TPOConfig


def triple(gold, chosen=([-2.0, -3.0],), rejected=([-2.0] * 4,), grad=False) -> LossInputs:
    return LossInputs(
        policy={
            "gold": seq(list(gold), grad),
            "chosen": seq(list(chosen), grad),
            "rejected": seq(list(rejected), grad),
        }
    )


def test_sigmoid_with_gold_nll():
    # β = 0.5: softplus(−1.5) + α·NLL, NLL = (1 + 1 + 4)/3 = 2 → 0.20141328 + 2
    out = build(TPOConfig(beta=0.5, alpha=1.0))(triple([[-1.0, -1.0, -4.0]]))
    assert out.losses.item() == pytest.approx(softplus(-1.5) + 2.0, rel=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.0)


def test_tpo_l_at_alpha_zero_is_simpo():
    # SimPO (Meng et al. 2024): −log σ(β·ΔA − γ); β = 2, γ = 0.5:
    # −log σ(−1 − 0.5) = softplus(1.5) = 1.70141328
    out = build(TPOConfig(beta=2.0, alpha=0.0, loss_type="tpo_l", gamma=0.5))(triple([[-9.0]]))
    assert out.losses.item() == pytest.approx(softplus(1.5), rel=1e-12)
    assert out.losses.item() == pytest.approx(1.70141328, abs=1e-8)
    assert build(TPOConfig(alpha=0.0)).needs.responses == ("chosen", "rejected")  # no gold needed


def test_nll_reductions_differ_on_uneven_gold_lengths():
    # gold 1: 3 tokens, NLL sum 6; gold 2: 1 token, NLL 4.
    # batch token mean = (6 + 4)/4 = 2.5; sequence mean = (6/3 + 4/1)/2 = 3
    batch = triple([[-1.0, -1.0, -4.0], [-4.0]], chosen=([-1.0], [-1.0]), rejected=([-1.0], [-1.0]))
    base = softplus(0.0)  # ΔS = 0 → log 2
    tok = build(TPOConfig(beta=1.0, alpha=1.0))(batch).losses.mean().item()
    per_seq = build(TPOConfig(beta=1.0, alpha=1.0, nll_reduction="sequence_mean"))(batch).losses.mean().item()
    assert tok == pytest.approx(base + 2.5, rel=1e-12)
    assert per_seq == pytest.approx(base + 3.0, rel=1e-12)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("hinge", max(0.0, 1 - 0.5 * 3) + 2.0),  # relu(1 − β·ΔS) + α·NLL
        ("ipo", (-0.5 - 1 / (2 * 0.5)) ** 2 + 2.0),  # (ΔA − 1/(2β))² + α·NLL = 2.25 + 2
    ],
)
def test_other_forms(loss_type, expected):
    out = build(TPOConfig(beta=0.5, alpha=1.0, loss_type=loss_type))(triple([[-1.0, -1.0, -4.0]]))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


def test_label_smoothing():
    # ε = 0.1: 0.9·softplus(−1.5) + 0.1·softplus(1.5)
    out = build(TPOConfig(beta=0.5, alpha=0.0, label_smoothing=0.1))(triple([[-1.0]]))
    assert out.losses.item() == pytest.approx(0.9 * softplus(-1.5) + 0.1 * softplus(1.5), rel=1e-12)


def test_reference_free_and_gold_gradient():
    loss = build(TPOConfig(beta=0.5, alpha=1.0))
    assert loss.needs.reference is False and loss.needs.responses == ("gold", "chosen", "rejected")
    batch = triple([[-1.0, -1.0, -4.0]], grad=True)
    loss(batch).losses.sum().backward()
    assert batch.policy["gold"].token_logps.grad[0].tolist() == pytest.approx([-1 / 3] * 3)  # −α/N_tokens
