"""TRL 1.16's DPOTrainer as the oracle for the DPO variants alignlab has as options of `dpo`: its
`loss_type` values (sigmoid_norm, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down, discopop), f-DPO's
`f_divergence_type` and LD-DPO's `ld_alpha`. Same model and pairs, TRL's own tokenization and forward pass
(the pattern of tests/integration/test_trl_oracle.py). TRL's fused LM head returns float32 log-probs even
for a float64 model, which the squared (sppo_hard) and exponential (forward_kl) forms amplify past 1e-5; so
TRL's models get a float64 forward here that returns what the fused head returns (log-probs of the labels,
written with plain torch), and the two sides agree to ~1e-12: "same tokens and log-probs, same loss".
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_trl_oracle import _alignlab_loss, setup  # noqa: F401 (the fixture)

from alignlab.losses.combo import ComboConfig
from alignlab.losses.dpo import DPOConfig

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

CASES = [
    ("sigmoid_norm", dict(loss_type=["sigmoid_norm"]), DPOConfig(loss_type="sigmoid_norm")),
    ("exo_pair", dict(loss_type=["exo_pair"], label_smoothing=1e-3), DPOConfig(loss_type="exo_pair")),
    ("nca_pair", dict(loss_type=["nca_pair"]), DPOConfig(loss_type="nca_pair")),
    ("sppo_hard", dict(loss_type=["sppo_hard"]), DPOConfig(loss_type="sppo_hard")),
    ("apo_zero", dict(loss_type=["apo_zero"]), DPOConfig(loss_type="apo_zero")),
    ("apo_down", dict(loss_type=["apo_down"]), DPOConfig(loss_type="apo_down")),
    ("discopop", dict(loss_type=["discopop"]), DPOConfig(loss_type="discopop")),
    ("aot", dict(loss_type=["aot"]), DPOConfig(loss_type="aot")),
    (
        "aot_unpaired",
        dict(loss_type=["aot_unpaired"], label_smoothing=0.1),
        DPOConfig(loss_type="aot_unpaired", label_smoothing=0.1),
    ),
    (
        "forward_kl",
        dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
        DPOConfig(f_divergence="forward_kl"),
    ),
    (
        "js_divergence",
        dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
        DPOConfig(f_divergence="js_divergence"),
    ),
    (
        "alpha_divergence",
        dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
        DPOConfig(f_divergence="alpha_divergence", f_alpha_divergence_coef=0.3),
    ),
    (
        "js-hinge",
        dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
        DPOConfig(loss_type="hinge", f_divergence="js_divergence"),
    ),
    (
        "forward_kl-ipo",
        dict(loss_type=["ipo"], f_divergence_type="forward_kl"),
        DPOConfig(loss_type="ipo", ipo_length_normalize=True, f_divergence="forward_kl"),
    ),
    ("ld_dpo", dict(loss_type=["sigmoid"], ld_alpha=0.5), DPOConfig(ld_alpha=0.5)),
    ("ld_dpo-zero", dict(loss_type=["sigmoid"], ld_alpha=0.0), DPOConfig(ld_alpha=0.0)),
    ("wpo", dict(loss_type=["sigmoid"], use_weighting=True), DPOConfig(wpo=True)),
    (
        "wpo-ipo",
        dict(loss_type=["ipo"], use_weighting=True),
        DPOConfig(loss_type="ipo", ipo_length_normalize=True, wpo=True),
    ),
    # combo: TRL's loss_type list with loss_weights (MPO without its BCO term: TRL's bco_pair has no δ)
    (
        "combo-dpo-sft",
        dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 1.0]),
        ComboConfig(terms={"dpo": 0.8, "sft": 1.0}, term_options={}),
    ),
    (
        "combo-nca-rdpo",
        dict(loss_type=["nca_pair", "sigmoid"], loss_weights=[0.3, 0.7]),  # rDPO ε = 0 is DPO
        ComboConfig(
            terms={"dpo": 0.3, "rdpo": 0.7},
            term_options={"dpo": {"loss_type": "nca_pair"}, "rdpo": {"epsilon": 0.0}},
        ),
    ),
]


def _float64_fused_forward(model, dtype=torch.float64):
    """The fields of TRL's fused-head output that the DPO loss reads, from a plain float64 forward."""
    from types import SimpleNamespace

    hf_forward = type(model).forward

    def forward(input_ids=None, attention_mask=None, labels=None, fused_lm_head=True, **kwargs):
        kwargs.pop("use_cache", None)
        logits = hf_forward(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = labels[:, 1:]
        mask = targets != -100
        logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
        logps = logps.to(dtype)
        log_sum_sq = (torch.logsumexp(2 * logits[:, :-1].log_softmax(-1), -1) * mask).to(dtype)  # WPO's
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(
            log_probs=logps,
            entropy=zeros,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=zeros,
            is_top1=mask & False,
            aux_loss=None,
            loss=None,
        )

    model.forward = forward


def _trl_loss(setup, kwargs, tmp_path) -> float:  # noqa: F811 (the fixture's value)
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    tok, policy, reference, rows = setup
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]
    )
    args = TRLConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        per_device_train_batch_size=8,
        report_to="none",
        max_length=None,
        use_cpu=True,
        **kwargs,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=data,
        processing_class=tok,
    )
    # TRL's alpha-divergence clamps by dtype and knows no float64 (KeyError): float32 log-probs there
    dtype = torch.float32 if kwargs.get("f_divergence_type") == "alpha_divergence" else torch.float64
    _float64_fused_forward(trainer.model, dtype)
    _float64_fused_forward(trainer.ref_model, dtype)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


@pytest.mark.parametrize("kwargs, cfg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_loss_as_trl(setup, kwargs, cfg, tmp_path):  # noqa: F811 (the fixture)
    ours = _alignlab_loss(setup, cfg)
    theirs = _trl_loss(setup, kwargs, tmp_path)
    if "f_alpha_divergence_coef" in kwargs:  # float32 log-probs (above)
        tol = dict(rel=1e-5, abs=5e-5)
    elif "exo_pair" in kwargs["loss_type"]:  # TRL makes ε a float32 tensor: log(1 − ε), log ε rounded at 1e-8
        tol = dict(rel=1e-7)
    else:
        tol = dict(rel=1e-9, abs=1e-11)
    assert ours == pytest.approx(theirs, **tol)
