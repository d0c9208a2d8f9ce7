"""SparsePO (spec part 2 §2): the loss on hand-made masks, the identity with TDPO₁, MaPO's mask."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import softplus
from model_helpers import collate, random_rows, tiny_fp64

from alignlab.forward import ForwardPlan
from alignlab.losses import build
from alignlab.losses.base import LossInputs, SequenceLogps
from alignlab.losses.sparsepo import ACTIVATION_HOOKS, SparsePOConfig, activation_mask
from alignlab.losses.tdpo import TDPOConfig

LN3 = math.log(3.0)


def response(rows: list[list[list[float]]], tokens: list[list[int]], grad=False) -> SequenceLogps:
    z = torch.tensor(rows, dtype=torch.float64, requires_grad=grad)  # (B, T, V)
    logp = z.log_softmax(-1).gather(-1, torch.tensor(tokens)[..., None])[..., 0]
    mask = torch.ones(logp.shape, dtype=torch.bool)
    return SequenceLogps(token_logps=logp * mask, mask=mask, logits=z, input_mask=mask)


def two_token_pair(grad=False) -> LossInputs:
    return LossInputs(
        policy={
            "chosen": response([[[0.0, 0.0], [1.0, 0.0]]], [[0, 0]], grad),
            "rejected": response([[[0.0, LN3], [0.0, 2.0]]], [[1, 0]], grad),
        },
        reference={
            "chosen": response([[[LN3, 0.0], [0.0, 0.0]]], [[0, 0]]),
            "rejected": response([[[0.0, 0.0], [0.0, 0.0]]], [[1, 0]]),
        },
    )


def _with_masks(loss, reward, kl):
    loss._masks = lambda batch: (reward, kl)
    return loss


def test_all_ones_masks_equal_tdpo1():
    ones = {n: torch.ones(1, 2, dtype=torch.float64) for n in ("chosen", "rejected")}
    sparse = _with_masks(build(SparsePOConfig(mask="activation", beta=0.5)), ones, ones)(two_token_pair())
    tdpo1 = build(TDPOConfig(beta=0.5, variant="tdpo1"))(two_token_pair())
    assert sparse.losses.item() == pytest.approx(tdpo1.losses.item(), rel=1e-12)


def test_masked_loss_by_hand():
    """Mask the second token of every response out of the reward and keep the KL on the first only.

    Chosen, token 1: Δ = ln ½ − ln ¾; KL(q‖p), q = (¾, ¼), p = (½, ½): ¾ ln 1.5 + ¼ ln ½.
    Rejected, token 1: Δ = ln ¾ − ln ½; KL(q‖p), q = (½, ½), p = (¼, ¾): ½ ln 2 + ½ ln ⅔.
    L = softplus(−β·[Δ_w − Δ_l − (KL_l − KL_w)]) + λ_u·(‖m_w‖₁ + ‖m_l‖₁) + λ_d·(…), independent masks.
    """
    first = {n: torch.tensor([[1.0, 0.0]], dtype=torch.float64) for n in ("chosen", "rejected")}
    kl_first = {n: torch.tensor([[1.0, 0.0]], dtype=torch.float64) for n in ("chosen", "rejected")}
    loss = _with_masks(
        build(SparsePOConfig(beta=0.5, independent_masks=True, lambda_u=0.01, lambda_d=0.02)), first, kl_first
    )
    d_w, d_l = math.log(0.5 / 0.75), math.log(0.75 / 0.5)
    kl_w = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_l = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    expected = softplus(-0.5 * (d_w - d_l - (kl_l - kl_w))) + 0.01 * 2 + 0.02 * 2
    assert loss(two_token_pair()).losses.item() == pytest.approx(expected, rel=1e-10)


def test_activation_mask_by_hand():
    # One hook type, one tensor, response = last 3 of 4 positions with means [9, 1, 2, 4]:
    # over the response: mean 7/3, z-scores then min-max → (x − 1)/(4 − 1) = [0, 1/3, 1]; 0 outside.
    acts = {"mlp": [torch.tensor([[9.0, 1.0, 2.0, 4.0]])]}
    response = torch.tensor([[False, True, True, True]])
    assert activation_mask(acts, response)[0].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1.0])


def test_activation_mask_never_nan():
    response = torch.tensor([[False, True, False], [False, True, True]])
    acts = {"mlp": [torch.tensor([[1.0, 5.0, 2.0], [3.0, 7.0, 7.0]])]}  # a one-token and a constant response
    mask = activation_mask(acts, response)
    assert torch.isfinite(mask).all() and mask.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]


# -- against a transcription of the official code, through alignlab's forward pass ------------------
#: ForwardPlan.of switches (logit_chunk_size, skip_unused_logits, padding_free, prefix_sharing)
SWITCHES = {
    "dense": (0, False, False, False),
    "chunked": (3, True, False, False),
    "padding_free": (3, True, True, False),
    "prefix_sharing": (3, True, False, True),
}


def _pairs(vocab: int, b: int = 3):
    return collate(random_rows(("chosen", "rejected"), vocab, b=b, seed=5), ("chosen", "rejected"))


def _head_by_hand(head, states):
    """The official `simple_all` mask model from the head's weights: LayerNorm → per layer Linear(H,1)+ReLU →
    Linear(L,1, no bias)+ReLU (SparsePO `src/masks/mask_models.py`)."""
    per_layer = []
    for h, lin in zip(states, head.per_layer):
        normed = F.layer_norm(h, h.shape[-1:], head.norm.weight, head.norm.bias, head.norm.eps)
        per_layer.append(torch.relu(normed @ lin.weight.T + lin.bias))
    return torch.relu(torch.cat(per_layer, -1) @ head.mix.weight.T)[..., 0]


def _mapo_mask_by_hand(reference, ids, attn, response):
    """MaPO (`mapo_trainer.py`): each hooked tensor's hidden mean at the positions that predict the response
    tokens (`[:, :-1]`), z-scored then min-max rescaled over the response (= min-max of the raw means)."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in reference.named_modules():
        for kind, pattern in ACTIVATION_HOOKS.items():
            if re.search(pattern, name):

                def keep(mod, args, out, kind=kind):
                    t = out[0] if isinstance(out, tuple) else out
                    captured.setdefault(kind, []).append(t.mean(-1)[:, :-1])

                hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        reference(input_ids=ids, attention_mask=attn)
    for h in hooks:
        h.remove()
    big = torch.finfo(torch.float64).max
    per_kind = []
    for tensors in captured.values():
        maps = []
        for t in tensors:
            low = torch.where(response, t, big).amin(-1, keepdim=True)
            high = torch.where(response, t, -big).amax(-1, keepdim=True)
            # the official code gives 0/0 = NaN for a one-token or constant response; alignlab 1 (documented)
            maps.append(torch.where(high > low, (t - low) / (high - low), torch.ones_like(t)) * response)
        per_kind.append(torch.stack(maps).mean(0))
    return torch.stack(per_kind).mean(0)


