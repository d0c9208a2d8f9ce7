"""Crash-safe runs: half-written or damaged checkpoints are skipped or refused, NaN stops the run
before the optimizer applies it, SIGTERM saves and stops cleanly, the run resumes from there, and a
run directory belongs to one run. (Randomized trials of all of it: test_resume_trials.py.)"""

from __future__ import annotations

import json
import os
import shutil
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
from alignlab.errors import Interrupted, RunDirectoryBusy, StorageError, UserError
from alignlab.train import run

pytestmark = pytest.mark.slow


def _common(tmp_path, steps):
    return (
        "+recipe=dpo",
        f"trainer.max_steps={steps}",
        "trainer.save_steps=2",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        "data.eval_size=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    )


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
    assert "skipping" in printed and "checkpoint-6 lacks trainer_state.json" in printed
    assert f"resuming from {out / 'checkpoint-4'}" in printed
    steps = [
        json.loads(line)["step"] for line in resumed.metrics_file.read_text().splitlines() if '"loss"' in line
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # one log, continued from step 4: nothing skipped or repeated

    (out / "checkpoint-4" / "optimizer.pt").unlink()  # resuming would silently start a fresh optimizer
    with pytest.raises(UserError, match="lacks optimizer.pt"):
        run(
            compose_run(*_common(tmp_path, 8), f"trainer.resume_from_checkpoint={out / 'checkpoint-4'}"),
            output_dir=out,
        )


def _poison_dpo(monkeypatch, call: int, poison) -> None:
    """DPO's per-example losses of its `call`-th forward (1-based, training micro-batches) become
    `poison(losses)`."""
    forward = alignlab.losses.dpo.DPO.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] == call:
            out.losses = poison(out.losses)
        return out

    monkeypatch.setattr(alignlab.losses.dpo.DPO, "forward", poisoned)


def test_nan_loss_stops_before_the_optimizer_and_keeps_the_last_good_checkpoint(
    tmp_path, compose_run, monkeypatch
):
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
        run(
            compose_run(
                *_common(tmp_path, 6),
                "trainer.gradient_accumulation_steps=2",
                "trainer.per_device_train_batch_size=16",
            ),
            output_dir=out,
        )
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

    from alignlab.checkpoints import problem

    out = tmp_path / "run"
    run(compose_run(*_common(tmp_path, 4)), output_dir=out)
    (out / "checkpoint-4" / "scheduler.pt").write_bytes(b"")  # damaged: latest resumes from checkpoint-2
    save_model = Trainer.save_model
    marked_while_saving = []

    def watched(self, output_dir=None, _internal_call=False):
        marked_while_saving.append((Path(output_dir) / COMPLETE).exists())
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", watched)
    run(compose_run(*_common(tmp_path, 4), "trainer.resume_from_checkpoint=latest"), output_dir=out)
    assert marked_while_saving[0] is False  # a kill during this save would leave it refused, not trusted
    assert (out / "checkpoint-4" / COMPLETE).exists() and problem(out / "checkpoint-4") is None


def test_resuming_from_the_last_checkpoint_trains_no_further(tmp_path, compose_run, capsys):
    """A run cut off after its last checkpoint (during the final evaluation or save) finishes without
    training: HF would train step 4 of a 3-step run (it checks for the end only after a step)."""
    from safetensors.torch import load_file

    common = (
        *_common(tmp_path, 3),
        "trainer.save_steps=3",
        "trainer.lr_scheduler_type=constant",
        "trainer.warmup_steps=0",
    )
    full = run(compose_run(*common), output_dir=tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full.output_dir / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run(compose_run(*common, "trainer.resume_from_checkpoint=latest"), output_dir=resumed_dir)
    final, saved = (
        load_file(resumed.model_dir / "model.safetensors"),
        load_file(full.model_dir / "model.safetensors"),
    )
    assert all(torch.equal(final[k], saved[k]) for k in saved)
    steps = [json.loads(line)["step"] for line in resumed.metrics_file.read_text().splitlines()]
    assert max(steps) == 3


def test_resume_latest_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, compose_run, capsys):
    out = tmp_path / "run"
    run(
        compose_run(*_common(tmp_path, 2), "trainer.save_steps=0", "trainer.resume_from_checkpoint=latest"),
        output_dir=out,
    )
    assert f"no complete checkpoint in {out} yet; starting a fresh run" in capsys.readouterr().out
    assert (out / "summary.json").exists()


def test_a_run_directory_belongs_to_one_run(tmp_path, compose_run):
    out = tmp_path / "run"
    run(compose_run(*_common(tmp_path, 2)), output_dir=out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".alignlab.lock"}
    # a fresh start into a finished run's directory, or resuming it under another seed: refused, nothing
    # touched
    with pytest.raises(
        UserError, match="holds a finished run. Fix: resume it with trainer.resume_from_checkpoint"
    ):
        run(compose_run(*_common(tmp_path, 2)), output_dir=out)
    with pytest.raises(UserError, match=r"holds checkpoints of another run .*seed"):
        run(
            compose_run(*_common(tmp_path, 4), "seed=1", "trainer.resume_from_checkpoint=latest"),
            output_dir=out,
        )
    with pytest.raises(UserError, match=r"written under another config \(seed 42 -> 1\)"):
        run(
            compose_run(
                *_common(tmp_path, 4), "seed=1", f"trainer.resume_from_checkpoint={out / 'checkpoint-2'}"
            ),
            output_dir=out,
        )
    assert before == {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".alignlab.lock"
    }
    # while a live run holds the directory, a second one is refused, naming it
    from alignlab.rundir import RunLock

    lock = RunLock(out).acquire()
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(pid {os.getpid()} on "):
            run(compose_run(*_common(tmp_path, 4), "trainer.resume_from_checkpoint=latest"), output_dir=out)
    finally:
        lock.release()
    # told to, a new run replaces the old one (and a lock file left by a dead process does not block it)
    (out / ".alignlab.lock").write_text('{"pid": 999999, "host": "gone", "started": "-", "command": "-"}')
    run(compose_run(*_common(tmp_path, 2), "seed=1", "trainer.overwrite_output_dir=true"), output_dir=out)
    assert '"seed": 1' in (out / "checkpoint-2" / COMPLETE).read_text()
    assert ["seed: 1"] == [
        line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("seed")
    ]


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, compose_run, monkeypatch
):
    from transformers import Trainer

    import alignlab.rundir
    from alignlab.checkpoints import problem

    save = Trainer._save_optimizer_and_scheduler

    def full_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # what torch.save says when the disk fills up
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4056: "
                "basic_ios::clear: iostream error"
            )
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_at_step_4)
    monkeypatch.setattr(alignlab.rundir, "free_bytes", lambda path: 0)
    out = tmp_path / "run"
    with pytest.raises(StorageError) as err:
        run(compose_run(*_common(tmp_path, 6)), output_dir=out)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot write {out / 'checkpoint-4'}: no space left on its disk (0 MiB free) at step 4"
    )
    assert "checkpoint-2 is the last complete checkpoint" in message and "Fix: free space" in message
    assert not (out / "checkpoint-4").exists() and problem(out / "checkpoint-2") is None


