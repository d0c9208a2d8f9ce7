"""End-to-end runs on the embedded tiny model: learning, checkpoints, resume, saving, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignlab.train import run

pytestmark = pytest.mark.slow


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dpo_learns_on_embedded_default(tmp_path, compose_run):
    cfg = compose_run(
        "+recipe=dpo",
        "trainer.max_steps=60",
        "trainer.eval_steps=60",
        "trainer.logging_steps=1",
        "+trainer.extra.eval_on_start=true",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    result = run(cfg, output_dir=tmp_path / "run")
    records = _records(result.metrics_file)
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert (
        evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0.0
    )  # policy == reference: all ties
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.8  # chance is 0.5
    losses = result.train_losses
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference, so exactly ln 2
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]  # the loss falls
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logits/rejected"):
        assert key in records[1] or any(key in r for r in records)

    # the final model and tokenizer load back with plain transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert (result.model_dir / "model.safetensors").exists()
    ids = tokenizer("review : the film was", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer)
    for name in ("config.yaml", "data_report.json", "environment.json", "curves.png", "summary.json"):
        assert (result.output_dir / name).exists(), name
    env = json.loads((result.output_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and env["git"] and len(env["git"]["commit"]) == 40


def test_resume_continues_from_the_saved_step(run_and_resume):
    # A run interrupted after its step-4 checkpoint resumes and reaches step 8 like the full run.
    full, resumed = run_and_resume("dpo", steps=8, save_every=4)

    steps = [r["step"] for r in _records(resumed.metrics_file) if "loss" in r]
    assert steps == [5, 6, 7, 8]  # continues from the saved step, not from 0
    full_losses = {r["step"]: r["loss"] for r in _records(full.metrics_file) if "loss" in r}
    for r in _records(resumed.metrics_file):
        if "loss" in r:
            assert r["loss"] == pytest.approx(full_losses[r["step"]], abs=1e-6)
    a, b = load_file(full.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_wandb_logs_offline(tmp_path, monkeypatch, compose_run):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    logged = {}
    finish = wandb.finish

    def record_then_finish(*args, **kwargs):  # what the W&B run holds when the run ends
        logged.update(config=dict(wandb.run.config), group=wandb.run.group)
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", record_then_finish)
    cfg = compose_run(
        "+recipe=dpo",
        "logger=wandb",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        "eval.generate=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    result = run(cfg, output_dir=tmp_path / "run")
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    alignlab = logged["config"]["alignlab"]  # alignlab's own resolved config, beside the TrainingArguments
    assert alignlab["loss"]["beta"] == cfg.loss.beta and alignlab["data"]["max_length"] == 48
    assert alignlab["data"]["path"] == "builtin:sentiment" and logged["config"]["learning_rate"] == 5e-4
    assert not logged["group"]  # a single run; members of a sweep share the sweep's group (test_sweeps.py)


@pytest.mark.parametrize("recipe", ["dpo_stories260k_hh", "modpo_length"])
def test_stories260k_on_hh_rlhf(recipe, tmp_path, compose_run, shared_path):
    """A real pretrained model on real human preferences (MODPO: with a length penalty): the loss falls."""
    shared_path("models", "stories260k")
    shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    cfg = compose_run(
        f"+recipe={recipe}",
        "trainer.max_steps=30",
        "trainer.logging_steps=5",
        "trainer.eval_steps=0",
        "data.limit=400",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    result = run(cfg, output_dir=tmp_path / "run")
    assert result.train_losses[-1] < result.train_losses[0]
