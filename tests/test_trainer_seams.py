"""AlignTrainer's seams in transformers' `Trainer`, pinned: every private method it overrides or calls
and every private attribute it reads must still exist in the installed transformers with the
parameters it uses, so that a release renaming one fails here, not in the middle of a run."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

from alignlab.trainer import AlignTrainer

#: the private `Trainer` methods AlignTrainer overrides (no public hook does the job), each with the
#: parameters of HF's method that the override relies on.
PRIVATE_OVERRIDES = {
    # the completion marker must be written inside the save, before HF rotates old checkpoints
    # (`on_save` comes after the rotation)
    "_save_checkpoint": ("model", "trial"),
    # resumed at max_steps, HF trains one more step before it first checks should_training_stop
    "_run_epoch": ("epoch", "epochs_trained", "resume_from_checkpoint"),
    # under DeepSpeed the optimizer step's gradient norm is seen only here, before a log or save
    "_maybe_log_save_evaluate": ("tr_loss", "grad_norm"),
}
#: private `Trainer` methods AlignTrainer calls, with the parameters it passes.
PRIVATE_CALLS = {"_get_output_dir": ("trial",), "_prepare_inputs": ("inputs",)}
#: public methods AlignTrainer overrides, with the parameters it takes from HF's.
PUBLIC_OVERRIDES = {
    "get_batch_samples": ("epoch_iterator", "num_batches", "device"),
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "training_step": ("model", "inputs", "num_items_in_batch"),
    "prediction_step": ("model", "inputs", "prediction_loss_only", "ignore_keys"),
    "create_optimizer": ("model",),
    "log": ("logs", "start_time"),
    "train": ("resume_from_checkpoint",),
}
#: attributes HF's training loop sets that AlignTrainer saves and restores (the logging window).
LOOP_ATTRIBUTES = ("_tr_loss", "_total_loss_scalar", "_globalstep_last_logged", "_initial_global_step")


def missing(base: type, methods: dict[str, tuple[str, ...]]) -> list[str]:
    """What `base` lacks of `methods`: a method, or a parameter of one."""
    problems = []
    for name, parameters in methods.items():
        method = getattr(base, name, None)
        if not callable(method):
            problems.append(f"{base.__name__}.{name} is gone")
            continue
        have = inspect.signature(method).parameters
        problems += [f"{base.__name__}.{name} has no parameter {p!r}" for p in parameters if p not in have]
    return problems


def private_overrides(cls: type, base: type) -> set[str]:
    return {
        name
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and hasattr(base, name)
    }


def test_aligntrainer_overrides_only_the_listed_private_methods():
    assert private_overrides(AlignTrainer, Trainer) == set(PRIVATE_OVERRIDES)


@pytest.mark.parametrize(
    "methods",
    [PRIVATE_OVERRIDES, PRIVATE_CALLS, PUBLIC_OVERRIDES],
    ids=["private overrides", "private calls", "public overrides"],
)
def test_transformers_still_has_each_method_and_parameter(methods):
    assert missing(Trainer, methods) == []


def test_the_training_loop_still_sets_the_logging_window_attributes():
    loop = inspect.getsource(Trainer._inner_training_loop)
    assert [name for name in LOOP_ATTRIBUTES if f"self.{name} =" not in loop] == []


def test_the_gradient_accumulation_flag_is_still_read():
    assert "loss_is_scaled_for_ga" in vars(Trainer) and AlignTrainer.loss_is_scaled_for_ga is False


def test_the_pins_fail_on_a_renamed_method():
    class Renamed:
        def _save_checkpoint(self, model, trial_or_params):
            pass

        def _run_epoch_v2(self, model, epoch, epochs_trained, resume_from_checkpoint):
            pass

    class Overrides(Renamed):
        def _save_checkpoint(self, model, trial):
            pass

        def _helper(self):
            pass

    assert missing(Renamed, {"_save_checkpoint": ("model", "trial"), "_run_epoch": ("epoch",)}) == [
        "Renamed._save_checkpoint has no parameter 'trial'",
        "Renamed._run_epoch is gone",
    ]
    assert private_overrides(Overrides, Renamed) == {"_save_checkpoint"}
