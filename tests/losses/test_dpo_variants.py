"""The DPO variants of TRL 1.16's `loss_type`, f-DPO and LD-DPO (options of `dpo`) against hand-worked values.

Worked pair (as tests/losses/test_dpo.py): policy chosen (−2, −3), rejected four tokens of −2; reference
chosen (−3, −3), rejected (−1, −2, −2, −2). ρ(y_w) = 1, ρ(y_l) = −1, h = 2; |y_w| = 2, |y_l| = 4.
"""

import math

import pytest
from loss_helpers import pair_inputs, softplus

from alignlab.losses import build
from alignlab.losses.dpo import DPOConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0, -2.0, -2.0, -2.0]], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def loss_of(**cfg) -> float:
    return build(DPOConfig(**cfg))(pair_inputs(PC, PR, RC, RR)).losses.item()


S1 = sigmoid(1.0)
CASES = {
    # −log σ(β(ρ_w/|y_w| − ρ_l/|y_l|)) = softplus(−0.5·(0.5 + 0.25))
    "sigmoid_norm": ({"loss_type": "sigmoid_norm"}, softplus(-0.375)),
    # KL((σ(1), σ(−1)) ‖ (1 − ε, ε)), ε = 1e-3
    "exo_pair": (
        {"loss_type": "exo_pair"},
        S1 * (math.log(S1) - math.log(0.999)) + (1 - S1) * (math.log(1 - S1) - math.log(1e-3)),
    ),
    # −log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)
    "nca_pair": ({"loss_type": "nca_pair"}, softplus(-0.5) + 0.5 * softplus(0.5) + 0.5 * softplus(-0.5)),
    "sppo_hard": ({"loss_type": "sppo_hard"}, None),
    # (1 − σ(βρ_w)) + σ(βρ_l) = σ(−0.5) + σ(−0.5)
    "apo_zero": ({"loss_type": "apo_zero"}, 2 * sigmoid(-0.5)),
    # σ(βρ_w) + 1 − σ(β(ρ_w − ρ_l)) = σ(0.5) + σ(−1)
    "apo_down": ({"loss_type": "apo_down"}, sigmoid(0.5) + sigmoid(-1.0)),
    # z = βh = 1, w = σ(1/0.05): (1 − w)·softplus(−1) + w·e^{−1}
    "discopop": (
        {"loss_type": "discopop"},
        (1 - sigmoid(20.0)) * softplus(-1.0) + sigmoid(20.0) * math.exp(-1.0),
    ),
    # f'(u) = 1 − 1/u: h = (1 − e^{−1}) − (1 − e) = e − e^{−1}
    "forward_kl": ({"f_divergence": "forward_kl"}, softplus(-0.5 * (math.e - 1 / math.e))),
    # log 2 + log σ(ρ): h = log σ(1) − log σ(−1) = 1
    "js_divergence": ({"f_divergence": "js_divergence"}, softplus(-0.5)),
    # a = 0.5: (e^{−ρ/2} − 1)/(−1/2): h = 2(1 − e^{−1/2}) − 2(1 − e^{1/2})
    "alpha_divergence": (
        {"f_divergence": "alpha_divergence"},
        softplus(-0.5 * (2 * (1 - math.exp(-0.5)) - 2 * (1 - math.exp(0.5)))),
    ),
    # f-DPO with the length-normalised form, f'(ρ)/|y| (TRL): JS,
    # h = (log2 + log σ(1))/2 − (log2 + log σ(−1))/4
    "js_sigmoid_norm": (
        {"f_divergence": "js_divergence", "loss_type": "sigmoid_norm"},
        softplus(-0.5 * ((math.log(2) + math.log(S1)) / 2 - (math.log(2) + math.log(1 - S1)) / 4)),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_worked_example(name):
    cfg, expected = CASES[name]
    if expected is None:  # SPPO-hard at β = 0.25: (ρ_w − 2)² + (ρ_l + 2)² = 1 + 1
        assert loss_of(beta=0.25, **cfg) == pytest.approx(2.0, rel=1e-12)
        return
    assert loss_of(beta=0.5, **cfg) == pytest.approx(expected, rel=1e-12)


def test_reverse_kl_and_ld_alpha_one_are_dpo():
    dpo = loss_of(beta=0.5, f_divergence="reverse_kl", ld_alpha=1.0)
    assert dpo == pytest.approx(softplus(-1.0), rel=1e-12)


def test_sppo_hard_and_apo_at_their_optimum():
    # SPPO-hard is 0 at ρ_w = 1/(2β), ρ_l = −1/(2β): β = 0.5 puts the worked pair exactly there
    assert loss_of(beta=0.5, loss_type="sppo_hard") == pytest.approx(0.0, abs=1e-15)


def test_ld_dpo_weighs_the_tail_of_the_longer_response():
    # rejected policy (−2, −2, −2, −2), reference (−2, −2, −1, −1): per-token ρ (0, 0, −1, −1);
    # shared length 2.
    # DPO: ρ_l = −2, h = 3; LD-DPO α = 0.5: ρ_l = 0 + 0 + 0.5·(−1 − 1) = −1, h = 2
    rr = [[-2.0, -2.0, -1.0, -1.0]]
    dpo = build(DPOConfig(beta=0.5))(pair_inputs(PC, PR, RC, rr)).losses.item()
    batch = pair_inputs(PC, PR, RC, rr, requires_grad=True)
    out = build(DPOConfig(beta=0.5, ld_alpha=0.5))(batch)
    assert dpo == pytest.approx(softplus(-1.5), rel=1e-12)
    assert out.losses.item() == pytest.approx(softplus(-1.0), rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.5)  # β·ρ_l with the LD weights
    out.losses.sum().backward()
    g = 0.5 * sigmoid(-1.0)  # ∂/∂ρ_l of softplus(−β(ρ_w − ρ_l)) = β σ(−βh)
    grad = batch.policy["rejected"].token_logps.grad[0].tolist()
    assert grad == pytest.approx([g, g, g / 2, g / 2], rel=1e-12)


def test_ld_alpha_zero_drops_the_tail():
    rr = [[-2.0, -2.0, -1.0, -1.0]]  # ρ_l over the shared two tokens: 0, so h = 1
    got = build(DPOConfig(beta=0.5, ld_alpha=0.0))(pair_inputs(PC, PR, RC, rr)).losses.item()
    assert got == pytest.approx(softplus(-0.5), rel=1e-12)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"loss_type": "nca_pair", "f_divergence": "js_divergence"}, "log Z"),
        ({"f_divergence": "chi2"}, "loss.f_divergence"),
        ({"f_divergence": "alpha_divergence", "f_alpha_divergence_coef": 1.0}, "reverse_kl"),
        ({"loss_type": "exo_pair", "exo_epsilon": 0.0}, "exo_epsilon"),
        ({"ld_alpha": 1.5}, "ld_alpha"),
        ({"discopop_tau": 0.0}, "discopop_tau"),
        ({"loss_type": "sppo_hard", "label_smoothing": 0.1}, "sigmoid only"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**cfg)


