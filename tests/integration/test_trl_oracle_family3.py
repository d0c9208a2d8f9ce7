"""TRL 1.16 as the oracle for the loss family III methods it implements: the same model and the same
tokens give the same loss and the same gradients.

TRL's experimental CPO trainer (``loss_type`` sigmoid | hinge | ipo | simpo, ``alpha`` = AlphaPO's
reward shape, ``cpo_alpha`` = the NLL weight) and ORPO trainer tokenize the rows themselves; alignlab is
given exactly the tokens of TRL's batch (prompt = the label-masked tokens, response = the labelled ones),
so the comparison is about the math. Both sides run the same float64 model and take log-softmax in
float64 (TRL's experimental trainers compute log-probs from the full logits), so they agree to ~1e-12;
the tolerance 1e-9 is far below any real difference (a wrong constant or reduction moves these by 1e-3).
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
from alignlab.losses.cpo import CPOConfig
from alignlab.losses.orpo import ORPOConfig
from alignlab.losses.simpo import SimPOConfig

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

TOL = dict(rel=1e-9, abs=1e-10)


@pytest.fixture(scope="module")
def setup():
    tok = builtin.build_tokenizer()
    reference = builtin.build_model(len(tok), seed=0).double().eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a model away from its initialisation, so that no term is at a symmetric point
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    rows = builtin.sentiment_pairs(8, seed=3)
    return tok, policy.eval(), rows


def _data(rows):
    from datasets import Dataset

    # TRL joins prompt and completion as strings: give the completions their separating space.
    return Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]
    )


def _examples_from_trl_batch(batch) -> list[dict]:
    """alignlab's rows from TRL's batch: prompt = attended, unlabelled tokens; response = labelled ones."""
    examples = []
    for i in range(batch["chosen_input_ids"].shape[0]):
        ex = {}
        for name in ("chosen", "rejected"):
            ids, labels = batch[f"{name}_input_ids"][i], batch[f"{name}_labels"][i]
            attended = batch[f"{name}_attention_mask"][i].bool()
            prompt = ids[attended & (labels == -100)].tolist()
            assert ex.setdefault("prompt_ids", prompt) == prompt, "chosen and rejected must share the prompt"
            ex[f"{name}_ids"] = ids[labels != -100].tolist()
        examples.append(ex)
    return examples


def _ours(policy, examples, pad_id, loss_cfg):
    """alignlab's batch loss (the per-example losses' mean, as `trainer.reduce_loss`) and its gradients."""
    model = copy.deepcopy(policy)
    batch = PreferenceCollator(pad_id)(examples)
    inputs = LossInputs(policy=concatenated_forward(model, batch, ("chosen", "rejected")))
    loss = build(loss_cfg)(inputs).losses.mean()
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


def _theirs(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), [p.grad for p in trainer.model.parameters()], batch


def _compare(setup, trainer, loss_cfg):
    tok, policy, _ = setup
    theirs, their_grads, batch = _theirs(trainer)
    ours, our_grads = _ours(policy, _examples_from_trl_batch(batch), tok.pad_token_id, loss_cfg)
    assert ours == pytest.approx(theirs, **TOL)
    for g, w in zip(our_grads, their_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11)


def _cpo_trainer(setup, tmp_path, **kwargs):
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer

    tok, policy, rows = setup
    args = TRLCPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        max_length=512,
        **kwargs,
    )
    return CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=_data(rows), processing_class=tok)


SIMPO_CASES = [
    ("simpo", dict(beta=2.0, simpo_gamma=0.5), SimPOConfig(beta=2.0, gamma=0.5)),
    (
        "simpo-smoothed",
        dict(beta=2.5, simpo_gamma=1.0, label_smoothing=0.2),
        SimPOConfig(beta=2.5, gamma=1.0, label_smoothing=0.2),
    ),
    ("alphapo", dict(beta=2.0, simpo_gamma=0.5, alpha=0.25), SimPOConfig(beta=2.0, gamma=0.5, alpha=0.25)),
    (
        "simpo-sft",
        dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3),
        SimPOConfig(beta=2.0, gamma=0.5, sft_weight=0.3),
    ),
]


@pytest.mark.parametrize("kwargs, cfg", [c[1:] for c in SIMPO_CASES], ids=[c[0] for c in SIMPO_CASES])
def test_simpo_same_loss_and_gradients_as_trl_cpo_trainer(setup, tmp_path, kwargs, cfg):
    # TRL's CPOTrainer with loss_type=simpo: cpo_alpha (its NLL weight, default 1) is SimPO's sft_weight
    trainer = _cpo_trainer(setup, tmp_path, loss_type="simpo", **{"cpo_alpha": 0.0, **kwargs})
    _compare(setup, trainer, cfg)


CPO_CASES = [
    ("sigmoid", dict(beta=0.1), CPOConfig(beta=0.1)),
    (
        "sigmoid-smoothed",
        dict(beta=0.2, label_smoothing=0.1, cpo_alpha=0.5),
        CPOConfig(beta=0.2, label_smoothing=0.1, nll_weight=0.5),
    ),
    ("hinge", dict(beta=0.1, loss_type="hinge"), CPOConfig(beta=0.1, loss_type="hinge")),
    ("ipo", dict(beta=0.1, loss_type="ipo"), CPOConfig(beta=0.1, loss_type="ipo")),
    ("alpha", dict(beta=0.1, alpha=0.01), CPOConfig(beta=0.1, alpha=0.01)),
]


@pytest.mark.parametrize("kwargs, cfg", [c[1:] for c in CPO_CASES], ids=[c[0] for c in CPO_CASES])
def test_cpo_same_loss_and_gradients_as_trl(setup, tmp_path, kwargs, cfg):
    _compare(setup, _cpo_trainer(setup, tmp_path, **kwargs), cfg)


def test_orpo_odds_ratio_term_same_as_trl(setup, tmp_path):
    """TRL's ORPO NLL also counts the prompt tokens (alignlab's is over the response, docs/losses.md), so the
    odds-ratio term is compared: TRL's own forward and `odds_ratio_loss` against alignlab's loss minus its
    chosen NLL, written here from the token log-probs. Loss and gradients."""
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer

    tok, policy, rows = setup
    lam = 0.25
    args = TRLORPOConfig(
        output_dir=str(tmp_path),
        beta=lam,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        max_length=512,
    )
    trainer = ORPOTrainer(
        model=copy.deepcopy(policy), args=args, train_dataset=_data(rows), processing_class=tok
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    chosen_logps, rejected_logps = trainer.concatenated_forward(trainer.model, batch)[:2]
    theirs = -trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
    theirs.backward()

    model = copy.deepcopy(policy)
    collated = PreferenceCollator(tok.pad_token_id)(_examples_from_trl_batch(batch))
    inputs = LossInputs(policy=concatenated_forward(model, collated, ("chosen", "rejected")))
    chosen = inputs.policy["chosen"]
    nll = -chosen.token_logps[chosen.mask].sum() / chosen.mask.sum()  # the batch token mean, by hand
    ours = build(ORPOConfig(lam=lam))(inputs).losses.mean() - nll
    ours.backward()
    # TRL's odds_ratio_loss casts the log-probs to float32 (`.float()`): its side rounds at ~1e-8 relative
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for g, w in zip([p.grad for p in model.parameters()], [p.grad for p in trainer.model.parameters()]):
        # float32 rounding of TRL's log-probs: within 1e-6 of each gradient tensor's largest entry
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * w.abs().max().item())
