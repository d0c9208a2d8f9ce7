"""A run directory belongs to one run: its lock, its record, who may write into it, and how a run stops.

* **Lock.** A run holds an exclusive `flock` on `<run>/.alignlab.lock` for its lifetime; a second run
  in the same directory is refused with one line naming the holder (pid, host, start, command). The
  kernel drops the lock when its process dies, so a lock file left by a dead process is simply taken.
* **Identity.** A run has an id and a config fingerprint: a hash of its resolved config without the
  settings that may change when it resumes (`MAY_CHANGE_ON_RESUME`: logging, evaluation, checkpoint
  cadence, the length of the run, where files go, the forward's exact speed switches). Both are in
  `<run>/alignlab_run.json` and in every checkpoint's completion marker (`alignlab.checkpoints`).
* **Claim.** `claim` decides, before anything is written, what a run may do in its directory: start
  fresh, resume which checkpoint, or refuse (a finished run, another run's checkpoints, a different
  config) with the fix. `take_over` then writes, only once the run has passed validation and holds
  the lock.
* **Signals.** SIGTERM and Ctrl-C (SIGINT) ask the run to stop at the end of the current step with a
  checkpoint (`Interrupts`); a second Ctrl-C stops at once.

Nothing here imports torch or transformers: the CLI installs the signal handlers before those load.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignlab import checkpoints
from alignlab.errors import ConfigError, Interrupted, RunDirectoryBusy, StorageError, UserError
from alignlab.report import redact

RECORD = "alignlab_run.json"
LOCK = ".alignlab.lock"
#: config keys (and key prefixes) that may change when a run resumes; every other key is part of the
#: config fingerprint, so resuming under another seed, loss, model, data or optimiser is refused.
MAY_CHANGE_ON_RESUME = (
    "output_dir",
    "stages_dir",
    "trainer.resume_from_checkpoint",
    "trainer.resume_any_config",
    "trainer.overwrite_output_dir",
    "trainer.logging_steps",
    "trainer.eval_steps",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.max_steps",
    "trainer.num_train_epochs",
    "trainer.per_device_eval_batch_size",
    "trainer.dataloader_num_workers",
    "data.cache_dir",
    "data.num_proc",
    "logger",
    "eval",
    # the forward's speed switches: the same losses and gradients to rounding (test_invariance.py)
    "model.logit_chunk_size",
    "model.skip_unused_logits",
    "model.drop_padding_mask",
    "model.padding_free",
    "model.prefix_sharing",
)
#: what a run leaves in its directory; a directory holding any of them belongs to a run.
ARTIFACTS = ("checkpoint-*", "model", "model_merged", "summary.json", "metrics.jsonl", RECORD)
#: what `trainer.overwrite_output_dir=true` removes (after the new run has passed validation).
REPLACED = (
    *ARTIFACTS,
    "curves.png",
    "eval",
    "data_report.json",
    "nonfinite-step*.safetensors",
    "error.log",
    "config.yaml",
    "environment.json",
)


# -- identity ----------------------------------------------------------------------------------------
def identity_config(container: dict) -> dict[str, Any]:
    """The fingerprinted part of a resolved, redacted config, flattened to `{"a.b": value}`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif not _may_change(prefix):
            flat[prefix] = value

    walk("", container)
    return flat


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(theirs: dict[str, Any], ours: dict[str, Any], limit: int = 4) -> str:
    """`seed 1 -> 2, loss.name 'dpo' -> 'ipo'`: the keys whose values differ, theirs first."""
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<unset>") != ours.get(k, "<unset>"))
    shown = [f"{k} {theirs.get(k, '<unset>')!r} -> {ours.get(k, '<unset>')!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class Identity:
    """Who writes a run directory: the run's id, and its config (fingerprinted part) and fingerprint."""

    run_id: str
    config: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "fingerprint": self.fingerprint, "config": self.config}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


# -- lock ----------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held until `release` (or the process ends)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK
        self._file = None

    def acquire(self) -> RunLock:
        try:
            handle = open(self.path, "a+")
        except OSError as err:
            raise storage_error(err, self.path, "claim the run directory") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by another run ({holder}). "
                "Fix: wait for it to finish (or stop it), "
                "or pick another run directory (hydra.run.dir=... / output_dir=...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(redact(list(sys.argv))),
                }
            )
        )  # no credentials in files
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


