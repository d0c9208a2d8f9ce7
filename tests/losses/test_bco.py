"""BCO (spec §4): reward shift δ, unpaired and paired losses, UDM weights."""

import pytest
import torch
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.bco import BCOConfig


def unpaired(ratios, labels, training=True, weights=None) -> LossInputs:
    """One-token completions with log-ratio `ratios` (policy = ratio, reference = 0)."""
    fields = {"label": torch.tensor(labels)}
    if weights is not None:
        fields["udm_weight"] = torch.tensor(weights, dtype=torch.float64)
    return LossInputs(
        policy={"completion": seq([[r] for r in ratios])},
        reference={"completion": seq([[0.0] for _ in ratios])},
        fields=fields,
        training=training,
    )


def test_unpaired_with_running_shift():
    loss = build(BCOConfig(beta=1.0))
    # batch 1: rewards [1, −1] → δ = 0 (the first batch sets it) → both softplus(−1)
    out1 = loss(unpaired([1.0, -1.0], [True, False]))
    assert out1.losses.tolist() == pytest.approx([softplus(-1), softplus(-1)], rel=1e-12)
    # batch 2: rewards [2, 0.5, 0.5] → δ = (1 − 1 + 2 + 0.5 + 0.5)/5 = 0.6, updated before the loss
    out2 = loss(unpaired([2.0, 0.5, 0.5], [True, False, False]))
    assert out2.metrics["delta"].item() == pytest.approx(0.6, rel=1e-12)
    assert out2.losses.tolist() == pytest.approx(
        [softplus(-(2 - 0.6)), softplus(0.5 - 0.6), softplus(0.5 - 0.6)], rel=1e-12
    )


def test_delta_after_k_steps_is_the_running_mean_and_eval_leaves_it():
    loss = build(BCOConfig(beta=0.5))
    seen = []
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        ratios = torch.randn(3 + k, generator=gen, dtype=torch.float64).tolist()
        seen += [0.5 * r for r in ratios]
        loss(unpaired(ratios, [i % 2 == 0 for i in range(3 + k)]))
        assert loss.running_mean.item() == pytest.approx(sum(seen) / len(seen), rel=1e-12, abs=1e-15)
    before = loss.running_mean.item()
    loss(unpaired([100.0, 100.0], [True, False], training=False))
    assert loss.running_mean.item() == before


def test_paired_delta_is_the_mean_of_batch_means():
    loss = build(BCOConfig(beta=1.0, paired=True))

    def pair(c, r):
        return LossInputs(
            policy={"chosen": seq([[x] for x in c]), "rejected": seq([[x] for x in r])},
            reference={"chosen": seq([[0.0]] * len(c)), "rejected": seq([[0.0]] * len(r))},
        )

    loss(pair([1.0, 3.0], [0.0, 0.0]))  # batch mean reward 1
    out = loss(pair([2.0], [-2.0]))  # batch mean 0 → δ = (1 + 0)/2 = 0.5
    assert out.metrics["delta"].item() == pytest.approx(0.5)
    assert out.losses.item() == pytest.approx(softplus(-(2 - 0.5)) + softplus(-2 - 0.5), rel=1e-12)


def test_udm_weights_scale_undesirable_only():
    loss = build(BCOConfig(beta=1.0, udm=True))
    out = loss(unpaired([1.0, -1.0], [True, False], weights=[1.0, 3.0]))
    assert out.losses.tolist() == pytest.approx([softplus(-1), 3 * softplus(-1)], rel=1e-12)


def test_density_ratio_weights_by_hand():
    # p = σ(e·w + b); weight = clamp(p/(1 − p + 1e-8), 0.5, 10)
    loss = build(BCOConfig(udm=True))
    loss.udm_coef = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss.udm_intercept.fill_(0.5)
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    # logits: 0.5, 3.5, −5.5 → odds e^{0.5} = 1.6487, e^{3.5} = 33.1 → 10 (clamped), e^{−5.5} = 0.0041 → 0.5
    expected = [1.6487212707 / (1 + 1e-8 * 2.6487212707), 10.0, 0.5]
    assert loss.density_ratio_weights(emb).tolist() == pytest.approx(expected, rel=1e-6)


def test_state_is_in_buffers():
    state = build(BCOConfig()).state_dict()
    assert {"running_mean", "running_count", "udm_coef", "udm_intercept"} <= set(state)


def test_paired_with_udm_is_refused():
    with pytest.raises(ValueError, match="loss.udm"):
        BCOConfig(paired=True, udm=True)
