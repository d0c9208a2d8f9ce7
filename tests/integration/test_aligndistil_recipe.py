"""AlignDistil end to end: two teacher stages, then distillation; stages are reused on a rerun."""

from __future__ import annotations

import json

import pytest

from alignlab.train import run, run_stages

pytestmark = pytest.mark.slow


def test_three_stage_pipeline_trains_and_reuses_stages(tmp_path, compose_run, capsys):
    overrides = (
        "+recipe=aligndistil",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"stages_dir={tmp_path / 'stages'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    cfg = compose_run(*overrides)
    stages = run_stages(cfg)
    assert [s.name for s in stages] == ["dpo_teacher", "reverse_teacher"]
    assert all(s.finished for s in stages)
    # the reverse teacher learned the opposite preference: its held-out accuracy on the real pairs is low
    reverse = json.loads((stages[1].directory / "summary.json").read_text())
    dpo = json.loads((stages[0].directory / "summary.json").read_text())
    assert dpo["eval"]["eval_rewards/accuracies"] > 0.8
    assert reverse["eval"]["eval_rewards/accuracies"] > 0.8  # on its own (swapped) held-out pairs

    result = run(cfg, output_dir=tmp_path / "student")
    losses = result.train_losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the student moves toward the teacher
    assert "eval_mean_weight" in result.eval_metrics

    capsys.readouterr()
    again = run_stages(compose_run(*overrides))
    assert [s.directory for s in again] == [s.directory for s in stages]
    assert capsys.readouterr().out.count("reusing") == 2
