"""model.reference_mode=precomputed: same losses as a live reference, cached across runs, refused
for losses that need the reference's full logits."""

from __future__ import annotations

import json

import pytest

import alignlab.models
from alignlab.errors import UserError
from alignlab.train import run

pytestmark = pytest.mark.slow


def _losses(result):
    return [
        json.loads(line)["loss"] for line in result.metrics_file.read_text().splitlines() if '"loss"' in line
    ]


@pytest.mark.parametrize("recipe", ["dpo", "bco"])
def test_precomputed_equals_live_and_is_reused(recipe, tmp_path, compose_run, capsys):
    common = (
        f"+recipe={recipe}",
        "trainer.max_steps=6",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    live = run(compose_run(*common), output_dir=tmp_path / "live")
    capsys.readouterr()
    first = run(compose_run(*common, "model.reference_mode=precomputed"), output_dir=tmp_path / "pre1")
    assert "reference log-probs: computed" in capsys.readouterr().out
    second = run(
        compose_run(*common, "model.reference_mode=precomputed", "loss.beta=0.2"),
        output_dir=tmp_path / "pre2",
    )
    assert "reference log-probs: reused from cache" in capsys.readouterr().out  # a sweep member reuses them
    assert _losses(first) == pytest.approx(_losses(live), abs=1e-6)
    assert first.eval_metrics["eval_loss"] == pytest.approx(live.eval_metrics["eval_loss"], abs=1e-6)
    assert len(_losses(second)) == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("+recipe=tdpo",), "full-vocabulary logits"),
        (("+recipe=sparsepo",), "full-vocabulary logits"),
        (("+recipe=npo", "loss.variant=npo_kl"), "full-vocabulary logits"),
        (("+recipe=asft",), "reference-free"),
    ],
)
def test_refused_before_models_load(overrides, message, tmp_path, compose_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the combination was checked")

    monkeypatch.setattr(alignlab.models, "load_policy", refuse)
    with pytest.raises(UserError, match=message):
        run(
            compose_run(*overrides, "model.reference_mode=precomputed", f"data.cache_dir={tmp_path}"),
            output_dir=tmp_path / "run",
        )
