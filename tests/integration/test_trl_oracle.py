"""TRL's DPOTrainer as the oracle for the losses it shares: the same model and pairs give the same loss.

TRL 1.x computes DPO, IPO (token-averaged), hinge and robust (rDPO) on its own tokenization and
forward pass; alignlab must agree with it at step 0 (policy = reference is avoided by perturbing the
policy, so the loss is not a constant ln 2). The models are float64, so alignlab's side is exact; TRL's
fused head returns float32 log-probs even then (checked), which puts its loss ~1.5e-5 from the exact
value here: the tolerance is that rounding, not a difference in the math (a wrong sign, constant or
reduction moves these losses by 1e-2 or more).
"""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab import builtin
from alignlab.data import PreferenceCollator
from alignlab.forward import concatenated_forward
from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.dpo import DPOConfig
from alignlab.losses.rdpo import RDPOConfig

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

CASES = [
    ("sigmoid", 0.0, DPOConfig(beta=0.1)),
    ("hinge", 0.0, DPOConfig(beta=0.1, loss_type="hinge")),
    ("ipo", 0.0, DPOConfig(beta=0.1, loss_type="ipo", ipo_length_normalize=True)),
    ("robust", 0.2, RDPOConfig(beta=0.1, epsilon=0.2)),
]


@pytest.fixture(scope="module")
def setup():
    tok = builtin.build_tokenizer()
    # float64, so that the comparison is about the math, not about float32 summation order
    reference = builtin.build_model(len(tok), seed=0).double().eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = builtin.sentiment_pairs(8, seed=3)
    return tok, policy, reference, rows


def _alignlab_loss(setup, loss_cfg) -> float:
    tok, policy, reference, rows = setup
    examples = []
    for r in rows:
        ex = {"prompt_ids": tok(r["prompt"])["input_ids"]}
        for name in ("chosen", "rejected"):
            ex[f"{name}_ids"] = tok(r[name], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append(ex)
    batch = PreferenceCollator(tok.pad_token_id)(examples)
    loss = build(loss_cfg)
    with torch.no_grad():  # the full logits when the loss reads them (DPO's WPO weights)
        pol = concatenated_forward(
            policy.eval(), batch, ("chosen", "rejected"), loss.needs.full_logits, chunk_size=4
        )
        ref = concatenated_forward(reference, batch, ("chosen", "rejected"))
    return loss(LossInputs(policy=pol, reference=ref)).losses.mean().item()


def _trl_loss(setup, loss_type, label_smoothing, tmp_path) -> float:
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    tok, policy, reference, rows = setup
    # TRL joins prompt and completion as strings: give the completions their separating space.
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]
    )
    args = TRLConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        per_device_train_batch_size=8,
        report_to="none",
        max_length=None,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=data,
        processing_class=tok,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


@pytest.mark.parametrize("loss_type, label_smoothing, cfg", CASES, ids=[c[0] for c in CASES])
def test_same_loss_as_trl(setup, loss_type, label_smoothing, cfg, tmp_path):
    ours = _alignlab_loss(setup, cfg)
    theirs = _trl_loss(setup, loss_type, label_smoothing, tmp_path)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=5e-5)
