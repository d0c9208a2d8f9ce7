"""MODPO end to end on the embedded tiny model: the two-stage recipe, a weight sweep through the CLI
(the margin stage trained once for all members), a column margin read from the data, a failing stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from alignlab.builtin import sentiment_pairs
from alignlab.train import run, run_stages

pytestmark = pytest.mark.slow


@pytest.fixture
def write_rows(tmp_path):
    def write(rows) -> str:
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return write


def _losses(result) -> list[float]:
    return [r["loss"] for r in map(json.loads, result.metrics_file.read_text().splitlines()) if "loss" in r]


def test_two_stage_recipe(compose_run, tmp_path):
    # the recipe's own 150 steps
    cfg = compose_run(
        "+recipe=modpo",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"stages_dir={tmp_path / 'stages'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    (margin,) = run_stages(cfg)
    stage = json.loads((margin.directory / "summary.json").read_text())
    assert stage["eval"]["eval_rewards/accuracies"] > 0.8  # the margin model learned its objective (DPO)
    assert OmegaConf.load(margin.directory / "config.yaml").data.path == "builtin:sentiment-understated"

    result = run(cfg, output_dir=tmp_path / "modpo")
    losses = _losses(result)
    assert sum(losses[-5:]) < sum(losses[:5])
    saved = OmegaConf.load(result.output_dir / "config.yaml")
    assert saved.loss.margins[0].model == f"{margin.directory}/model"
    assert saved.loss.weights == [0.5, 0.5]
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.8  # h(y_w) > h(y_l) on held-out pairs
    assert "eval_logps/margins" in result.eval_metrics


def test_weight_sweep_trains_the_margin_stage_once(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlab.cli",
            "train",
            "-m",
            "+recipe=modpo",
            "model.name_or_path=builtin:tiny",
            "loss.weights=[0.9,0.1],[0.5,0.5]",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "data.limit=64",
            "data.eval_size=16",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"stages_dir={tmp_path / 'stages'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (stage_dir,) = (tmp_path / "stages").iterdir()
    assert out.count(f"stage margin: training in {stage_dir}") == 1
    assert out.count(f"stage margin: reusing {stage_dir}") == 1
    for member, weights in (("0", [0.9, 0.1]), ("1", [0.5, 0.5])):
        run_dir = tmp_path / "sweep" / member
        assert (run_dir / "summary.json").is_file()
        saved = OmegaConf.load(run_dir / "config.yaml")
        assert saved.loss.weights == weights and saved.loss.margins[0].model == f"{stage_dir}/model"


def test_column_margin_from_the_data(compose_run, write_rows, tmp_path):
    rows = [
        {**row, "brevity_chosen": -len(row["chosen"]), "brevity_rejected": -len(row["rejected"])}
        for row in sentiment_pairs(64)
    ]
    path = write_rows(rows)
    cfg = compose_run(
        "loss=modpo",
        "loss.weights=[0.7,0.3]",
        "loss.margins=[{kind: column, column: brevity}]",
        "trainer=default",
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.path={path}",
        "data.eval_size=8",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    result = run(cfg, output_dir=tmp_path / "run")
    assert len(_losses(result)) >= 1 and "eval_rewards/margins" in result.eval_metrics


def test_failed_stage_is_one_line_from_the_cli(tmp_path):
    missing = tmp_path / "missing.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlab.cli",
            "train",
            "+recipe=modpo",
            "model.name_or_path=builtin:tiny",
            f'stages.margin=["loss=dpo","data.path={missing}"]',
            f"hydra.run.dir={tmp_path / 'run'}",
            f"stages_dir={tmp_path / 'stages'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("alignlab: error:")]
    assert len(error) == 1 and "stage 'margin' failed in" in error[0] and "does not exist" in error[0]
    assert not (tmp_path / "run" / "summary.json").exists()  # the final run never started
