"""The end-of-run summary (`alignlab.train.summary_text`) points at everything a run left behind."""

from __future__ import annotations

from pathlib import Path


def _result(tmp_path: Path, **changes):
    from alignlab.train import RunResult

    run_dir = tmp_path / "runs" / "dpo-2024"
    fields = dict(output_dir=run_dir, model_dir=run_dir / "model", metrics_file=run_dir / "metrics.jsonl",
                  train_losses=[0.6931, 0.6500, 0.4123],
                  eval_metrics={"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 1.25, "eval_loss": 0.5},
                  wall_seconds=42.4)
    return RunResult(**{**fields, **changes})


def test_summary_names_the_run_files_losses_and_headline_metrics(tmp_path):
    from alignlab.train import HEADLINE, summary_text

    result = _result(tmp_path)
    text = summary_text(result)
    lines = text.splitlines()
    for path in (result.output_dir, result.model_dir, result.metrics_file, result.output_dir / "curves.png"):
        assert str(path) in text, (path, text)
    assert any(str(result.model_dir) in line and "model" in line and "adapter" not in line for line in lines)
    # first and last logged train loss, in that order; nothing in between
    loss_line = next(line for line in lines if "0.6931" in line)
    assert "0.4123" in loss_line and loss_line.index("0.6931") < loss_line.index("0.4123"), loss_line
    assert "0.6500" not in text
    # every headline metric the run logged, formatted as HEADLINE says; none it did not log
    for key, template in HEADLINE.items():
        if key in result.eval_metrics:
            assert template.format(result.eval_metrics[key]) in text, (key, text)
        else:
            assert template.split("{")[0].strip() not in text, (key, text)
    assert "0.750" in text and "1.250" in text
    assert "42 s" in text


def test_summary_of_a_lora_run_and_of_a_run_without_logs(tmp_path):
    from alignlab.train import summary_text

    merged = tmp_path / "runs" / "dpo-2024" / "model_merged"
    text = summary_text(_result(tmp_path, adapter=True, merged_dir=merged, train_losses=[], eval_metrics={}))
    assert any("adapter" in line and str(tmp_path / "runs" / "dpo-2024" / "model") in line
               for line in text.splitlines()), text
    assert str(merged) in text and "train loss" not in text and "held-out" not in text
