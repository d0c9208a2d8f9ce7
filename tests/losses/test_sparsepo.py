"""SparsePO (spec part 2 §2): the loss on hand-made masks, the identity with TDPO₁, MaPO's mask."""

import math

import pytest
import torch

from alignlab import builtin
from alignlab.losses import build
from alignlab.losses.base import LossInputs, SequenceLogps
from alignlab.losses.sparsepo import SparsePOConfig, activation_mask
from alignlab.losses.tdpo import TDPOConfig
from loss_helpers import softplus

LN3 = math.log(3.0)


def response(rows: list[list[list[float]]], tokens: list[list[int]], grad=False) -> SequenceLogps:
    z = torch.tensor(rows, dtype=torch.float64, requires_grad=grad)  # (B, T, V)
    logp = z.log_softmax(-1).gather(-1, torch.tensor(tokens)[..., None])[..., 0]
    mask = torch.ones(logp.shape, dtype=torch.bool)
    return SequenceLogps(token_logps=logp * mask, mask=mask, logits=z, input_mask=mask)


def two_token_pair(grad=False) -> LossInputs:
    return LossInputs(
        policy={"chosen": response([[[0.0, 0.0], [1.0, 0.0]]], [[0, 0]], grad),
                "rejected": response([[[0.0, LN3], [0.0, 2.0]]], [[1, 0]], grad)},
        reference={"chosen": response([[[LN3, 0.0], [0.0, 0.0]]], [[0, 0]]),
                   "rejected": response([[[0.0, 0.0], [0.0, 0.0]]], [[1, 0]])},
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
    loss = _with_masks(build(SparsePOConfig(beta=0.5, independent_masks=True, lambda_u=0.01, lambda_d=0.02)),
                       first, kl_first)
    d_w, d_l = math.log(0.5 / 0.75), math.log(0.75 / 0.5)
    kl_w = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_l = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    expected = softplus(-0.5 * (d_w - d_l - (kl_l - kl_w))) + 0.01 * 2 + 0.02 * 2
    assert loss(two_token_pair()).losses.item() == pytest.approx(expected, rel=1e-10)


def test_common_mask_halves_the_l1_weights():
    half = {n: torch.tensor([[0.5, 0.0]], dtype=torch.float64) for n in ("chosen", "rejected")}
    base = _with_masks(build(SparsePOConfig(beta=0.5)), half, half)(two_token_pair()).losses.item()
    reg = _with_masks(build(SparsePOConfig(beta=0.5, lambda_u=0.1, lambda_d=0.3)), half, half)(two_token_pair())
    # ½·(0.1·0.5 + 0.3·0.5) per response, two responses
    assert reg.losses.item() == pytest.approx(base + 2 * 0.5 * (0.1 * 0.5 + 0.3 * 0.5), rel=1e-10)


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


@pytest.mark.parametrize("mask, independent", [("activation", False), ("learned", False), ("learned", True)])
def test_hooks_on_a_real_model_give_masks_and_gradients(mask, independent):
    tok = builtin.build_tokenizer()
    reference = builtin.build_model(len(tok), seed=0).eval()
    loss = build(SparsePOConfig(mask=mask, independent_masks=independent, lambda_u=0.01 if mask == "learned" else 0.0))
    loss.attach(reference)
    ids = torch.randint(6, len(tok), (4, 6))
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[:, :-1].double()
    response = torch.zeros(2, 5, dtype=torch.bool)
    response[:, 2:] = True

    def seqs(z, grad):
        z = z.clone().requires_grad_(grad)
        return {n: SequenceLogps(token_logps=z[i:i + 2].log_softmax(-1)[..., 0] * response, mask=response,
                                 logits=z[i:i + 2], input_mask=torch.ones_like(response))
                for n, i in (("chosen", 0), ("rejected", 2))}

    out = loss(LossInputs(policy=seqs(logits + 0.1, True), reference=seqs(logits, False)))
    assert torch.isfinite(out.losses).all() and "Weights/chosen_sparsity" in out.metrics
    if mask == "learned":
        out.losses.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.heads.parameters())
        assert loss.param_groups()[0]["weight_decay"] == 0.01
