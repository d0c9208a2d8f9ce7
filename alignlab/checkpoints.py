"""Crash-safe checkpoints: verified or ignored, of this run's config, and guarded against NaN.

HF Trainer writes `checkpoint-N/` file by file, so a kill during a save leaves a half-written folder,
and resuming from the highest-numbered one then fails (or silently starts a fresh optimizer when
`optimizer.pt` is missing). Here:

* a checkpoint is *complete* only once `alignlab_complete` is written inside it, after everything
  else has been written and `fsync`ed (the files, then the folders): a JSON manifest with each file's
  size and SHA-256 digest (of its 16 MiB blocks' SHA-256s, hashed by several threads at once), and
  the run that wrote it (its id and config fingerprint, `alignlab.rundir`);
* a checkpoint is *resumable* when it is complete, every file a resume needs is there (weights,
  optimizer, scheduler, trainer state, RNG state, and the loss's state when the loss keeps one), and
  every file still has its recorded size and checksum (`problem`);
* `trainer.resume_from_checkpoint=latest` takes the newest resumable checkpoint of this run's config
  and says in one line why it skipped each newer one; a named checkpoint that is not resumable is
  refused with the reason (`alignlab.rundir.claim`);
* a non-finite loss or gradient stops the run at once, naming the step and the micro-batch and saving
  that batch's tensors, before the optimizer applies it, so the last checkpoint stays the last good
  state (`NonFiniteError`, `AlignTrainer.training_step`). Under DeepSpeed, whose engine applies the
  step before alignlab sees its gradients, the non-finite gradient norm stops the run before
  anything is saved. With fp16 the loss scaler owns overflowing gradients (it skips those steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from alignlab.errors import RunStopped

COMPLETE = "alignlab_complete"
#: the manifest format `mark_complete` writes (1: the plain text "complete" of older alignlab).
MANIFEST_FORMAT = 2
#: files every resumable checkpoint must hold (the model weights and RNG state are checked separately).
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
#: the loss module's buffers and parameters (e.g. BCO's running reward mean δ).
LOSS_STATE = "loss_state.safetensors"
#: the reference model's weights when the run updates it (TR-DPO, `model.reference_sync`).
REFERENCE_STATE = "reference.safetensors"
#: the logging window in progress (so that the log after a resume equals the uninterrupted run's).
LOG_STATE = "log_state.json"


class NonFiniteError(RunStopped, RuntimeError):
    """The loss or a gradient became NaN or infinite."""

    exit_code = 4


#: files are hashed in blocks of this size, by several threads at once (hashlib releases the GIL);
#: a file's digest is the SHA-256 of its blocks' SHA-256s.
BLOCK = 16 << 20


def _block_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(BLOCK)).digest()


def digests(paths: list[Path]) -> dict[Path, str]:
    """Each file's digest (see `BLOCK`), its blocks hashed in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(path, offset) for path in paths for offset in range(0, max(path.stat().st_size, 1), BLOCK)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        blocks = list(pool.map(lambda job: _block_digest(*job), jobs))
    combined: dict = {}
    for (path, _), block in zip(jobs, blocks):
        combined.setdefault(path, hashlib.sha256()).update(block)
    return {path: digest.hexdigest() for path, digest in combined.items()}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint: Path, identity: dict | None = None) -> None:
    """Written last: every file's size and checksum, once the files and folders are on the disk; from
    then on `checkpoint` may be resumed from. `identity`: the run's id, fingerprint and config."""
    checkpoint = Path(checkpoint)
    paths = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE)
    hashed = digests(paths)
    files = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size, "digest": hashed[path]}
        for path in paths
    }
    for path in paths:
        _fsync_file(path)
    for folder in sorted({p.parent for p in checkpoint.rglob("*")} | {checkpoint}, reverse=True):
        _fsync_dir(folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "digest": f"sha256 of the sha256 of each {BLOCK >> 20} MiB block",
        "files": files,
        **(identity or {}),
    }
    tmp = checkpoint / (COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(checkpoint / COMPLETE)
    _fsync_dir(checkpoint)
    _fsync_dir(checkpoint.parent)


def manifest(checkpoint: Path) -> dict | None:
    """The completion marker's manifest; `{}` for an older alignlab's plain marker; None if absent or
    unreadable."""
    try:
        text = (Path(checkpoint) / COMPLETE).read_text()
    except OSError:
        return None
    if text.strip() == "complete":
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def identity_of(checkpoint: Path) -> dict | None:
    """The run id, fingerprint and config that wrote `checkpoint` (None for older checkpoints)."""
    data = manifest(checkpoint) or {}
    return data if "fingerprint" in data else None


def other_config(checkpoint: Path, fingerprint: str) -> bool:
    """Whether `checkpoint` was written under a config whose fingerprint is not `fingerprint`."""
    theirs = identity_of(checkpoint)
    return theirs is not None and theirs.get("fingerprint") != fingerprint


def problem(checkpoint: Path, *, loss_state: bool = False, verify: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None if it can.

    Args:
        loss_state: the loss keeps state (`loss_state.safetensors` is required).
        verify: check every file's size and checksum against the manifest (else only their presence).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a folder"
    deepspeed = any(checkpoint.glob("global_step*"))  # DeepSpeed keeps optimizer and weights there
    # FSDP (accelerate): weights in pytorch_model_fsdp*, optimizer in optimizer.bin (or optimizer_0/)
    fsdp = any(checkpoint.glob("pytorch_model_fsdp*"))
    required = (
        ["trainer_state.json"] if deepspeed else [n for n in REQUIRED if not (fsdp and n == "optimizer.pt")]
    )
    if loss_state:
        required.append(LOSS_STATE)
    missing = [name for name in required if not (checkpoint / name).exists()]
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if deepspeed:
        missing += [
            f"DeepSpeed {what} (global_step*/*{pattern})"
            for what, pattern in (
                ("model states", "model_states.pt"),
                ("optimizer states", "optim_states.pt"),
            )
            if not any(checkpoint.glob(f"global_step*/*{pattern}"))
        ]
    elif fsdp:
        if not any(checkpoint.glob("optimizer*.bin")) and not any(checkpoint.glob("optimizer_*")):
            missing.append("FSDP optimizer states (optimizer.bin)")
    elif not any((checkpoint / name).exists() for name in WEIGHTS):
        missing.append("model weights")
    if missing:
        return f"{checkpoint} lacks {', '.join(missing)}"
    data = manifest(checkpoint)
    if data is None:
        return f"{checkpoint} was not finished (no readable {COMPLETE}: the save was interrupted)"
    if not verify or not data:  # an older alignlab's marker holds no checksums
        return None
    files = data.get("files", {})
    for name, entry in files.items():  # sizes first: cheap, and catch truncation
        path = checkpoint / name
        if not path.is_file():
            return f"{checkpoint} lost {name} after it was saved"
        size = path.stat().st_size
        if size != entry["size"]:
            return (
                f"{checkpoint}/{name} is {size} bytes, {entry['size']} when saved (truncated or overwritten)"
            )
    hashed = digests([checkpoint / name for name in files])
    for name, entry in files.items():
        if hashed[checkpoint / name] != entry["digest"]:
            return f"{checkpoint}/{name} does not match its checksum (corrupted after it was saved)"
    return None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of a run directory, oldest (lowest N) first."""
    found = sorted(
        (int(m.group(1)), p)
        for p in Path(output_dir).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
    )
    return [p for _, p in found]


def latest_complete(
    output_dir: Path, *, loss_state: bool = False, fingerprint: str | None = None
) -> tuple[Path | None, list[str]]:
    """The newest resumable `checkpoint-N` in `output_dir` (of the config `fingerprint`, when given),
    and why each newer one was skipped."""
    skipped = []
    for path in reversed(checkpoint_folders(output_dir)):
        reason = problem(path, loss_state=loss_state)
        if reason is None and fingerprint is not None and other_config(path, fingerprint):
            reason = (
                f"{path}: written by another run (run {identity_of(path).get('run_id')}), "
                "whose config differs"
            )
        if reason is None:
            return path, skipped
        skipped.append(reason)
    return None, skipped


def grads_finite(parameters) -> bool:
    """Whether every gradient present among `parameters` is finite (True when none has one): their
    total norm, in fused (foreach) kernels and one host sync."""
    import torch

    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False).isfinite())


def save_batch(batch: dict, path: Path) -> Path:
    """The tensors of a batch as safetensors (to decode the offending rows with the tokenizer)."""
    import torch
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)}, path
    )
    return path


def non_finite(what: str, where: str, batch_file: Path | None) -> NonFiniteError:
    """The error of a NaN or infinite `what` ("the loss is nan", "a gradient is NaN or infinite")."""
    saved = (
        f"; the batch is saved in {batch_file} (decode its *_input_ids with the tokenizer to see its rows)"
        if batch_file is not None
        else ""
    )
    return NonFiniteError(
        f"{what} at {where}{saved}. Stopped before the optimizer applies it: the last checkpoint is the last "
        "good state. Fix: lower trainer.learning_rate, check that batch's data, or prefer bf16 to fp16"
    )


def truncate_log(metrics_file: Path, checkpoint: str | Path) -> None:
    """Keep the records of `metrics_file` that the run resuming from `checkpoint` does not log again:
    those up to the checkpoint's step, and before the record that ends a `train()` call (it holds
    `train_runtime`; the resumed run writes its own, and the final evaluation follows it)."""
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line the kill cut short
            continue
        if "train_runtime" in record:
            break
        if record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(metrics_file)
        print(
            f"alignlab: {metrics_file.name}: dropped {len(lines) - len(kept)} records logged after "
            f"step {step}, "
            "where the run resumes (they are logged again)"
        )
