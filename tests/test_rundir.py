"""alignlab.rundir without training: the lock, the config fingerprint, what a run may do in a
directory, the one-line failures, the signals, and the CLI's exit codes."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from alignlab import rundir
from alignlab.checkpoints import NonFiniteError, mark_complete
from alignlab.errors import EXIT_CODES, Interrupted, RunDirectoryBusy, StorageError, UserError
from alignlab.rundir import Identity, RunLock, claim, identity_config

FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors", "rng_state.pth")


def _identity(seed=42, logging_steps=10, run_id="r1"):
    config = {
        "seed": seed,
        "loss": {"name": "dpo", "beta": 0.1},
        "trainer": {"logging_steps": logging_steps, "learning_rate": 1e-3, "resume_from_checkpoint": None},
        "data": {"cache_dir": "/somewhere"},
        "output_dir": "/x",
        "logger": {"report_to": []},
    }
    return Identity(run_id, identity_config(config))


def _checkpoint(run, step, identity):
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_text(name)
    mark_complete(folder, identity.to_dict())
    return folder


def test_the_fingerprint_leaves_out_what_may_change_on_resume():
    assert _identity().fingerprint == _identity(logging_steps=1).fingerprint
    assert _identity().fingerprint != _identity(seed=1).fingerprint
    assert sorted(_identity().config) == ["loss.beta", "loss.name", "seed", "trainer.learning_rate"]
    assert rundir.differences(_identity().config, _identity(seed=1).config) == "seed 42 -> 1"


def test_the_forwards_speed_switches_may_change_on_resume(tmp_path):
    """They change no loss or gradient (beyond rounding), so a run started under the old defaults
    (padded batches with their mask) resumes under the new ones, and the new key is no difference."""
    base = {"seed": 1, "loss": {"name": "dpo"}, "output_dir": "/x"}
    old = {**base, "model": {"name_or_path": "m", "padding_free": False, "prefix_sharing": False}}
    new = {
        **base,
        "model": {
            "name_or_path": "m",
            "padding_free": True,
            "prefix_sharing": True,
            "drop_padding_mask": True,
        },
    }
    _checkpoint(tmp_path, 2, Identity("r1", identity_config(old)))
    assert claim(tmp_path, "latest", Identity("r2", identity_config(new))).resume == str(
        tmp_path / "checkpoint-2"
    )
    other = {**new, "model": {**new["model"], "name_or_path": "n"}}
    with pytest.raises(UserError, match="model.name_or_path 'm' -> 'n'"):
        claim(tmp_path, "latest", Identity("r3", identity_config(other)))


def test_a_second_lock_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(
            RunDirectoryBusy,
            match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on .*"
            r"since .*\)\. Fix: wait for it",
        ):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    RunLock(tmp_path).acquire().release()  # released: free again (the file stays, the lock does not)


def test_latest_resumes_this_runs_checkpoint_with_its_run_id(tmp_path, capsys):
    _checkpoint(tmp_path, 2, _identity(run_id="first"))
    claimed = claim(tmp_path, "latest", _identity(run_id="second", logging_steps=1))
    assert claimed.resume == str(tmp_path / "checkpoint-2") and claimed.identity.run_id == "first"


def test_latest_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    claimed = claim(tmp_path, "latest", _identity())
    assert claimed.resume is None
    assert f"no complete checkpoint in {tmp_path} yet; starting a fresh run" in capsys.readouterr().out


def test_another_configs_checkpoints_are_refused_unless_forced(tmp_path, capsys):
    _checkpoint(tmp_path, 2, _identity())
    ours = _identity(seed=1)
    with pytest.raises(
        UserError,
        match=r"holds checkpoints of another run \(checkpoint-2 the newest\), whose config "
        r"differs \(seed 42 -> 1\)\. Fix: .*resume_any_config=true",
    ):
        claim(tmp_path, "latest", ours)
    with pytest.raises(
        UserError,
        match=r"cannot resume .*checkpoint-2: it was written under another config "
        r"\(seed 42 -> 1\)",
    ):
        claim(tmp_path, str(tmp_path / "checkpoint-2"), ours)
    with pytest.raises(UserError, match="holds checkpoints of an unfinished run"):
        claim(tmp_path, None, ours)
    assert claim(tmp_path, "latest", ours, any_config=True).resume == str(tmp_path / "checkpoint-2")
    assert claim(tmp_path, None, ours, overwrite=True).replace


def test_a_finished_run_is_refused_for_a_fresh_start(tmp_path):
    rundir.write_record(tmp_path, _identity(), "finished")
    with pytest.raises(UserError, match="holds a finished run. Fix: resume it"):
        claim(tmp_path, None, _identity())
    with pytest.raises(UserError, match="holds a finished run and no checkpoint of it"):
        claim(tmp_path, "latest", _identity())
    with pytest.raises(UserError, match="pass only one of them"):
        claim(tmp_path, "latest", _identity(), overwrite=True)


def test_overwrite_replaces_the_earlier_run_only_when_taken_over(tmp_path):
    _checkpoint(tmp_path, 2, _identity())
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "notes.txt"):
        (tmp_path / name).write_text("old")
    claimed = claim(tmp_path, None, _identity(seed=1), overwrite=True)
    assert (tmp_path / "checkpoint-2").exists()  # nothing removed by the decision itself
    rundir.take_over(tmp_path, claimed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # what is not a run's own file stays


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/r/optimizer.pt"),
            "cannot write /r/optimizer.pt: no space left on its disk",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/r/config.yaml"),
            "cannot write /r/config.yaml: permission denied. "
            "Fix: make it writable, or pick another run directory",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/r"), "the file system is read-only"),
        (
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4056"),
            "cannot write /r: no space left on its disk (0 MiB free). Fix: free space",
        ),
    ],
)
def test_write_failures_are_one_line_with_the_fix(monkeypatch, error, expected):
    monkeypatch.setattr(rundir, "free_bytes", lambda path: 0)
    message = str(rundir.storage_error(error, rundir.Path("/r"), "write", resume="alignlab train x"))
    assert (
        expected in message and message.endswith("then resume with: alignlab train x") and "\n" not in message
    )


def test_other_errors_are_not_taken_for_write_failures():
    assert rundir.storage_error(RuntimeError("shape mismatch"), rundir.Path("/r"), "write") is None
    assert rundir.storage_error(OSError(errno.ENOENT, "No such file"), rundir.Path("/r"), "write") is None


def test_the_first_signal_asks_to_stop_and_a_second_ctrl_c_stops_at_once(capsys):
    interrupts = rundir.Interrupts().install()
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert previous == interrupts._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.received == "Ctrl-C"
        assert (
            "saving a checkpoint at the end of this step (Ctrl-C again stops at once)"
            in capsys.readouterr().err
        )
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        interrupts.uninstall()
    assert signal.getsignal(signal.SIGINT) is not interrupts._handle


@pytest.mark.slow  # Hydra composes the config five times (imports: ~8 s)
def test_the_cli_prints_one_line_and_exits_with_the_documented_code(tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under a shell's background job
    import alignlab.train
    from alignlab import cli

    for error, code in [
        (Interrupted("stopped by SIGTERM at step 3; ..."), 3),
        (NonFiniteError("the loss is nan at step 3"), 4),
        (StorageError("cannot write /r: no space"), 5),
        (RunDirectoryBusy("/r is in use by another run"), 6),
        (UserError("bad"), 2),
    ]:

        def fail(cfg, output_dir=None, error=error):
            raise error

        monkeypatch.setattr(alignlab.train, "run", fail)
        with pytest.raises(SystemExit) as stopped:
            # the random tiny model: no SFT stage to run first (it would meet the failing `run` too)
            cli.main(
                [
                    "train",
                    "+recipe=dpo",
                    "model.name_or_path=builtin:tiny",
                    f"hydra.run.dir={tmp_path / 'run'}",
                ]
            )
        assert stopped.value.code == code and code in EXIT_CODES
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignlab:")]
        assert lines == [f"alignlab: {'error: ' if code == 2 else ''}{error}"]
    assert signal.getsignal(signal.SIGINT) is before  # the CLI's handlers are removed