def _wpo_pair(requires_grad=False):
    """chosen: two tokens, logits (log 3, 0) each and token 0 (p = 0.75, Σp² = 0.625); rejected: one token,
    logits (0, 0), p = 0.5 (Σp² = 0.5). Reference log-probs 0.5 below (chosen) / 1 above (rejected) the
    policy's per token: ρ_w = 1, ρ_l = −1, h = 2."""
    import torch

    from alignlab.losses.base import LossInputs, SequenceLogps

    def seq(logits, tokens, grad):
        logits = torch.tensor([logits], dtype=torch.float64)
        logps = logits.log_softmax(-1)[0, range(len(tokens)), tokens][None].clone().requires_grad_(grad)
        return SequenceLogps(token_logps=logps, mask=torch.ones_like(logps, dtype=torch.bool), logits=logits)

    chosen = seq([[math.log(3), 0.0]] * 2, [0, 0], requires_grad)
    rejected = seq([[0.0, 0.0]], [0], requires_grad)
    ref_chosen = SequenceLogps(chosen.token_logps.detach() - 0.5, chosen.mask)
    ref_rejected = SequenceLogps(rejected.token_logps.detach() + 1.0, rejected.mask)
    return LossInputs(
        policy={"chosen": chosen, "rejected": rejected},
        reference={"chosen": ref_chosen, "rejected": ref_rejected},
    )


def test_wpo_weights_the_pair_loss():
    # w(y_w) = exp(mean_t log(0.75/0.625)) = 1.2; w(y_l) = exp(log(0.5/0.5)) = 1: loss 1.2·softplus(−βh)
    batch = _wpo_pair(requires_grad=True)
    out = build(DPOConfig(beta=0.5, wpo=True))(batch)
    assert out.losses.item() == pytest.approx(1.2 * softplus(-1.0), rel=1e-12)
    assert out.metrics["wpo/weight"].item() == pytest.approx(1.2, rel=1e-12)
    out.losses.sum().backward()  # the weights carry no gradient: 1.2 × DPO's −β σ(−βh) per chosen token
    g = -1.2 * 0.5 * sigmoid(-1.0)
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([g, g], rel=1e-12)
    assert build(DPOConfig(wpo=True)).needs.full_logits and not build(DPOConfig()).needs.full_logits