# -- the run's record ------------------------------------------------------------------------------------
def read_record(output_dir: Path) -> dict | None:
    try:
        return json.loads((Path(output_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_record(output_dir: Path, identity: Identity, status: str, **extra) -> None:
    """`alignlab_run.json`: the run's id, fingerprint and status (running, finished)."""
    record = {"run_id": identity.run_id, "fingerprint": identity.fingerprint, "status": status, **extra}
    tmp = Path(output_dir) / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(Path(output_dir) / RECORD)


def finished(output_dir: Path) -> bool:
    record = read_record(output_dir)
    return (record or {}).get("status") == "finished" or (Path(output_dir) / "summary.json").is_file()


def _artifacts(output_dir: Path) -> list[Path]:
    return sorted(p for pattern in ARTIFACTS for p in Path(output_dir).glob(pattern))


# -- claim -----------------------------------------------------------------------------------------------
@dataclass
class Claim:
    """What a run does in its directory: resume `resume` (None: start fresh) as run `identity`."""

    resume: str | None
    identity: Identity
    #: remove what an earlier run left (trainer.overwrite_output_dir=true)
    replace: bool = False


def claim(
    output_dir: Path,
    value: str | None,
    ours: Identity,
    *,
    overwrite: bool = False,
    any_config: bool = False,
    loss_state: bool = False,
) -> Claim:
    """Decide, before writing anything, whether and how this run may use `output_dir` (see module doc).

    Raises:
        UserError: one line naming what the directory holds and the fix.
    """
    output_dir = Path(output_dir)
    overwrite_fix = "pass trainer.overwrite_output_dir=true to replace it"
    if overwrite:
        if value is not None:
            raise ConfigError(
                "trainer.overwrite_output_dir=true replaces what the run directory holds, and "
                f"trainer.resume_from_checkpoint={value} resumes from it: pass only one of them"
            )
        if _artifacts(output_dir):
            print(
                f"alignlab: trainer.overwrite_output_dir=true: replacing the earlier run in {output_dir} "
                "(once this run has passed validation)"
            )
        return Claim(None, ours, replace=True)
    if value is not None and value != "latest":
        checkpoint = Path(value)
        reason = checkpoints.problem(checkpoint, loss_state=loss_state)
        if reason:
            raise UserError(
                f"cannot resume: {reason}. Fix: pass a complete checkpoint, or "
                "trainer.resume_from_checkpoint=latest to take the newest complete one"
            )
        return Claim(value, _resumed_identity(checkpoint, ours, any_config))

    record = read_record(output_dir)
    other_run = record is not None and record.get("fingerprint") != ours.fingerprint and not any_config
    if value is None:
        if finished(output_dir):
            raise UserError(
                f"{output_dir} holds a finished run. Fix: resume it with "
                "trainer.resume_from_checkpoint=latest, pick another run directory, or " + overwrite_fix
            )
        found = checkpoints.checkpoint_folders(output_dir)
        if found:
            raise UserError(
                f"{output_dir} holds checkpoints of an unfinished run ({found[-1].name} the newest). "
                "Fix: resume it with trainer.resume_from_checkpoint=latest, pick another run directory, "
                "or " + overwrite_fix
            )
        if other_run:
            raise UserError(
                f"{output_dir} belongs to another run (run {record.get('run_id')}, another config). "
                "Fix: pick another run directory, or " + overwrite_fix
            )
        return Claim(None, ours)

    # latest: the newest verified checkpoint of this run's config
    path, skipped = checkpoints.latest_complete(
        output_dir, loss_state=loss_state, fingerprint=None if any_config else ours.fingerprint
    )
    for reason in skipped:
        print(f"alignlab: skipping {reason}")
    if path is not None:
        print(f"alignlab: resuming from {path}")
        return Claim(str(path), _resumed_identity(path, ours, any_config))
    others = [
        p for p in checkpoints.checkpoint_folders(output_dir) if checkpoints.other_config(p, ours.fingerprint)
    ]
    if others or other_run:
        if others:
            diff = differences(checkpoints.identity_of(others[-1]).get("config", {}), ours.config)
            what = f"checkpoints of another run ({others[-1].name} the newest), whose config differs ({diff})"
        else:
            what = f"another run (run {record.get('run_id')}), whose config differs"
        raise UserError(
            f"trainer.resume_from_checkpoint=latest: {output_dir} holds {what}. Fix: pick another run "
            "directory, pass trainer.resume_any_config=true to resume it under this config, or "
            + overwrite_fix
        )
    if finished(output_dir):
        raise UserError(
            f"trainer.resume_from_checkpoint=latest: {output_dir} holds a finished run and no checkpoint "
            f"of it (its model is in {output_dir / 'model'}): nothing to resume. Fix: pick another run "
            "directory, or " + overwrite_fix
        )
    print(
        f"alignlab: trainer.resume_from_checkpoint=latest: no complete checkpoint in {output_dir} yet; "
        "starting a fresh run"
    )
    return Claim(None, ours)


def _resumed_identity(checkpoint: Path, ours: Identity, any_config: bool) -> Identity:
    """This run's identity when resuming `checkpoint`: the checkpoint's run id, refused if its config
    differs."""
    theirs = checkpoints.identity_of(checkpoint)
    if theirs is None:  # written before checkpoints recorded their run
        return ours
    if theirs.get("fingerprint") != ours.fingerprint:
        diff = differences(theirs.get("config", {}), ours.config)
        if not any_config:
            raise UserError(
                f"cannot resume {checkpoint}: it was written under another config ({diff}). Fix: resume "
                "with the config it was written with, or pass trainer.resume_any_config=true to resume it "
                "under this one (training then continues under the new settings)"
            )
        print(
            f"alignlab: trainer.resume_any_config=true: resuming {checkpoint} under another config ({diff})"
        )
    return Identity(theirs.get("run_id") or ours.run_id, ours.config)


def take_over(output_dir: Path, claimed: Claim) -> None:
    """After validation, under the lock: clear what an earlier run left, as `claimed` says."""
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if claimed.replace:
        for path in sorted({p for pattern in REPLACED for p in output_dir.glob(pattern)}):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif claimed.resume is None:
        metrics.unlink(missing_ok=True)  # a fresh start of an unfinished run without checkpoints: a fresh log
    elif metrics.exists():
        checkpoints.truncate_log(metrics, claimed.resume)


# -- how a run tells how to resume, and why it stopped ----------------------------------------------------
def resume_command(output_dir: Path) -> str:
    """The command that resumes this run: the CLI's own overrides, with resume=latest and the directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra context: the API form below
        hydra = None
    if hydra is None:
        return f"run(cfg with trainer.resume_from_checkpoint=latest, output_dir={str(output_dir)!r})"
    overrides = redact(list(hydra.overrides.task))
    if Path(hydra.runtime.output_dir).resolve() != Path(output_dir).resolve():
        # a stage of a multi-stage run: the same command reuses the finished stages and resumes this one
        return shlex.join(["alignlab", "train", *overrides, f"hydra.run.dir={hydra.runtime.output_dir}"])
    keep = [
        o
        for o in overrides
        if not re.match(
            r"[+~]*(trainer\.resume_from_checkpoint|trainer\.overwrite_output_dir|output_dir)=", o
        )
    ]
    return shlex.join(
        ["alignlab", "train", *keep, "trainer.resume_from_checkpoint=latest", f"hydra.run.dir={output_dir}"]
    )


#: OS errors that mean the run directory cannot be written, and what to do.
_STORAGE = {
    errno.ENOSPC: (
        "no space left on its disk",
        "free space (or lower trainer.save_total_limit, or use a run directory on a larger disk)",
    ),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota, or use another disk"),
    errno.EACCES: ("permission denied", "make it writable, or pick another run directory"),
    errno.EPERM: ("permission denied", "make it writable, or pick another run directory"),
    errno.EROFS: ("the file system is read-only", "pick a run directory on a writable disk"),
}
#: what torch.save and safetensors say when a write fails (they drop the errno).
_WRITE_FAILED = re.compile(
    r"iostream error|PytorchStreamWriter failed|file write failed|No space left|"
    r"unexpected pos|Disk quota|Read-only file system|Permission denied",
    re.I,
)


def free_bytes(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def storage_error(
    err: BaseException, path: Path, what: str, *, tail: str = "", resume: str = ""
) -> StorageError | None:
    """One line for an error writing `path` (disk full, permission denied), or None if `err` is not one:
    `tail` says more of what happened, `resume` is the command to run once it is fixed."""
    code = getattr(err, "errno", None)
    if code not in _STORAGE:
        if not (isinstance(err, (OSError, RuntimeError)) and _WRITE_FAILED.search(str(err))):
            return None
        free = free_bytes(path)
        text = str(err)
        code = (
            errno.EACCES
            if "ermission" in text
            else errno.EROFS
            if "Read-only" in text
            else errno.ENOSPC
            if free is None or free < 256 * 2**20 or "space" in text.lower()
            else None
        )
        if code is None:
            return StorageError(
                f"cannot {what} {path}: the write failed ({text.splitlines()[0][:120]}){tail}"
                + (f"; resume with: {resume}" if resume else "")
            )
    cause, fix = _STORAGE[code]
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        cause += f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    where = getattr(err, "filename", None) or path
    return StorageError(
        f"cannot {what} {where}: {cause}{tail}. Fix: {fix}"
        + (f", then resume with: {resume}" if resume else "")
    )


def check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file in it; a StorageError in one line if that fails (before
    Hydra writes its `.hydra/` records there, which it reports with a stack trace)."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        err.filename = None  # name the folder, not the probe
        raise storage_error(err, Path(folder), "write in") or StorageError(
            f"cannot write in {folder}: {err}"
        ) from None


# -- signals ----------------------------------------------------------------------------------------------
class Interrupts:
    """SIGTERM and Ctrl-C: the first asks the run to stop at the end of its step with a checkpoint; a
    second Ctrl-C stops at once (KeyboardInterrupt). Installed by the outermost caller, nested calls share."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def install(self) -> Interrupts:
        self._depth += 1
        if self._depth == 1:
            self.received = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    break
        return self

    def uninstall(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop at once
            return
        self.received = name
        if signum == signal.SIGINT:
            print(
                "\nalignlab: Ctrl-C: saving a checkpoint at the end of this step "
                "(Ctrl-C again stops at once)",
                file=sys.stderr,
                flush=True,
            )


INTERRUPTS = Interrupts()


def interrupted(output_dir: Path, step: int | None, checkpoint: Path | None) -> Interrupted:
    """The one line of a run stopped by a signal, with the exact command that resumes it."""
    where = f"at step {step}" if step is not None else "during start-up, before training"
    saved = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint yet (resuming starts afresh)"
    return Interrupted(
        f"stopped by {INTERRUPTS.received} {where}; {saved}. Resume with: {resume_command(output_dir)}"
    )
