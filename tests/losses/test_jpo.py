"""JPO (Bansal et al. 2024): DPO's loss with each response under its own instruction. Expected values are
worked out here from the formula, and the log-probs through a real model from each prompt + response."""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import pair_inputs, softplus
from model_helpers import collate, tiny_fp64

from alignlab.losses import build, get
from alignlab.losses.base import LossInputs
from alignlab.losses.jpo import JPOConfig

PAIR = ("chosen", "rejected")


def test_needs_declare_a_prompt_per_response():
    needs = build(JPOConfig()).needs
    assert needs.reference and needs.responses == PAIR and needs.own_prompts == PAIR
    assert get("jpo").config().beta == 0.1  # the official train.py default


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hand_worked_losses_and_metrics(beta):
    policy_chosen, policy_rejected = [[-1.0, -2.0], [-0.5]], [[-3.0], [-0.25, -0.75, -1.0]]
    ref_chosen, ref_rejected = [[-1.5, -2.0], [-1.0]], [[-2.0], [-0.5, -0.5, -0.5]]
    inputs = pair_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, requires_grad=True)
    out = build(JPOConfig(beta=beta))(inputs)
    # example 0: ρ_w = −3 − (−3.5) = 0.5, ρ_l = −3 − (−2) = −1; example 1: ρ_w = 0.5, ρ_l = −2 + 1.5 = −0.5
    rho = [(0.5, -1.0), (0.5, -0.5)]
    expected = [softplus(-beta * (win - lose)) for win, lose in rho]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * 0.5, rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(beta * -0.75, rel=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 1.0
    # d loss_0 / d (policy chosen token) = −β σ(−β h)
    out.losses[0].backward()
    grad = inputs.policy["chosen"].token_logps.grad[0, 0].item()
    assert grad == pytest.approx(-beta / (1 + math.exp(beta * 1.5)), rel=1e-12)


def _logps(model, prompt: list[int], response: list[int]) -> float:
    """log π(response | prompt), summed, from the model run on prompt + response alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_p = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(log_p[len(prompt) - 1 + t, token].item() for t, token in enumerate(response))


ROWS = [  # a joint pair, a conditional pair (one prompt twice), a joint pair of one answer to two prompts
    {"prompt_ids": [9, 10], "chosen_prompt_ids": [9, 10], "chosen_ids": [11, 12, 1]}
    | {"rejected_prompt_ids": [20, 21, 22, 23], "rejected_ids": [24, 1]},
    {"prompt_ids": [30], "chosen_prompt_ids": [30], "chosen_ids": [31, 1]}
    | {"rejected_prompt_ids": [30], "rejected_ids": [33, 34, 35, 1]},
    {"prompt_ids": [40, 41, 42], "chosen_prompt_ids": [40, 41, 42], "chosen_ids": [43, 1]}
    | {"rejected_prompt_ids": [44, 45], "rejected_ids": [43, 1]},
]


@pytest.mark.parametrize("switch", ["dense", "padding_free", "prefix_sharing"])
def test_each_response_is_scored_after_its_own_prompt(switch):
    from alignlab.forward import ForwardPlan

    policy, reference = tiny_fp64(0), tiny_fp64(1).eval()
    loss = build(JPOConfig(beta=0.5)).double()
    plan = ForwardPlan.of(
        loss.needs, padding_free=switch == "padding_free", prefix_sharing=switch == "prefix_sharing"
    )
    batch = collate(ROWS, PAIR)
    inputs = LossInputs(
        policy=plan.fitted(policy)(policy, policy.get_output_embeddings(), batch),
        reference=plan.fitted(reference)(reference, reference.get_output_embeddings(), batch),
    )
    losses = loss(inputs).losses
    for i, row in enumerate(ROWS):
        rho = [
            _logps(policy, row[f"{r}_prompt_ids"], row[f"{r}_ids"])
            - _logps(reference, row[f"{r}_prompt_ids"], row[f"{r}_ids"])
            for r in PAIR
        ]
        assert losses[i].item() == pytest.approx(softplus(-0.5 * (rho[0] - rho[1])), rel=1e-9)


def test_a_combination_with_jpo_serves_every_term_the_own_prompts():
    from alignlab.losses.combo import ComboConfig

    needs = build(ComboConfig(terms={"sft": 1.0, "jpo": 1.0}, term_options={})).needs
    assert needs.own_prompts == PAIR and needs.responses == PAIR
