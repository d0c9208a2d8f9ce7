"""The chunked-logits forward equals the dense one: log-probs, gradients, full-vocabulary KL."""

from __future__ import annotations

import pytest
import torch

from alignlab import builtin
from alignlab.chunked import LazyLogits, token_kl
from alignlab.forward import ForwardPlan

RESPONSES = ("chosen", "rejected")


@pytest.fixture(scope="module")
def models():
    tok = builtin.build_tokenizer()
    return builtin.build_model(len(tok), seed=0), builtin.build_model(len(tok), seed=1)


def _batch(seed=0, b=3, t=11, vocab=81):
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for r in RESPONSES:
        ids = torch.randint(3, vocab, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, -3:] = 0  # padding
        labels = ids.clone()
        labels[:, :4] = -100  # prompt
        labels[mask == 0] = -100
        batch.update({f"{r}_input_ids": ids, f"{r}_attention_mask": mask, f"{r}_labels": labels})
    return batch


def _plan(model, chunk_size, full_logits=False):
    return ForwardPlan(RESPONSES, full_logits, chunk_size=chunk_size).fitted(model)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_chunked_logps_and_gradients_match_dense(models, chunk):
    policy, _ = models
    batch = _batch()
    results = {}
    for size in (0, chunk):
        policy.zero_grad()
        out = _plan(policy, size)(policy, policy.get_output_embeddings(), batch)
        (out["chosen"].logps.sum() - 0.5 * out["rejected"].logps.sum()).backward()
        results[size] = (out, _grads(policy))
    dense, lazy = results[0], results[chunk]
    for r in RESPONSES:
        torch.testing.assert_close(lazy[0][r].token_logps, dense[0][r].token_logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lazy[0][r].mean_logit, dense[0][r].mean_logit, atol=1e-5, rtol=1e-5)
        assert torch.equal(lazy[0][r].mask, dense[0][r].mask)
    assert dense[1].keys() == lazy[1].keys()
    for name in dense[1]:
        torch.testing.assert_close(lazy[1][name], dense[1][name], atol=1e-5, rtol=1e-4)


def test_chunked_full_vocabulary_kl_matches_dense(models):
    policy, reference = models
    batch = _batch(seed=3)
    values = {}
    for size in (0, 3):
        policy.zero_grad()
        pol = _plan(policy, size, full_logits=True)(policy, policy.get_output_embeddings(), batch)
        with torch.no_grad():
            ref_plan = _plan(reference, size, full_logits=True)
            ref = ref_plan(reference, reference.get_output_embeddings(), batch)
        if size:
            assert isinstance(pol["chosen"].logits, LazyLogits)
        kl = (token_kl(ref["chosen"].logits, pol["chosen"].logits) * pol["chosen"].mask).sum()
        kl.backward()
        values[size] = (kl.detach(), _grads(policy))
    torch.testing.assert_close(values[3][0], values[0][0], atol=1e-5, rtol=1e-5)
    for name in values[0][1]:
        torch.testing.assert_close(values[3][1][name], values[0][1][name], atol=1e-5, rtol=1e-4)


def test_models_whose_logits_are_not_the_head_fall_back_to_dense(models):
    """E.g. final-logit soft-capping (Gemma 2): decided when the plan is fitted, then dense logits."""
    policy, _ = models

    class SoftCapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = SoftCapped(policy)
    batch = _batch(seed=5)
    plan = _plan(capped, 4)
    assert plan.chunk_size == 0 and _plan(policy, 4).chunk_size == 4
    out = plan(capped, policy.get_output_embeddings(), batch)
    with torch.no_grad():
        full = capped(
            input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]
        ).logits
    expected = (
        full[:, :-1].log_softmax(-1).gather(-1, batch["chosen_labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
    )
    expected = expected * (batch["chosen_labels"][:, 1:] != -100)
    torch.testing.assert_close(out["chosen"].token_logps.detach(), expected, atol=1e-5, rtol=1e-5)
