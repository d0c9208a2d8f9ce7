"""Crash-safe checkpoints: complete-or-ignored, preemption-aware, and guarded against NaN.

HF Trainer writes `checkpoint-N/` file by file, so a kill during a save leaves a half-written folder,
and resuming from the highest-numbered one then fails (or silently starts a fresh optimizer when
`optimizer.pt` is missing). Here:

* a checkpoint is *complete* only once `alignlab_complete` is written inside it, after everything
  else; `trainer.resume_from_checkpoint=latest` takes the newest complete one and says which
  incomplete ones it skipped; a named checkpoint that is incomplete is refused with the reason;
* SIGTERM (SLURM preemption, `kill`) makes the trainer save a checkpoint at the end of the current
  step and stop cleanly (`PreemptionCallback`);
* a non-finite loss or gradient stops the run at once, naming the step and the micro-batch and saving
  that batch's tensors, before the optimizer applies it, so the last checkpoint stays the last good
  state (`NonFiniteError`, `AlignTrainer.training_step`). Under DeepSpeed, whose engine applies the
  step before alignlab sees its gradients, the non-finite gradient norm stops the run before
  anything is saved. With fp16 the loss scaler owns overflowing gradients (it skips those steps).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from alignlab.errors import UserError

COMPLETE = "alignlab_complete"
#: files every resumable checkpoint must hold (the model weights are checked separately).
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None if it can."""
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a folder"
    deepspeed = any(checkpoint.glob("global_step*"))  # DeepSpeed keeps optimizer and weights there
    required = ("trainer_state.json",) if deepspeed else REQUIRED
    missing = [name for name in required if not (checkpoint / name).exists()]
    if deepspeed:
        missing += [f"DeepSpeed {what} (global_step*/*{pattern})" for what, pattern in
                    (("model states", "model_states.pt"), ("optimizer states", "optim_states.pt"))
                    if not any(checkpoint.glob(f"global_step*/*{pattern}"))]
    elif not any((checkpoint / name).exists() for name in WEIGHTS):
        missing.append("model weights")
    if missing:
        return f"{checkpoint} lacks {', '.join(missing)}"
    if not (checkpoint / COMPLETE).exists():
        return f"{checkpoint} was not finished (no {COMPLETE}: the save was interrupted)"
    return None


def latest_complete(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` in `output_dir`, and why each newer one was skipped."""
    found = sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    skipped = []
    for _, path in reversed(found):
        reason = problem(path)
        if reason is None:
            return path, skipped
        skipped.append(reason)
    return None, skipped


def resolve(value: str | None, output_dir: Path) -> str | None:
    """`trainer.resume_from_checkpoint`: None, `latest`, or a folder, checked for completeness."""
    if value is None:
        return None
    if value != "latest":
        reason = problem(Path(value))
        if reason:
            raise UserError(f"cannot resume: {reason}. Fix: pass a complete checkpoint, or "
                            "trainer.resume_from_checkpoint=latest to take the newest complete one")
        return value
    path, skipped = latest_complete(output_dir)
    for reason in skipped:
        print(f"alignlab: skipping incomplete checkpoint: {reason}")
    if path is None:
        raise UserError(f"trainer.resume_from_checkpoint=latest but {output_dir} holds no complete checkpoint-*; "
                        "pass the run directory with output_dir=... (or hydra.run.dir=...)")
    print(f"alignlab: resuming from {path}")
    return str(path)


def grads_finite(parameters) -> bool:
    """Whether every gradient present among `parameters` is finite (True when none has one): their
    total norm, in fused (foreach) kernels and one host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False).isfinite())


def save_batch(batch: dict, path: Path) -> Path:
    """The tensors of a batch as safetensors (to decode the offending rows with the tokenizer)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)}, path)
    return path


def non_finite(what: str, where: str, batch_file: Path | None) -> NonFiniteError:
    """The error of a NaN or infinite `what` ("the loss is nan", "a gradient is NaN or infinite")."""
    saved = (f"; the batch is saved in {batch_file} (decode its *_input_ids with the tokenizer to see its rows)"
             if batch_file is not None else "")
    return NonFiniteError(
        f"{what} at {where}{saved}. Stopped before the optimizer applies it: the last checkpoint is the last "
        "good state. Fix: lower trainer.learning_rate, check that batch's data, or prefer bf16 to fp16")


def truncate_log(metrics_file: Path, checkpoint: str | Path) -> None:
    """Drop the records of `metrics_file` logged after `checkpoint`'s step: the resumed run logs those
    steps again (after a kill between a checkpoint and the next, they would appear twice)."""
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    lines = metrics_file.read_text().splitlines(keepends=True)

    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line the kill cut short
            return False

    kept = [line for line in lines if before(line)]
    if len(kept) < len(lines):
        tmp = metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(metrics_file)
        print(f"alignlab: {metrics_file.name}: dropped {len(lines) - len(kept)} records logged after step {step}, "
              "where the run resumes (they are logged again)")


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: save a checkpoint at the end of the current step and stop training cleanly."""

    def __init__(self) -> None:
        self.preempted = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        self.preempted = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def mark_complete(checkpoint: Path) -> None:
    """Written last: from now on `checkpoint` may be resumed from."""
    (Path(checkpoint) / COMPLETE).write_text("complete\n")
