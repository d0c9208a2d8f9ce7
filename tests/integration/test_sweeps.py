"""Hydra sweeps: every member in its own directory; a failing member does not lose the others;
the SLURM launcher (hydra-submitit-launcher), exercised with its local executor."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _sweep(tmp_path, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "alignlab.cli",
        "train",
        "-m",
        "+recipe=dpo",
        "model.name_or_path=builtin:tiny",
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_failing_member_does_not_lose_the_others_and_the_table_reports_it(tmp_path):
    out = _sweep(
        tmp_path,
        "loss.beta=0.1,-1,0.2",
        "logger=wandb",
        "logger.mode=offline",
        "eval.num_prompts=4",
        "eval.max_new_tokens=4",
    )
    assert out.returncode == 2  # the sweep reports its failure
    assert "alignlab: error: loss.beta must be > 0" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    sweep = tmp_path / "sweep"
    for member, _beta in ((0, 0.1), (2, 0.2)):
        directory = sweep / str(member)
        assert (directory / "summary.json").exists(), out.stderr[-2000:]
        assert json.loads((directory / "summary.json").read_text())["train_losses"]
        # every member's W&B run is in the sweep's group
        (wandb_run,) = (directory / "wandb").glob("offline-run-*/run-*.wandb")
        assert str(sweep).encode() in wandb_run.read_bytes()
    assert not (sweep / "1" / "summary.json").exists()
    assert (sweep / "1" / "error.log").read_text().startswith("loss.beta must be > 0")
    assert f"summary in {sweep / 'sweep.md'}" in out.stdout

    with (sweep / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["member"], r["overrides"], r["status"][:20]) for r in rows] == [
        ("0", "loss.beta=0.1", "ok"),
        ("1", "loss.beta=-1", "failed: loss.beta mu"),
        ("2", "loss.beta=0.2", "ok"),
    ]
    for row in (rows[0], rows[2]):
        assert 0 <= float(row["held-out accuracy"]) <= 1 and 0 <= float(row["win rate"]) <= 1
    assert rows[1]["held-out accuracy"] == ""
    table = (sweep / "sweep.md").read_text()
    assert "3 members, 1 not ok" in table and "| 1 | loss.beta=-1 | failed: loss.beta must be > 0" in table


def test_submitit_launcher_runs_each_member(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(
        tmp_path, "loss.beta=0.1,0.2", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for member in (0, 1):
        assert (tmp_path / "sweep" / str(member) / "summary.json").exists()
