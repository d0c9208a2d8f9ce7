"""SFT: the token-mean NLL of the chosen responses over the batch (HF's causal-LM loss)."""

import pytest
from loss_helpers import seq

from alignlab.losses import build
from alignlab.losses.base import LossInputs
from alignlab.losses.sft import SFTConfig


def test_token_mean_nll_of_the_chosen_responses():
    # 2 + 3 = 5 response tokens with NLL 1, 2 | 3, 4, 5: token mean 15 / 5 = 3, not the mean of the
    # per-sequence means (1.5 + 4) / 2 = 2.75
    batch = LossInputs(policy={"chosen": seq([[-1.0, -2.0], [-3.0, -4.0, -5.0]])})
    out = build(SFTConfig())(batch)
    assert out.losses.mean().item() == pytest.approx(3.0, rel=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(3.0, rel=1e-12)
    assert out.metrics["logps/chosen"].item() == pytest.approx(-7.5, rel=1e-12)


def test_needs_only_chosen_and_no_reference():
    needs = build(SFTConfig()).needs
    assert needs.reference is False and needs.responses == ("chosen",)