def _official_loss(cfg, heads, policy, reference, batch):
    """SparsePO's loss per pair, transcribed from `sparse_trainer.py` / `mapo_trainer.py`, one response at
    a time on the padded batch, with the model's own logits."""
    u, d, l1 = {}, {}, {}
    for r in ("chosen", "rejected"):
        ids, attn, labels = batch[f"{r}_input_ids"], batch[f"{r}_attention_mask"], batch[f"{r}_labels"]
        response = labels[:, 1:] != -100
        targets = labels[:, 1:].clamp(min=0)[..., None]
        pol = policy(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
        with torch.no_grad():
            out = reference(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        ref = out.logits[:, :-1].log_softmax(-1)
        delta = (pol.gather(-1, targets) - ref.gather(-1, targets))[..., 0] * response
        kl = (ref.exp() * (ref - pol)).sum(-1) * response
        if cfg.mask == "learned":
            states = [h[:, :-1] for h in out.hidden_states[1:]]
            m_u = _head_by_hand(heads["common" if "common" in heads else "reward"], states) * response
            m_d = m_u if "common" in heads else _head_by_hand(heads["kl"], states) * response
        else:
            m_u = m_d = _mapo_mask_by_hand(reference, ids, attn, response)
        u[r], d[r] = (m_u * delta).sum(-1), (m_d * kl).sum(-1)
        halve = 0.5 if "kl" not in heads else 1.0  # one common mask: λ_u and λ_d halved
        l1[r] = halve * (cfg.lambda_u * m_u.abs().sum(-1) + cfg.lambda_d * m_d.abs().sum(-1))
    logits = u["chosen"] - u["rejected"] - (d["rejected"] - d["chosen"])
    return F.softplus(-cfg.beta * logits) + l1["chosen"] + l1["rejected"]


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("mask, independent", [("learned", False), ("learned", True), ("activation", False)])
def test_loss_and_gradients_equal_the_official_code(mask, independent, switch):
    """Common learned masks halve λ (#12.1), masks read the predicting position (#12.2) of
    `hidden_states[1:]`, the last after the final norm (#12.3), and every forward switch gives the same
    (#12.4)."""
    policy, reference = tiny_fp64(0), tiny_fp64(1)
    reference.eval().requires_grad_(False)
    lam = dict(lambda_u=0.1, lambda_d=0.3) if mask == "learned" else {}
    cfg = SparsePOConfig(mask=mask, independent_masks=independent, beta=0.5, **lam)
    loss = build(cfg)
    loss.build_heads(
        policy.config.hidden_size, policy.config.num_hidden_layers
    ) if mask == "learned" else None
    loss.double()
    batch = _pairs(policy.config.vocab_size)

    want = _official_loss(cfg, loss.heads, policy, reference, batch)
    params = [*policy.parameters(), *loss.heads.parameters()]
    want_grads = torch.autograd.grad(want.sum(), params, allow_unused=True)

    chunk, skip, packed, shared = SWITCHES[switch]
    plan = ForwardPlan.of(
        loss.needs,
        logit_chunk_size=chunk,
        skip_unused_logits=skip,
        padding_free=packed,
        prefix_sharing=shared,
    )
    assert plan.full_logits and plan.responses == ("chosen", "rejected")
    pol = plan.fitted(policy)(policy, policy.get_output_embeddings(), batch)
    with torch.no_grad():
        ref = plan.fitted(reference, reference=True)(reference, reference.get_output_embeddings(), batch)
    got = loss(LossInputs(policy=pol, reference=ref)).losses
    got_grads = torch.autograd.grad(got.sum(), params, allow_unused=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