def test_aot_pairs_sorted_margins_by_rank():
    # two pairs: policy margins S_w − S_l = (−5 + 8, −1 + 1) = (3, 0), reference margins (1, −1).
    # sorted policy (0, 3) against sorted reference (−1, 1): δ = (1, 2); pair 2 has rank 1, pair 1 rank 2.
    # β = 0.5: pair 1 gets softplus(−1), pair 2 softplus(−0.5)
    batch = pair_inputs(
        [[-2.0, -3.0], [-1.0]],
        [[-2.0] * 4, [-1.0]],
        [[-3.0, -3.0], [-2.0]],
        [[-1.0, -2.0, -2.0, -2.0], [-1.0]],
    )
    loss = build(DPOConfig(beta=0.5, loss_type="aot"))
    assert loss(batch).losses.tolist() == pytest.approx([softplus(-1.0), softplus(-0.5)], rel=1e-12)
    assert loss.per_batch_state  # it couples the examples of a batch


def test_aot_unpaired_sorts_each_side():
    # pair 1: ρ_w = 1, ρ_l = −1; pair 2: chosen −1 against −2, ρ_w = 1; rejected −1 against −4, ρ_l = 3.
    # sorted ρ_w (1, 1), sorted ρ_l (−1, 3): δ = (2, −2), ε = 0.1; ρ_w ties, so only the multiset is fixed.
    batch = pair_inputs(
        [[-2.0, -3.0], [-1.0]],
        [[-2.0] * 4, [-1.0]],
        [[-3.0, -3.0], [-2.0]],
        [[-1.0, -2.0, -2.0, -2.0], [-4.0]],
    )
    losses = build(DPOConfig(beta=0.5, loss_type="aot_unpaired", label_smoothing=0.1))(batch).losses
    expected = sorted(
        [0.9 * softplus(-1.0) + 0.1 * softplus(1.0), 0.9 * softplus(1.0) + 0.1 * softplus(-1.0)]
    )
    assert sorted(losses.tolist()) == pytest.approx(expected, rel=1e-12)
    assert losses.mean().item() == pytest.approx(sum(expected) / 2, rel=1e-12)


# DPOP (Pal et al. 2024, eq. 3): −log σ(β(ρ_w − ρ_l − λ·max(0, log πref(y_w) − log πθ(y_w)))).
# Worked pair with the chosen response *less* likely than under the reference: policy chosen (−3, −3),
# reference (−2, −3): ρ_w = −1, penalty max(0, 1) = 1; rejected policy four tokens of −2, reference
# (0, −2, −2, −2): ρ_l = −2; h = 1.
DPOP_PAIR = ([[-3.0, -3.0]], PR, [[-2.0, -3.0]], [[0.0, -2.0, -2.0, -2.0]])


@pytest.mark.parametrize("lam", [0.0, 2.0, 50.0])
def test_dpop_worked_example(lam):
    out = build(DPOConfig(beta=0.5, loss_type="dpop", dpop_lambda=lam))(pair_inputs(*DPOP_PAIR))
    # inside β and the sigmoid: softplus(−β(h − λ·1)) = softplus(−0.5·(1 − λ))
    assert out.losses.item() == pytest.approx(softplus(-0.5 * (1 - lam)), rel=1e-12)
    assert out.metrics["dpop/penalty"].item() == pytest.approx(1.0)


def test_dpop_default_lambda_is_the_papers_and_gradient_through_the_penalty():
    assert DPOConfig().dpop_lambda == 50.0
    batch = pair_inputs(*DPOP_PAIR, requires_grad=True)
    out = build(DPOConfig(beta=0.1, loss_type="dpop"))(batch)
    z = 0.1 * (1 - 50.0)
    assert out.losses.item() == pytest.approx(softplus(-z), rel=1e-12)
    out.losses.sum().backward()
    # ∂/∂ρ_w of softplus(−β(ρ_w − ρ_l + λρ_w)) (ρ_w < 0) = −β(1 + λ)·σ(−z), on each chosen token
    g = -0.1 * 51 * sigmoid(-z)
    assert batch.policy["chosen"].token_logps.grad[0].tolist() == pytest.approx([g, g], rel=1e-12)


def test_dpop_without_penalty_is_dpo():
    # the first worked pair has ρ_w = 1 > 0: no penalty, DPO's loss whatever λ
    assert loss_of(beta=0.5, loss_type="dpop", dpop_lambda=50.0) == pytest.approx(softplus(-1.0), rel=1e-12)


def test_dpop_is_a_registry_case():
    from registry_cases import CASES

    assert CASES["dpo-loss_type=dpop"] == ("dpo", {"loss_type": "dpop"})


def test_dpop_lambda_must_be_non_negative():
    with pytest.raises(ValueError, match="dpop_lambda"):
        DPOConfig(loss_type="dpop", dpop_lambda=-1.0)
