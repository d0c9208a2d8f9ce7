"""combo (weighted registered losses; MPO, Wang et al. 2024, arXiv:2411.10442) against hand-worked values.

Worked pair (tests/losses/test_dpo.py): ρ(y_w) = 1, ρ(y_l) = −1, h = 2; the chosen tokens (−2, −3) give the
chosen NLL (token mean) 5/2 = 2.5.
"""

import math

import pytest
from loss_helpers import pair_inputs, softplus

from alignlab.losses import build
from alignlab.losses.combo import ComboConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0, -2.0, -2.0, -2.0]], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]


def test_weighted_sum_of_dpo_and_sft():
    # 0.8·softplus(−0.5·2) + 1.0·2.5, with dpo's β = 0.5 from term_options
    cfg = ComboConfig(terms={"dpo": 0.8, "sft": 1.0}, term_options={"dpo": {"beta": 0.5}})
    out = build(cfg)(pair_inputs(PC, PR, RC, RR))
    assert out.losses.item() == pytest.approx(0.8 * softplus(-1.0) + 2.5, rel=1e-12)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["dpo/loss"] == pytest.approx(softplus(-1.0), rel=1e-12) and m["sft/loss"] == pytest.approx(2.5)
    assert m["dpo/rewards/chosen"] == pytest.approx(0.5)  # each term's metrics under its name


def test_mpo_defaults():
    # MPO: 0.8·DPO(β 0.1) + 0.2·BCO-pair(β 0.1, δ = the batch's mean reward, 0 here) + 1·SFT
    # BCO: r_w = 0.1, r_l = −0.1, δ = 0: softplus(−0.1) + softplus(−0.1)
    loss = build(ComboConfig())
    assert loss.needs.reference and loss.needs.responses == ("chosen", "rejected")
    assert loss.per_batch_state.startswith("bco:")  # BCO's δ moves with every batch
    out = loss(pair_inputs(PC, PR, RC, RR))
    expected = 0.8 * softplus(-0.2) + 0.2 * 2 * softplus(-0.1) + 2.5
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


def test_gradient_is_the_weighted_sum():
    batch = pair_inputs(PC, PR, RC, RR, requires_grad=True)
    build(ComboConfig(terms={"dpo": 2.0, "bco": 0.0, "sft": 0.5}))(batch).losses.sum().backward()
    dpo = -0.1 / (1 + math.exp(0.2))  # d/dρ_w of softplus(−0.1·h) = −β σ(−βh), per chosen token
    sft = -1 / 2  # the chosen token mean NLL: −1/|y_w| per chosen token
    got = batch.policy["chosen"].token_logps.grad[0].tolist()
    assert got == pytest.approx([2.0 * dpo + 0.5 * sft] * 2, rel=1e-12)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"terms": {}}, "names no loss"),
        ({"terms": {"dpo": 0.0}, "term_options": {}}, "names no loss"),
        ({"terms": {"dpoo": 1.0}, "term_options": {}}, "no registered loss"),
        ({"terms": {"dpo": -1.0}, "term_options": {}}, ">= 0"),
        ({"terms": {"dpo": 1.0}, "term_options": {"sft": {}}}, "not in loss.terms"),
        ({"terms": {"dpo": 1.0}, "term_options": {"dpo": {"gamma": 1.0}}}, "no option"),
        ({"terms": {"dpo": 1.0}, "term_options": {"dpo": {"beta": 0.0}}}, "loss.beta"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        ComboConfig(**cfg)


def test_a_zero_weight_drops_the_term():
    loss = build(ComboConfig(terms={"dpo": 0.8, "bco": 0.0, "sft": 1.0}))  # MPO's bco options left, unused
    assert list(loss.terms) == ["dpo", "sft"] and not loss.per_batch_state


def test_different_data_shapes_are_refused():
    with pytest.raises(ValueError, match="different data shapes"):
        build(ComboConfig(terms={"dpo": 1.0, "bco": 1.0}, term_options={}))  # bco unpaired


def test_mismatched_responses_are_merged_whatever_the_term_order():
    for terms in ({"bco": 0.5, "kto": 0.5}, {"kto": 0.5, "bco": 0.5}):
        needs = build(ComboConfig(terms=terms, term_options={})).needs
        assert needs.responses == ("completion", "kl_completion"), terms
        assert needs.mismatched == (("kl_completion", "completion"),), terms


def test_every_field_of_needs_is_merged_from_the_terms():
    # each field of Needs set away from its default in a second term survives the merge: a field added
    # to Needs later is merged without an edit to combo (a flag is any term's, a tuple the union)
    from dataclasses import fields, replace

    from alignlab.losses.base import Activations, Needs, Score
    from alignlab.losses.combo import merge_needs

    other = {
        "reference": False,
        "full_logits": True,
        "logits_on_prompt": True,
        "responses": ("chosen", "rejected", "gold"),
        "fields": ("label",),
        "prepared_fields": ("weight",),
        "teachers": (("teacher", "/models/t"),),
        "activations": Activations(hidden_states=True),
        "scores": (Score("margin", kind="reward_model", model="/models/rm"),),
        "mismatched": (("kl", "chosen"),),
        "own_prompts": ("chosen",),
    }
    assert set(other) == {f.name for f in fields(Needs)}, "give the new Needs field a value here"
    base = Needs()
    for name, value in other.items():
        merged = merge_needs([base, replace(base, **{name: value})])
        expected = base.reference if name == "reference" else value  # a reference if any term has one
        assert getattr(merged, name) == expected, name
