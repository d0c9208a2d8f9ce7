"""Crash-safe runs: half-written checkpoints are skipped or refused, NaN stops the run before the
optimizer applies it, SIGTERM saves and stops cleanly, and the run resumes from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def _poison_dpo(monkeypatch, call: int, poison) -> None:
    """DPO's per-example losses of its `call`-th forward (1-based, training micro-batches) become `poison(losses)`."""
    forward = alignlab.losses.dpo.DPO.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] == call:
            out.losses = poison(out.losses)
        return out

    monkeypatch.setattr(alignlab.losses.dpo.DPO, "forward", poisoned)


def test_nan_loss_stops_before_the_optimizer_and_keeps_the_last_good_checkpoint(tmp_path, compose_run, monkeypatch):
    _poison_dpo(monkeypatch, 3, lambda losses: losses * torch.tensor(float("nan")))  # the third training step
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"the loss is nan at step 3, micro-batch 1 of 1 \(epoch") as err:
        run(compose_run(*_common(tmp_path, 6)), output_dir=out)
    assert (out / "checkpoint-2" / COMPLETE).exists()
    assert not (out / "checkpoint-4").exists()
    # the batch is named by its saved tensors: 32 pairs of the third step
    saved = out / "nonfinite-step3.safetensors"
    assert str(saved) in str(err.value)
    assert load_file(saved)["chosen_input_ids"].shape[0] == 32
    # the run's settings were written when it started, not only by a finished run
    assert (out / "config.yaml").exists() and (out / "environment.json").exists()


def test_nan_gradient_names_its_micro_batch_and_stops_before_the_step(tmp_path, compose_run, monkeypatch):
    # step 3, second micro-batch: a finite loss whose gradient is NaN (0 * d√x at x = 0)
    _poison_dpo(monkeypatch, 6, lambda losses: losses + (losses * 0).sqrt())
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="a gradient is NaN or infinite at step 3, micro-batch 2 of 2"):
        run(compose_run(*_common(tmp_path, 6), "trainer.gradient_accumulation_steps=2",
                        "trainer.per_device_train_batch_size=16"), output_dir=out)
    assert (out / "checkpoint-2" / COMPLETE).exists() and not (out / "checkpoint-4").exists()
    assert (out / "nonfinite-step3.safetensors").exists()


def test_old_checkpoints_are_rotated_only_after_the_new_one_is_complete(tmp_path, compose_run, monkeypatch):
    import alignlab.trainer

    rotate = alignlab.trainer.rotate_checkpoints
    seen = []

    def checked(output_dir, **kwargs):
        newest = max(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        seen.append((newest.name, (newest / COMPLETE).exists()))
        return rotate(output_dir=output_dir, **kwargs)

    monkeypatch.setattr(alignlab.trainer, "rotate_checkpoints", checked)
    out = tmp_path / "run"
    run(compose_run(*_common(tmp_path, 6), "trainer.save_total_limit=1"), output_dir=out)
    assert seen == [("checkpoint-2", True), ("checkpoint-4", True), ("checkpoint-6", True)]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert not (out / "checkpoint-6" / "training_args.bin").exists()  # HF's pickle of the arguments


def test_a_checkpoint_being_overwritten_is_incomplete_until_rewritten(tmp_path, compose_run, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "run"
    run(compose_run(*_common(tmp_path, 2)), output_dir=out)
    assert (out / "checkpoint-2" / COMPLETE).exists()
    save_model = Trainer.save_model
    marked_while_saving = []

    def watched(self, output_dir=None, _internal_call=False):
        marked_while_saving.append((Path(output_dir) / COMPLETE).exists())
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", watched)
    run(compose_run(*_common(tmp_path, 2)), output_dir=out)  # a fresh run in the same directory rewrites it
    assert marked_while_saving[0] is False  # a kill during this save would leave it refused, not trusted
    assert (out / "checkpoint-2" / COMPLETE).exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "model.name_or_path=builtin:tiny",
           "trainer.max_steps=100000",
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
