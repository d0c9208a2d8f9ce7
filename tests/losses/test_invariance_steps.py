"""(c) of the invariance suite (tests/losses/test_invariance.py): how a step's batch is split changes nothing.

For every registered loss (each distinct `Needs` of `registry_cases.CASES`, and each numeric option's
case for gradient accumulation), one optimizer step of HF
Trainer (`AlignTrainer`, plain SGD, so the update is the gradient) on 8 examples gives the same updated
weights, loss-owned state included (SparsePO's mask heads), whether the 8 come as one batch of 8, as
gradient accumulation of 2 × 4, or (slow tier) from 2 processes × 4 under DDP. Token means over a batch
(TPO's gold NLL, NPO's retain terms) are over the whole step (`LossInputs.step`), so they too agree.

A loss whose state moves with every forward batch by definition (BCO's δ) declares
`Loss.per_batch_state` with the reason; it is reported as skipped here, with that reason.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import registry_cases
import torch
from registry_cases import Case, distinct_needs, distinct_needs_and_numeric

HERE = Path(__file__).parent
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def models():
    return registry_cases.models()


def one_step(case: Case, per_device: int, accumulation: int, output_dir: str) -> dict[str, torch.Tensor]:
    """The policy's weights and the loss's state after one SGD step of AlignTrainer on `case.dataset`."""
    from transformers import TrainingArguments

    from alignlab.data.collate import PreferenceCollator
    from alignlab.trainer import AlignTrainer

    policy, loss = copy.deepcopy(case.policy), copy.deepcopy(case.loss)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        label_names=[],
        disable_tqdm=True,
    )
    needs = loss.needs
    trainer = AlignTrainer(
        model=policy,
        args=args,
        train_dataset=case.dataset,
        loss_fn=loss,
        reference=case.reference,
        teachers=case.teachers,
        data_collator=PreferenceCollator(0, responses=needs.responses, fields=needs.batch_fields),
    )
    trainer.train()
    state = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    state.update({f"loss.{k}": v.detach().clone() for k, v in loss.state_dict().items()})
    return state


def _compare(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("key", distinct_needs_and_numeric())
def test_gradient_accumulation_equals_one_batch(key, models, tmp_path):
    case = Case(key, models, b=8)
    if case.loss.per_batch_state:
        pytest.skip(f"{key}: {case.loss.per_batch_state}")
    want = one_step(case, 8, 1, str(tmp_path / "one"))
    got = one_step(case, 4, 2, str(tmp_path / "accumulated"))
    initial = {f"policy.{k}": v for k, v in case.policy.state_dict().items()}
    assert any(not torch.equal(want[k], initial[k]) for k in initial), "the step changed nothing"
    _compare(got, want)


def _worker() -> None:
    """Under torchrun: one step of 2 processes × 4 for every case; process 0 writes the states."""
    from safetensors.torch import save_file

    from alignlab import distributed

    distributed.init_processes()
    out = Path(os.environ["ALIGNLAB_TEST_OUT"])
    models = registry_cases.models()
    for key in distinct_needs():
        case = Case(key, models, b=8)
        state = one_step(case, 4, 1, str(out / key))
        if int(os.environ.get("RANK", "0")) == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{key}.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_batch(models, tmp_path):
    from safetensors.torch import load_file

    env = {
        **os.environ,
        "ALIGNLAB_TEST_OUT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(Path(__file__)),
        "--worker",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in distinct_needs():
        case = Case(key, models, b=8)
        if case.loss.per_batch_state:  # declared: its state moves with each process's batch
            continue
        got = load_file(str(tmp_path / f"{key}.safetensors"))
        _compare(got, one_step(case, 8, 1, str(tmp_path / f"one-{key}")))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
    print(json.dumps({"done": True}))
