"""NPO, NPO+RT, NPO+KL (spec §5) against hand-computed values."""

import math

import pytest
import torch
from loss_helpers import seq, softplus

from alignlab.losses import build
from alignlab.losses.base import LossInputs, SequenceLogps
from alignlab.losses.npo import NPOConfig


def forget_only(policy, reference, grad=False) -> LossInputs:
    return LossInputs(policy={"completion": seq(policy, grad)}, reference={"completion": seq(reference)})


def test_npo_worked_example():
    # ρ = −5 − (−6) = 1, β = 0.5: (2/β)·softplus(β·ρ) = 4·softplus(0.5) = 4·0.97407698 = 3.89630794
    out = build(NPOConfig(beta=0.5))(forget_only([[-2.0, -3.0]], [[-3.0, -3.0]]))
    assert out.losses.item() == pytest.approx(4 * softplus(0.5), rel=1e-12)
    assert out.metrics["forget/logps"].item() == pytest.approx(-5.0)


def test_small_beta_tends_to_gradient_ascent():
    # β → 0: (2/β)·log 2 + ρ
    beta = 1e-4
    out = build(NPOConfig(beta=beta))(forget_only([[-2.0, -3.0]], [[-3.0, -3.0]])).losses.item()
    assert out == pytest.approx(2 / beta * math.log(2) + 1.0, abs=1e-3)


def test_gradient_lowers_forget_likelihood():
    # d/dρ of (2/β)softplus(βρ) = 2σ(βρ) > 0, so descent lowers logπθ(forget)
    batch = forget_only([[-2.0, -3.0]], [[-3.0, -3.0]], grad=True)
    build(NPOConfig(beta=0.5))(batch).losses.sum().backward()
    g = 2 / (1 + math.exp(-0.5))
    assert batch.policy["completion"].token_logps.grad[0].tolist() == pytest.approx([g, g])


def test_npo_rt_adds_retain_token_mean_nll():
    # two forget examples, ρ = 1 and ρ = 0; retain token NLLs: [1, 3] and [2] → token mean 6/3 = 2
    batch = LossInputs(
        policy={"completion": seq([[-2.0, -3.0], [-1.0]]), "retain": seq([[-1.0, -3.0], [-2.0]])},
        reference={"completion": seq([[-3.0, -3.0], [-1.0]]), "retain": seq([[0.0, 0.0], [0.0]])},
    )
    out = build(NPOConfig(beta=0.5, variant="npo_rt", c_npo=1.0, c_rt=0.5))(batch)
    npo = (4 * softplus(0.5) + 4 * softplus(0.0)) / 2
    assert out.losses.mean().item() == pytest.approx(npo + 0.5 * 2.0, rel=1e-12)
    assert out.metrics["retain/nll"].item() == pytest.approx(2.0)


def test_npo_kl_adds_reference_to_policy_kl_over_positions():
    # vocab 2. Policy logits [0, 0] → p = (½, ½); reference logits [ln 3, 0] → q = (¾, ¼).
    # KL(q‖p) = ¾·ln(3/2) + ¼·ln(1/2) = 0.13081204 at each real position.
    # Example 1: 2 real positions; example 2: 1 real position + 1 padding position (excluded).
    # Mean over the 3 real positions = 0.13081204. The forget term: ρ = 0 → 4·log 2 each (β = 0.5).
    kl_pos = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    p_logits = torch.zeros(2, 2, 2, dtype=torch.float64)
    q_logits = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(2, 2, 2).clone()
    q_logits[1, 1] = torch.tensor([50.0, -50.0])  # a padding position: would add a large KL if counted
    real = torch.tensor([[True, True], [True, False]])
    response = torch.tensor([[False, True], [True, False]])

    def retain(logits):
        lp = logits.log_softmax(-1)[..., 0] * response
        return SequenceLogps(token_logps=lp, mask=response, logits=logits, input_mask=real)

    batch = LossInputs(
        policy={"completion": seq([[-1.0], [-1.0]]), "retain": retain(p_logits)},
        reference={"completion": seq([[-1.0], [-1.0]]), "retain": retain(q_logits)},
    )
    out = build(NPOConfig(beta=0.5, variant="npo_kl"))(batch)
    assert out.metrics["retain/kl"].item() == pytest.approx(kl_pos, rel=1e-10)
    assert out.losses.mean().item() == pytest.approx(4 * math.log(2) + kl_pos, rel=1e-10)


def test_needs_follow_the_variant():
    assert build(NPOConfig()).needs.responses == ("completion",)
    assert build(NPOConfig(variant="npo_rt")).needs.responses == ("completion", "retain")
    kl = build(NPOConfig(variant="npo_kl")).needs
    assert kl.full_logits and kl.reference


def test_bad_variant():
    with pytest.raises(ValueError, match="loss.variant"):
        NPOConfig(variant="ga")


@pytest.mark.parametrize("pad", [0, 3])
def test_retain_kl_through_the_forward_does_not_depend_on_padding(pad):
    """#12.5: a retain row that fills the batch keeps all its positions. By hand from the models' own logits:
    KL(π_ref‖π_θ) = Σ_v q_v (log q_v − log p_v) at every position that predicts a token of the retain
    sequence (prompt and answer: positions 0 … len−2 of each row), averaged over those positions."""
    from model_helpers import collate, tiny_fp64

    from alignlab.forward import ForwardPlan

    policy, reference = tiny_fp64(0), tiny_fp64(1)
    rows = [
        {
            "prompt_ids": [9, 10],
            "completion_ids": [11],
            "retain_prompt_ids": [12, 13, 14],
            "retain_ids": [15, 16, 17, 18, 19, 20],
        },  # the longest sequence: it fills the batch
        {"prompt_ids": [21], "completion_ids": [22, 23], "retain_prompt_ids": [24], "retain_ids": [25, 26]},
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["retain_prompt_ids"] + row["retain_ids"]])
            log_p = policy(input_ids=ids).logits[0, :-1].log_softmax(-1)
            log_q = reference(input_ids=ids).logits[0, :-1].log_softmax(-1)
            total += (log_q.exp() * (log_q - log_p)).sum().item()
            count += ids.shape[1] - 1
    responses = ("completion", "retain")
    batch = collate(rows, responses, pad_to=None if not pad else 10 + pad)
    plan = ForwardPlan(responses, full_logits=True)
    inputs = LossInputs(
        policy=plan.fitted(policy)(policy, policy.get_output_embeddings(), batch),
        reference=plan.fitted(reference)(reference, reference.get_output_embeddings(), batch),
    )
    out = build(NPOConfig(variant="npo_kl"))(inputs)
    assert out.metrics["retain/kl"].item() == pytest.approx(total / count, rel=1e-10)
