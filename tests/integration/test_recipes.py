"""Every loss's recipe trains on the embedded tiny model: the loss falls and the method's own
metric moves the way the method intends. Impossible combinations are refused before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import alignlab.models
from alignlab.errors import UserError
from alignlab.train import run

pytestmark = pytest.mark.slow


def _records(result):
    return [json.loads(line) for line in result.metrics_file.read_text().splitlines()]


def _series(result, key):
    return [r[key] for r in _records(result) if key in r and "eval_loss" not in r]


def _train(compose_run, tmp_path, recipe, *overrides, steps=40, sft=False):
    """Train `recipe` for `steps` steps (None: the recipe's own), logging every step, evaluating at the end;
    `sft`: from the embedded default's SFT stage (trained first, once), as `alignlab train` does."""
    length = [f"trainer.max_steps={steps}"] if steps else []
    cfg = compose_run(
        f"+recipe={recipe}",
        *length,
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        *overrides,
        sft=sft,
    )
    if sft:
        from alignlab.train import run_stages

        run_stages(cfg)
    return run(cfg, output_dir=tmp_path / "run")


def _falls(values, k=5):
    return sum(values[-k:]) / k < sum(values[:k]) / k


@pytest.mark.parametrize("recipe", ["dpo", "rdpo", "rpo", "asft", "tpo", "tdpo", "sparsepo"])
def test_pair_losses_learn(recipe, tmp_path, compose_run):
    # the recipe as a user runs it; ASFT from the SFT model, as its recipe is measured (recipes/asft.yaml:
    # its absolute-likelihood term barely moves the random tiny model at the toy's learning rate)
    result = _train(compose_run, tmp_path, recipe, steps=None, sft=recipe == "asft")
    assert _falls(_series(result, "loss"))
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.8  # chance 0.5


@pytest.mark.parametrize("recipe", ["asft", "tpo"])
def test_reference_free_losses_never_load_a_reference(recipe, tmp_path, compose_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was loaded for a reference-free loss")

    monkeypatch.setattr(alignlab.models, "load_reference", refuse)
    _train(compose_run, tmp_path, recipe, steps=3)


def test_bco_tracks_delta_and_separates_labels(tmp_path, compose_run):
    result = _train(compose_run, tmp_path, "bco")
    assert _falls(_series(result, "loss"))
    delta = _series(result, "delta")
    assert len(delta) == 40 and len(set(delta)) > 1  # δ is tracked and moves
    assert result.eval_metrics["eval_rewards/margins"] > 0  # desirable rewards above undesirable
    assert (result.output_dir / "data_report.json").exists()
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["unpaired_from_pairs"] is True
    state = load_file(
        result.model_dir / "loss_state.safetensors"
    )  # δ and the UDM classifier, saved with the run
    assert (
        state["running_mean"].item() == pytest.approx(delta[-1], abs=1e-5) and state["udm_coef"].numel() == 64
    )


def test_npo_lowers_forget_likelihood(tmp_path, compose_run):
    result = _train(compose_run, tmp_path, "npo")
    forget = _series(result, "forget/logps")
    assert _falls(forget) and forget[-1] < forget[0] - 5  # the forget set becomes much less likely
    assert _falls(_series(result, "loss"))
    assert result.eval_metrics["eval_retain/nll"] < 10  # retain NLL stays bounded (random init: ln 81 ≈ 4.4)


def test_bco_state_survives_resume(run_and_resume):
    full, resumed = run_and_resume("bco", steps=6, save_every=3)
    a = load_file(full.output_dir / "checkpoint-6" / "loss_state.safetensors")
    b = load_file(resumed.output_dir / "checkpoint-6" / "loss_state.safetensors")
    assert a["running_count"].item() == pytest.approx(6 * 32)  # δ pooled every reward of 6 batches
    for key in a:
        assert a[key].tolist() == pytest.approx(b[key].tolist(), rel=1e-9, abs=1e-12), key


def _same_losses(resumed, full) -> None:
    """The resumed run (a fresh directory holding only the checkpoint) logs the uninterrupted run's steps
    after that checkpoint, with the same losses."""

    def records(run_dir):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "train_runtime" not in r
        ]

    got, want = records(resumed.output_dir), records(full.output_dir)
    want = want[len(want) - len(got) :]
    assert got and [s for s, _ in got] == [s for s, _ in want] and got[-1][0] == 6
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-6)


def test_sparsepo_mask_heads_survive_resume(run_and_resume):
    # the learned mask heads are the loss's own parameters: their weights and Adam moments must resume
    full, resumed = run_and_resume("sparsepo", 6, 3, "loss.mask=learned")
    _same_losses(resumed, full)
    a = load_file(full.output_dir / "checkpoint-6" / "loss_state.safetensors")
    b = load_file(resumed.output_dir / "checkpoint-6" / "loss_state.safetensors")
    assert a.keys() == b.keys() and any("weight" in key for key in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_precomputed_reference_resumes_from_its_cache(run_and_resume, capsys):
    full, resumed = run_and_resume("dpo", 6, 3, "model.reference_mode=precomputed")
    assert (
        "reference log-probs: reused from cache" in capsys.readouterr().out
    )  # the resumed run scored nothing again
    _same_losses(resumed, full)


def test_resume_refuses_checkpoint_without_loss_state(tmp_path, compose_run):
    common = (
        "+recipe=bco",
        "trainer.max_steps=4",
        "trainer.save_steps=2",
        "trainer.eval_steps=0",
        "data.eval_size=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    full = run(compose_run(*common), output_dir=tmp_path / "full")
    (full.output_dir / "checkpoint-2" / "loss_state.safetensors").unlink()
    with pytest.raises(UserError, match="cannot resume: .*checkpoint-2 lacks loss_state.safetensors"):
        run(
            compose_run(*common, f"trainer.resume_from_checkpoint={full.output_dir / 'checkpoint-2'}"),
            output_dir=tmp_path / "again",
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("+recipe=npo", "data.retain=null"), "needs a retain set: set data.retain="),
        (("+recipe=dpo", "data.retain=builtin:sentiment-retain"), "data.retain"),
        (("+recipe=asft", "model.reference=builtin:tiny"), "reference-free"),
    ],
)
def test_impossible_combinations_refused_before_models_load(
    overrides, message, tmp_path, compose_run, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the combination was checked")

    monkeypatch.setattr(alignlab.models, "load_policy", refuse)
    with pytest.raises(UserError, match=message):
        run(compose_run(*overrides, f"data.cache_dir={tmp_path / 'cache'}"), output_dir=tmp_path / "run")
