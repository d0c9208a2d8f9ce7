"""The end-of-run summary (`alignlab.train.summary_text`) points at everything a run left behind."""

from __future__ import annotations

from pathlib import Path


def _result(tmp_path: Path, **changes):
    from alignlab.train import RunResult

    run_dir = tmp_path / "runs" / "dpo-2024"
    fields = dict(
        output_dir=run_dir,
        model_dir=run_dir / "model",
        metrics_file=run_dir / "metrics.jsonl",
        train_losses=[0.6931, 0.6500, 0.4123],
        eval_metrics={"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 1.25, "eval_loss": 0.5},
        wall_seconds=42.4,
    )
    return RunResult(**{**fields, **changes})


def test_summary_names_the_run_files_losses_and_headline_metrics(tmp_path):
    from alignlab.losses.base import PAIRWISE_HEADLINE as HEADLINE
    from alignlab.train import summary_text

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
    assert any(
        "adapter" in line and str(tmp_path / "runs" / "dpo-2024" / "model") in line
        for line in text.splitlines()
    ), text
    assert str(merged) in text and "train loss" not in text and "held-out" not in text


def _history(
    train: list[tuple[int, float]], held_out: list[tuple[int, float]], key: str = "rewards/accuracies"
):
    records = [{"step": step, key: value, "loss": 0.5} for step, value in train]
    records += [{"step": step, f"eval_{key}": value, "eval_loss": 0.5} for step, value in held_out]
    return sorted(records, key=lambda r: r["step"])


def test_a_warning_when_held_out_accuracy_falls_while_training_accuracy_rises(tmp_path):
    from alignlab.train import divergence_warnings, summary_text

    history = _history([(10, 0.60), (20, 0.80), (30, 0.95)], [(10, 0.70), (30, 0.55)])
    (line,) = divergence_warnings(history)
    assert line.startswith(
        "held-out accuracy went from 0.700 (step 10) to 0.550 (step 30) while training "
        "accuracy went from 0.600 to 0.950"
    ), line
    text = summary_text(_result(tmp_path, warnings=[line]))
    assert f"alignlab: warning: {line}" in text.splitlines()


def test_a_warning_when_held_out_loss_rises_while_training_loss_falls():
    from alignlab.train import divergence_warnings

    history = [
        {"step": 10, "loss": 0.6},
        {"step": 10, "eval_loss": 0.55},
        {"step": 30, "loss": 0.2},
        {"step": 30, "eval_loss": 0.7},
    ]
    (line,) = divergence_warnings(history)
    assert line.startswith("held-out loss went from 0.550 (step 10) to 0.700 (step 30)"), line


def test_no_warning_when_both_move_together_or_with_one_evaluation():
    from alignlab.train import divergence_warnings

    assert divergence_warnings(_history([(10, 0.6), (30, 0.95)], [(10, 0.7), (30, 0.9)])) == []  # both rise
    assert divergence_warnings(_history([(10, 0.9), (30, 0.8)], [(10, 0.7), (30, 0.6)])) == []  # both fall
    assert divergence_warnings(_history([(10, 0.6), (30, 0.95)], [(30, 0.5)])) == []  # nothing to compare
    assert (
        divergence_warnings(_history([(10, 0.6), (30, 0.95)], [(10, 0.70), (30, 0.69)])) == []
    )  # within noise


def test_summary_shows_the_headline_the_loss_declares(tmp_path):
    """The summary's figures are the loss's `headline` (NPO: forgetting), not a list kept elsewhere."""
    from alignlab.losses import REGISTRY
    from alignlab.train import summary_text

    npo = REGISTRY["npo"].loss.headline
    metrics = {"eval_forget/logps": -41.5, "eval_retain/nll": 2.25, "eval_rewards/accuracies": 0.75}
    text = summary_text(_result(tmp_path, eval_metrics=metrics, headline=npo))
    assert "forget log-lik.   -41.500" in text and "retain NLL        2.250" in text, text
    assert "held-out accuracy" not in text  # not one of NPO's figures
