"""The one trainer: HF `Trainer` with a loss from the registry.

HF Trainer / accelerate own the loop, mixed precision, gradient accumulation, DeepSpeed,
checkpointing, evaluation scheduling and reporting. This subclass only replaces how a batch becomes
a loss: it reads the loss's `Needs`, runs the concatenated forward of the policy (and of the frozen
reference when needed), calls the loss, reduces, and keeps the loss's metrics for logging.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from alignlab.checkpoints import (
    COMPLETE,
    LOG_STATE,
    LOSS_STATE,
    REFERENCE_STATE,
    checkpoint_folders,
    grads_finite,
    manifest,
    mark_complete,
    non_finite,
    save_batch,
)
from alignlab.distributed import average_gradients, fsdp_on_cpu, fsdp_share, prepare_frozen
from alignlab.errors import ConfigError, UserError
from alignlab.forward import ForwardPlan, ModelPlans
from alignlab.losses.base import Loss, LossInputs, Needs, StepTokens
from alignlab.reference import from_columns as reference_from_columns
from alignlab.rundir import INTERRUPTS, resume_command, storage_error


def reduce_loss(losses: torch.Tensor) -> torch.Tensor:
    """The only place per-example losses become the back-propagated scalar: a mean over examples.

    HF Trainer divides it by the gradient accumulation steps and data-parallel gradients are averaged,
    so with equal micro-batches the objective is the mean over the global batch whatever the split.
    """
    return losses.mean()


def loss_inputs(
    plans: ModelPlans,
    needs: Needs,
    inputs: dict[str, torch.Tensor],
    policy: nn.Module,
    policy_unwrapped: nn.Module,
    *,
    reference: nn.Module | None = None,
    teachers: dict[str, nn.Module] | None = None,
    precomputed_reference: bool = False,
    training: bool = True,
    step: StepTokens | None = None,
) -> LossInputs:
    """What a loss receives for one collated batch: the policy's forward (with gradient), and without
    gradient the reference's (live, with the activations the loss declared, or rebuilt from the
    batch's precomputed columns) and every teacher's, plus the batch's per-example fields; each model
    through the run's forward plan fitted to it (`plans`)."""

    def run(plan, model, head_of):
        return plan(model, head_of.get_output_embeddings(), inputs)

    policy_out = run(plans.policy, policy, policy_unwrapped)
    with torch.no_grad():
        ref = None
        if precomputed_reference:
            ref = reference_from_columns(inputs, policy_out)
        elif needs.reference:
            ref = run(plans.reference, reference, reference)
        teacher_out = {name: run(plans.teachers[name], m, m) for name, m in (teachers or {}).items()}
    fields = {name: inputs[name] for name in needs.batch_fields}
    return LossInputs(
        policy=policy_out, reference=ref, teachers=teacher_out, fields=fields, training=training, step=step
    )


