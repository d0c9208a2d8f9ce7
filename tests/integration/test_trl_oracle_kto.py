"""TRL as the oracle for KTO: `KTOTrainer._compute_loss` (``loss_type="kto"``) and alignlab's `kto` on the
same per-token log-probs give the same loss and the same gradients.

TRL computes the KTO loss inside `KTOTrainer._compute_loss`, not in a function of log-probs, so it is run
unbound on a stand-in trainer (the attributes it reads) and a stand-in model that returns fixed per-token
log-probs (TRL's ``outputs.log_probs``): the completions' with gradient, the mismatched (KL) ones, and
precomputed reference log-probs (``precompute_ref_logps``). alignlab gets the same per-token values as
`SequenceLogps`. Float64 on both sides; the tolerance 1e-9 is far below any real difference.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignlab.losses import build
from alignlab.losses.base import LossInputs, SequenceLogps
from alignlab.losses.kto import KL_COMPLETION, KTOConfig

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)
B, T = 6, 5  # examples, sequence length (T − 1 predicted positions)


class StandInModel:
    """Returns fixed per-token log-probs: the KL ones for the KL input ids, else the completions'."""

    def __init__(self, logps: torch.Tensor, kl_logps: torch.Tensor, kl_input_ids: torch.Tensor) -> None:
        self.logps, self.kl_logps, self.kl_input_ids = logps, kl_logps, kl_input_ids
        self.training = True

    def __call__(self, input_ids, **kwargs):
        logps = self.kl_logps if input_ids is self.kl_input_ids else self.logps
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)


def _trl_loss(cfg: KTOConfig, logps, kl_logps, ref_logps, ref_kl_logps, labels) -> torch.Tensor:
    ids = torch.ones(B, T, dtype=torch.long)
    kl_ids = torch.ones(B, T, dtype=torch.long)
    model = StandInModel(logps, kl_logps, kl_ids)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        calculate_KL=True,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    mask = torch.ones(B, T, dtype=torch.long)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": mask,
        "KL_completion_mask": mask,
        "label": labels,
        "ref_logps": ref_logps.sum(-1),
        "ref_KL_logps": ref_kl_logps.sum(-1),
    }
    return KTOTrainer._compute_loss(trainer, model, inputs, False), trainer._metrics["train"]


def _seq(values: torch.Tensor) -> SequenceLogps:
    return SequenceLogps(token_logps=values, mask=torch.ones_like(values, dtype=torch.bool))


@pytest.mark.parametrize(
    "cfg, kl_shift",
    [
        (KTOConfig(), 0.0),
        (KTOConfig(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8), 0.0),
        (KTOConfig(beta=0.2), 0.5),  # a positive KL estimate: z_ref > 0
        (KTOConfig(beta=0.2), -0.5),  # a negative one: clamped at 0
    ],
)
def test_loss_and_gradients_equal_trl(cfg, kl_shift):
    gen = torch.Generator().manual_seed(0)

    def logps():
        return -torch.rand(B, T - 1, generator=gen, dtype=torch.float64) * 3

    ref, ref_kl = logps(), logps()
    policy = (ref + torch.randn(B, T - 1, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
    policy_kl = ref_kl + kl_shift + torch.randn(B, T - 1, generator=gen, dtype=torch.float64) * 0.1
    labels = torch.tensor([True, False, True, True, False, False])

    want, metrics = _trl_loss(cfg, policy, policy_kl, ref, ref_kl, labels)
    (want_grad,) = torch.autograd.grad(want, policy)

    ours = policy.detach().clone().requires_grad_(True)
    batch = LossInputs(
        policy={"completion": _seq(ours), KL_COMPLETION: _seq(policy_kl)},
        reference={"completion": _seq(ref), KL_COMPLETION: _seq(ref_kl)},
        fields={"label": labels},
    )
    out = build(cfg)(batch)
    got = out.losses.mean()  # the trainer's one batch mean
    (got_grad,) = torch.autograd.grad(got, ours)

    torch.testing.assert_close(got, want.to(got.dtype), **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)
    # TRL's kl is unscaled (β·(ρ − kl)); alignlab's z_ref is β·kl
    assert out.metrics["kl"].item() == pytest.approx(cfg.beta * metrics["kl"][-1], rel=1e-9, abs=1e-12)
    if kl_shift < 0:
        assert out.metrics["kl"].item() == 0.0
    if kl_shift > 0:
        assert out.metrics["kl"].item() > 0
    for name in ("rewards/chosen", "rewards/rejected"):
        assert out.metrics[name].item() == pytest.approx(metrics[name][-1], rel=1e-9)
