"""The loss family III recipes train on the embedded tiny model as a user runs them: the loss falls, the
held-out pairs are separated, and reference-free losses never load a reference model."""

from __future__ import annotations

import json

import pytest

import alignlab.models
from alignlab.train import run

pytestmark = pytest.mark.slow

PAIR_RECIPES = ["simpo", "cpo", "orpo"]
REFERENCE_FREE = ["simpo", "cpo", "orpo"]


def _train(compose_run, tmp_path, recipe, *overrides):
    cfg = compose_run(
        f"+recipe={recipe}",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        *overrides,
    )
    return run(cfg, output_dir=tmp_path / "run")


@pytest.mark.parametrize("recipe", PAIR_RECIPES)
def test_pair_recipes_learn(recipe, tmp_path, compose_run):
    result = _train(compose_run, tmp_path, recipe)
    losses = [
        r["loss"]
        for r in map(json.loads, result.metrics_file.read_text().splitlines())
        if "loss" in r and "eval_loss" not in r and "train_runtime" not in r
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.8  # chance 0.5


@pytest.mark.parametrize("recipe", REFERENCE_FREE)
def test_reference_free_recipes_never_load_a_reference(recipe, tmp_path, compose_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was loaded for a reference-free loss")

    monkeypatch.setattr(alignlab.models, "load_reference", refuse)
    _train(compose_run, tmp_path, recipe, "trainer.max_steps=3")


def test_combo_recipe_learns_and_logs_each_term(tmp_path, compose_run):
    result = _train(compose_run, tmp_path, "combo", "trainer.max_steps=40")
    assert result.eval_metrics["eval_dpo/rewards/accuracies"] > 0.8
    assert {"eval_dpo/loss", "eval_bco/loss", "eval_sft/loss", "eval_bco/delta"} <= set(result.eval_metrics)


def test_kto_recipe_learns_from_unpaired_labels(tmp_path, compose_run):
    result = _train(compose_run, tmp_path, "kto", "trainer.max_steps=60")
    losses = [
        r["loss"]
        for r in map(json.loads, result.metrics_file.read_text().splitlines())
        if "loss" in r and "eval_loss" not in r and "train_runtime" not in r
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result.eval_metrics["eval_rewards/margins"] > 0  # desirable above undesirable
    assert result.eval_metrics["eval_kl"] >= 0  # z_ref, clamped


def test_jpo_recipe_learns_from_joint_pairs(tmp_path, compose_run):
    result = _train(compose_run, tmp_path, "jpo", "trainer.max_steps=40", "eval.num_prompts=4")
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.8  # chance 0.5, on held-out joint pairs
    assert result.eval_metrics["eval_rewards/margins"] > 0
