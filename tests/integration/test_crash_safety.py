"""Crash-safe runs: half-written checkpoints are skipped or refused, NaN stops the run before the
optimizer applies it, SIGTERM saves and stops cleanly, and the run resumes from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import alignlab.losses.dpo
from alignlab.checkpoints import COMPLETE, NonFiniteError
from alignlab.errors import UserError
from alignlab.train import run

pytestmark = pytest.mark.slow


def _common(tmp_path, steps):
    return ("+recipe=dpo", f"trainer.max_steps={steps}", "trainer.save_steps=2", "trainer.logging_steps=1",
            "trainer.eval_steps=0", "data.eval_size=0", f"data.cache_dir={tmp_path / 'cache'}")


def test_half_written_checkpoint_is_skipped_and_named_one_refused(tmp_path, compose_run, capsys):
    out = tmp_path / "run"
    run(compose_run(*_common(tmp_path, 4)), output_dir=out)
    assert (out / "checkpoint-4" / COMPLETE).exists()
    # a kill during the save of step 6: the folder exists, half written
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    resumed = run(compose_run(*_common(tmp_path, 6), "trainer.resume_from_checkpoint=latest"), output_dir=out)
    printed = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in printed and "resuming from" in printed and "checkpoint-4" in printed
    steps = [json.loads(line)["step"] for line in resumed.metrics_file.read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # one log, continued from step 4: nothing skipped or repeated

    (out / "checkpoint-4" / "optimizer.pt").unlink()  # resuming would silently start a fresh optimizer
    with pytest.raises(UserError, match="lacks optimizer.pt"):
        run(compose_run(*_common(tmp_path, 8), f"trainer.resume_from_checkpoint={out / 'checkpoint-4'}"),
            output_dir=out)


def test_nan_loss_stops_before_the_optimizer_and_keeps_the_last_good_checkpoint(tmp_path, compose_run, monkeypatch):
    forward = alignlab.losses.dpo.DPO.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step
            out.losses = out.losses * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(alignlab.losses.dpo.DPO, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="at step 3"):
        run(compose_run(*_common(tmp_path, 6)), output_dir=out)
    assert (out / "checkpoint-2" / COMPLETE).exists()
    assert not (out / "checkpoint-4").exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "trainer.max_steps=100000",
           "trainer.save_steps=0", "trainer.logging_steps=1", "trainer.eval_steps=0", "data.eval_size=0",
           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "stopped by SIGTERM" in output
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / COMPLETE).exists()
    assert not (out / "summary.json").exists()  # not finished: a stage would not be taken as done
    stopped = int(checkpoints[0].name.split("-")[1])

    done = subprocess.run([*cmd[:5], f"trainer.max_steps={stopped + 2}", *cmd[6:], "trainer.resume_from_checkpoint=latest"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps[-2:] == [stopped + 1, stopped + 2]
    assert (out / "summary.json").exists()
