"""Hydra sweeps: every member in its own directory; a failing member does not lose the others;
the SLURM launcher (hydra-submitit-launcher), exercised with its local executor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _sweep(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "alignlab.cli", "train", "-m", "+recipe=dpo", "model.name_or_path=builtin:tiny",
           "trainer.max_steps=2",
           "trainer.logging_steps=1", "trainer.eval_steps=0", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_failing_member_does_not_lose_the_others(tmp_path):
    out = _sweep(tmp_path, "loss.beta=0.1,-1,0.2")
    assert out.returncode != 0  # the sweep reports its failure
    assert "alignlab: error: loss.beta must be > 0" in out.stderr
    for member, beta in ((0, 0.1), (2, 0.2)):
        directory = tmp_path / "sweep" / str(member)
        assert (directory / "summary.json").exists(), out.stderr[-2000:]
        assert json.loads((directory / "summary.json").read_text())["train_losses"]
    assert not (tmp_path / "sweep" / "1" / "summary.json").exists()


def test_submitit_launcher_runs_each_member(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(tmp_path, "loss.beta=0.1,0.2", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert out.returncode == 0, out.stderr[-2000:]
    for member in (0, 1):
        assert (tmp_path / "sweep" / str(member) / "summary.json").exists()