def test_a_read_only_run_directory_is_one_line(tmp_path, compose_run, monkeypatch):
    import alignlab.rundir

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / ".alignlab.lock"))

    monkeypatch.setattr(alignlab.rundir, "open", denied, raising=False)
    with pytest.raises(
        StorageError,
        match=r"cannot claim the run directory .*\.alignlab\.lock: permission denied\. "
        r"Fix: make it writable, or pick another run directory",
    ):
        run(compose_run(*_common(tmp_path, 2)), output_dir=tmp_path / "run")


def test_sigterm_in_the_last_step_finishes_the_run(tmp_path, compose_run):
    from transformers import TrainerCallback

    import alignlab.trainer

    class Sigterm(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # during step 2 of 2
                os.kill(os.getpid(), signal.SIGTERM)

    init = alignlab.trainer.AlignTrainer.__init__

    def with_sigterm(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Sigterm())

    alignlab.trainer.AlignTrainer.__init__ = with_sigterm
    try:
        result = run(compose_run(*_common(tmp_path, 2)), output_dir=tmp_path / "run")
    finally:
        alignlab.trainer.AlignTrainer.__init__ = init
    assert (result.model_dir / "model.safetensors").exists() and (result.output_dir / "summary.json").exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "alignlab.cli",
        "train",
        "+recipe=dpo",
        "model.name_or_path=builtin:tiny",
        "trainer.max_steps=100000",
        "trainer.save_steps=0",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        "data.eval_size=0",
        "eval.generate=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, errors = proc.communicate(timeout=120)
    assert proc.returncode == 3, errors[-2000:]  # preempted, resumable (alignlab.errors.EXIT_CODES)
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / COMPLETE).exists()
    assert not (out / "summary.json").exists()  # not finished: a stage would not be taken as done
    stopped = int(checkpoints[0].name.split("-")[1])
    line = errors.strip().splitlines()[-1]  # one line: what happened, and the command that resumes
    assert line.startswith(
        f"alignlab: stopped by SIGTERM at step {stopped}; checkpoint saved: {checkpoints[0]}. "
        "Resume with: alignlab train +recipe=dpo "
    )
    resume = line.split("Resume with: alignlab train ")[1].split()
    assert resume[-2:] == ["trainer.resume_from_checkpoint=latest", f"hydra.run.dir={out}"]

    resume = [
        f"trainer.max_steps={stopped + 2}" if word.startswith("trainer.max_steps=") else word
        for word in resume
    ]
    done = subprocess.run(
        [*cmd[:4], *resume], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, stopped + 3))
    assert (
        sum("train_runtime" in r for r in records) == 1
    )  # the interrupted train() left no record of its end
    assert (out / "summary.json").exists()


def test_a_signal_during_start_up_stops_before_the_directory_changes(tmp_path, compose_run, monkeypatch):
    import alignlab.models

    load_policy = alignlab.models.load_policy

    def sigterm_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load_policy(*args, **kwargs)

    monkeypatch.setattr(alignlab.models, "load_policy", sigterm_while_loading)
    out = tmp_path / "run"
    with pytest.raises(
        Interrupted,
        match="stopped by SIGTERM during start-up, before training; no checkpoint yet "
        r"\(resuming starts afresh\)\. Resume with: run\(cfg with "
        "trainer.resume_from_checkpoint=latest",
    ):
        run(compose_run(*_common(tmp_path, 4)), output_dir=out)
    assert [p.name for p in out.iterdir()] == [".alignlab.lock"]


def test_a_second_ctrl_c_stops_at_once(tmp_path, compose_run):
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under a shell's background job
    from transformers import TrainerCallback

    import alignlab.trainer
    from alignlab.errors import StoppedAtOnce

    class TwoCtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # during step 3
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    init = alignlab.trainer.AlignTrainer.__init__

    def with_ctrl_c(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(TwoCtrlC())

    alignlab.trainer.AlignTrainer.__init__ = with_ctrl_c
    out = tmp_path / "run"
    try:
        with pytest.raises(
            StoppedAtOnce,
            match="stopped at once by a second Ctrl-C; resume from the last complete checkpoint with: ",
        ) as err:
            run(compose_run(*_common(tmp_path, 6)), output_dir=out)
    finally:
        alignlab.trainer.AlignTrainer.__init__ = init
    assert err.value.exit_code == 130
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # step 3 was not finished
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