def reference_pairs(reference: nn.Module, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (reference, policy) parameter pairs of the same name; a `ConfigError` when the two models do not
    have the same parameters (a `model.reference` of another architecture)."""
    ref, pol = dict(reference.named_parameters()), dict(policy.named_parameters())
    other = sorted(set(ref) ^ set(pol)) or [k for k in ref if ref[k].shape != pol[k].shape]
    if other:
        raise ConfigError(
            "model.reference_sync mixes the policy into the reference parameter by parameter, but the "
            f"reference's parameters differ from the policy's (first: {other[0]!r}). Fix: a "
            "model.reference of the policy's architecture, or model.reference_sync.enabled=false"
        )
    return [(ref[k], pol[k]) for k in ref]


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's update (Gorbatovski et al. 2024, arXiv:2404.09656; section not checked: docs/losses.md):
    θ_ref ← α·θ + (1 − α)·θ_ref for every parameter, in fp32 and stored in the reference's dtype; α = 1
    is the hard update (a copy)."""
    for ref, pol in reference_pairs(reference, policy):
        ref.copy_((alpha * pol.detach().float() + (1 - alpha) * ref.float()).to(ref.dtype))


class AlignTrainer(Trainer):
    """HF Trainer whose loss comes from `alignlab.losses` (see module docstring).

    Args:
        loss_fn: the registered loss module.
        reference: the frozen reference model, or None for reference-free losses.
        teachers: frozen teacher models by name (`Needs.teachers`), e.g. AlignDistil's.
        precomputed_reference: the batches carry the reference's log-probs (`alignlab.reference`)
            instead of a live reference model.
        forward_plan: the run's forward pass (`alignlab.forward.ForwardPlan`, from the `model.*`
            switches), fitted here once to the policy, the reference and each teacher; by default dense
            logits on padded batches.
        identity: the run's id, config fingerprint and config, recorded in every checkpoint
            (`alignlab.rundir`).
        reference_sync: TR-DPO's reference update (`config.ReferenceSyncConfig`: `enabled`, `alpha`,
            `every`); when enabled the reference's weights travel with every checkpoint.
        **kwargs: everything `transformers.Trainer` takes.
    """

    # compute_loss returns a per-batch mean; HF Trainer scales it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *,
        loss_fn: Loss,
        reference: nn.Module | None = None,
        teachers: dict[str, nn.Module] | None = None,
        forward_plan: ForwardPlan | None = None,
        precomputed_reference: bool = False,
        identity: dict | None = None,
        reference_sync=None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.identity = identity
        self._resume_checkpoint: str | None = None
        self.add_callback(_RunControl(self))
        self.loss_fn = loss_fn.to(self.args.device)
        self.needs = loss_fn.needs
        self.precomputed_reference = precomputed_reference
        if self.needs.reference and reference is None and not precomputed_reference:
            raise ValueError(f"loss {loss_fn.registry_name!r} needs a reference model and none was given")
        # on the device, or under ZeRO-3 partitioned inference engines (alignlab.distributed)
        self.reference = prepare_frozen(reference, self.args)
        self.teachers = {name: prepare_frozen(m, self.args) for name, m in (teachers or {}).items()}
        #: TR-DPO's schedule when the reference is updated during training, else None
        self.reference_sync = (
            reference_sync if reference_sync is not None and reference_sync.enabled else None
        )
        if self.reference_sync is not None:
            reference_pairs(self.reference, self.model)  # the same parameters, before any step
            self.add_callback(_ReferenceSync(self))
        self.plans = ModelPlans.fit(
            forward_plan or ForwardPlan.of(self.needs), self.model, self.reference, self.teachers
        )
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        #: (global step, micro-batches seen in it): names the batch a non-finite loss or gradient came from
        self._micro = (-1, 0)
        #: token counts of the current optimizer step (`get_batch_samples`), for step-wide token means
        self._step_tokens: StepTokens | None = None

    def create_accelerator_and_postprocess(self) -> None:
        """HF's accelerator; FSDP2 on CPU processes too (`alignlab.distributed.fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """HF's micro-batches of one optimizer step, and their token counts over every process
        (`LossInputs.step`): token means over a step's batch (TPO's gold NLL, NPO's retain terms) then
        give the same objective however the batch is split into micro-batches and processes."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        names = self.needs.responses
        counts = torch.zeros(2 * len(names), dtype=torch.float64)
        for batch in batches:
            for i, r in enumerate(names):
                counts[i] += (batch[f"{r}_labels"][:, 1:] != -100).sum().item()
                counts[len(names) + i] += batch[f"{r}_attention_mask"][:, 1:].sum().item()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(self.args.device), "sum").cpu()
        values = [int(c) for c in counts.tolist()]
        self._step_tokens = StepTokens(
            tokens=dict(zip(names, values[: len(names)])),
            positions=dict(zip(names, values[len(names) :])),
            micro_batches=max(len(batches), 1) * self.accelerator.num_processes,
        )
        return batches, num_items_in_batch

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # HF's "the last checkpoint in output_dir"
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = resume_from_checkpoint
        if resume_from_checkpoint is not None:
            self.load_loss_state(resume_from_checkpoint)
            self.load_reference_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        """HF's epoch, unless the run already reached `max_steps`: resumed from its last checkpoint, HF
        would train one step past the end (it checks for the end only after a step)."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _loss_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> LossInputs:
        return loss_inputs(
            self.plans,
            self.needs,
            inputs,
            model,
            self.accelerator.unwrap_model(model),
            reference=self.reference,
            teachers=self.teachers,
            precomputed_reference=self.precomputed_reference,
            training=model.training,
            step=self._step_tokens if model.training else None,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.loss_fn(self._loss_inputs(model, inputs))
        loss = reduce_loss(out.losses)
        if model.training and not torch.isfinite(loss.detach()).all():
            raise non_finite(f"the loss is {loss.item()}", self._where(), self._save_bad_batch(inputs))
        split = "train" if model.training else "eval"
        for name, value in out.metrics.items():
            self._metrics[split][name].append(value.detach().float())
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """HF's step; the loss's own parameters (not in the model, so neither zeroed by HF nor synced by
        DDP) start each step without gradient and get it averaged over processes, like the model's;
        then every gradient is checked finite (not under DeepSpeed, which keeps gradients in its own
        buffers: see `_maybe_log_save_evaluate`; not with fp16, whose loss scaler skips overflowing
        steps by design)."""
        step, seen = self._micro
        self._micro = (self.state.global_step, seen + 1 if step == self.state.global_step else 1)
        if self._micro[1] == 1:  # HF zeroes the model's gradients after each step, not the loss's own
            for p in self.loss_fn.parameters():
                p.grad = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        average_gradients(self.loss_fn.parameters())
        if (
            not self.args.fp16
            and not self.is_deepspeed_enabled
            and not grads_finite([*model.parameters(), *self.loss_fn.parameters()])
        ):
            raise non_finite("a gradient is NaN or infinite", self._where(), self._save_bad_batch(inputs))
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """Under DeepSpeed, whose gradients `training_step` cannot see: after each optimizer step, before
        any log or save, a non-finite gradient norm stops the run (the engine has applied the step, so
        nothing is saved: the last checkpoint stays the last good state)."""
        if (
            self.is_deepspeed_enabled
            and grad_norm is not None
            and not self.args.fp16
            and not math.isfinite(float(grad_norm))
        ):
            raise non_finite(
                f"the gradient norm is {float(grad_norm)}",
                f"step {self.state.global_step} (epoch {self.state.epoch:.2f})",
                None,
            )
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _where(self) -> str:
        k, n = self._micro[1], self.args.gradient_accumulation_steps
        return (
            f"step {self.state.global_step + 1}, micro-batch {k} of {n} (epoch {self.state.epoch or 0:.2f}"
            + (f", process {self.args.process_index}" if self.args.world_size > 1 else "")
            + ")"
        )

    def _save_bad_batch(self, inputs: dict) -> Path | None:
        """The offending batch in the run directory, named after its step (and process)."""
        rank = f"-process{self.args.process_index}" if self.args.world_size > 1 else ""
        path = Path(self.args.output_dir) / f"nonfinite-step{self.state.global_step + 1}{rank}.safetensors"
        try:
            return save_batch(inputs, path)
        except OSError:  # the error still names step and micro-batch
            return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        """HF's optimizer, plus the loss's own trainable parameters (e.g. SparsePO's mask heads)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            for group in self.loss_fn.param_groups():
                optimizer.add_param_group({"lr": self.args.learning_rate, **group})
        return optimizer

    # -- state the loss owns (BCO's δ, fitted classifiers, mask heads) travels with every checkpoint --
    def save_loss_state(self, output_dir: str | Path) -> None:
        """Write the loss module's state (if it has any) as `loss_state.safetensors` in `output_dir`."""
        state = self.loss_fn.state_dict()
        if state and self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()}, Path(output_dir) / LOSS_STATE
            )

    def load_loss_state(self, checkpoint: str | Path) -> None:
        """Resume the loss module's state from `checkpoint` (nothing for a loss without state); on every
        resume path, DeepSpeed's included (its engine loads the weights itself)."""
        if not self.loss_fn.state_dict():
            return
        path = Path(checkpoint) / LOSS_STATE
        if not path.exists():
            raise UserError(
                f"cannot resume: {checkpoint} has no {LOSS_STATE}: the loss {self.loss_fn.registry_name!r} "
                "keeps state (e.g. a running reward mean) that resuming without it would silently reset. "
                "Fix: resume from a checkpoint this loss wrote, or start a fresh run"
            )
        # copied onto the buffers' device (safetensors rejects "cpu:0")
        self.loss_fn.load_state_dict(load_file(path))

    # -- the reference, when the run updates it (TR-DPO), travels with every checkpoint --
    def save_reference_state(self, output_dir: str | Path) -> None:
        """Write the updated reference's weights as `reference.safetensors` (only with `reference_sync`)."""
        if self.reference_sync is not None and self.args.should_save:
            from safetensors.torch import save_model

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_model(self.reference, str(Path(output_dir) / REFERENCE_STATE))

    def load_reference_state(self, checkpoint: str | Path) -> None:
        """Resume the updated reference from `checkpoint` (only with `reference_sync`)."""
        if self.reference_sync is None:
            return
        path = Path(checkpoint) / REFERENCE_STATE
        if not path.exists():
            raise UserError(
                f"cannot resume: {checkpoint} has no {REFERENCE_STATE}: it was written without "
                "model.reference_sync, and resuming would restart the reference from the initial policy. "
                "Fix: resume from a checkpoint of a run with model.reference_sync.enabled=true, or start a "
                "fresh run"
            )
        from safetensors.torch import load_model

        load_model(self.reference, str(path))

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, the loss's state and the logging window in progress, then the completion
        marker (each file's size and checksum, written last: see alignlab.checkpoints), then the rotation
        of old checkpoints (`save_total_limit`), so that a complete one always exists. A failed write
        (disk full, permission denied) removes the partial folder and stops the run in one line."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            (folder / COMPLETE).unlink(
                missing_ok=True
            )  # overwriting a checkpoint: incomplete until re-marked
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
            self.save_loss_state(folder)
            self.save_reference_state(folder)
            self._save_log_state(folder)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                # HF's pickle of TrainingArguments (credentials such as hub_token included); resuming never
                # reads it, and the run's config.yaml holds the settings
                (folder / "training_args.bin").unlink(missing_ok=True)
                mark_complete(folder, self.identity)
        except Exception as err:
            if storage_error(err, folder, "write") is None:
                raise
            raise storage_error(
                err,
                folder,
                "write",
                tail=self._after_failed_save(run_dir, folder),
                resume=resume_command(run_dir),
            ) from None
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and limit:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _after_failed_save(self, run_dir: Path, folder: Path) -> str:
        """What a failed save leaves: the partial folder removed, the last complete checkpoint, how to
        resume."""
        import shutil

        if self.args.should_save:
            shutil.rmtree(folder, ignore_errors=True)
        previous = [p for p in checkpoint_folders(run_dir) if p != folder and manifest(p) is not None]
        kept = (
            f"{previous[-1].name} is the last complete checkpoint"
            if previous
            else "no checkpoint is complete yet"
        )
        return f" at step {self.state.global_step} (the partial {folder.name} was removed; {kept})"

    # -- the logging window in progress, so that the log after a resume equals the uninterrupted run's --
    def _log_state_file(self, folder: Path) -> Path:
        name = (
            LOG_STATE
            if self.args.world_size <= 1
            else LOG_STATE.replace(".json", f"_{self.args.process_index}.json")
        )
        return Path(folder) / name

    def _save_log_state(self, folder: Path) -> None:
        """The loss summed since the last log (HF's `_tr_loss`), the running total, the last logged step and
        the loss's metrics since the last log: each process its own."""
        if not hasattr(self, "_tr_loss"):
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {
            "tr_loss": self._tr_loss.item(),
            "total_loss_scalar": self._total_loss_scalar,
            "last_logged": self._globalstep_last_logged,
            "metrics": {
                name: [v.tolist() for v in values] for name, values in self._metrics["train"].items()
            },
        }
        self._log_state_file(folder).write_text(json.dumps(state))

    def _restore_log_state(self) -> None:
        """Called as training begins (after HF resets its logging state): the checkpoint's window
        continues."""
        path = self._resume_checkpoint and self._log_state_file(Path(self._resume_checkpoint))
        if not path or not path.is_file() or not hasattr(self, "_tr_loss"):
            return
        state = json.loads(path.read_text())
        self._tr_loss += torch.tensor(
            state["tr_loss"], dtype=self._tr_loss.dtype, device=self._tr_loss.device
        )
        self._total_loss_scalar = state["total_loss_scalar"]
        self._globalstep_last_logged = state["last_logged"]
        self._initial_global_step = (
            0  # HF's train_loss: the mean over the whole run, as without the interruption
        )
        self._metrics["train"] = defaultdict(
            list,
            {
                name: [torch.tensor(v, dtype=torch.float32, device=self.args.device) for v in values]
                for name, values in state["metrics"].items()
            },
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the loss's metrics, averaged since the last log and across processes, into `logs`."""
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, value in self._reduced_metrics(split).items():
            logs[prefix + name] = round(value, 6)
        self._metrics[split].clear()
        super().log(logs, start_time)

    def _reduced_metrics(self, split: str) -> dict[str, float]:
        """Each metric's mean over the steps since the last log, pooled over processes.

        A process may lack a metric another one has (e.g. BCO's `rewards/chosen` when its batches
        held no desirable example), so the names are agreed first and every process reduces the
        same tensor: per name, the sum of its step values and their count.
        """
        mine = {name: values for name, values in self._metrics[split].items() if values}
        names = sorted(mine)
        if self.accelerator.num_processes > 1:
            gathered = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(gathered, names)
            names = sorted(set().union(*gathered))
        if not names:
            return {}
        sums = torch.tensor(
            [[torch.stack(mine[n]).sum().item(), len(mine[n])] if n in mine else [0.0, 0.0] for n in names],
            dtype=torch.float64,
            device=self.args.device,
        )
        sums = self.accelerator.reduce(sums, "sum")
        return {name: (total / count).item() for name, (total, count) in zip(names, sums) if count > 0}


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train and eval) as one JSON line to `<run>/metrics.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class _RunControl(TrainerCallback):
    """The trainer's own hooks: restore the logging window on resume; on SIGTERM or Ctrl-C
    (`alignlab.rundir.INTERRUPTS`) save a checkpoint at the end of the step and stop."""

    def __init__(self, trainer: AlignTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainer._restore_log_state()
        share = fsdp_share(model) if model is not None else None
        if share:  # every process: its own share
            print(share, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if INTERRUPTS.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class _ReferenceSync(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024): after every `every`-th optimizer step, the reference moves to
    α·θ + (1 − α)·θ_ref (`mix_into`), before that step's checkpoint is saved (HF calls `on_step_end`
    first), so a checkpoint holds the reference of its step."""

    def __init__(self, trainer: AlignTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        every = self.trainer.reference_sync.every
        if every >= state.max_steps:
            raise ConfigError(
                f"model.reference_sync.every={every} is not below the run's {state.max_steps} optimizer "
                "steps: the reference would never be updated before training ends. Fix: set "
                f"model.reference_sync.every below {state.max_steps}, or model.reference_sync.enabled=false"
            )

    def on_step_end(self, args, state, control, **kwargs):
        sync = self.trainer.reference_sync
        if state.global_step % sync.every == 0:
            policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
            mix_into(self.trainer.reference, policy, sync.alpha)
        return control
