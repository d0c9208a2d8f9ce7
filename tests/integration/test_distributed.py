"""Scale-out invariants on this CPU: two processes under torchrun (DeepSpeed ZeRO-2/3 or FSDP2 over
gloo, or DDP) train exactly like one process with the same global batch; gradient accumulation k x b equals
one batch of k*b; a two-process run resumes from its checkpoint like the uninterrupted run.

Tolerance: per-step losses and gradient norms agree to 1e-5 absolute (measured: ~1e-7, the float32
rounding of a different reduction order); the gradient norm is compared too because Adam's update
would hide a wrongly scaled gradient. Every distributed run is a real `torchrun -m alignlab.cli train`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignlab.train import run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TOL = 1e-5
#: the global batch: 32 examples a step (2 processes x 16, or 1 x 32).
#: β = 0.1 (the paper's; the toy's β = 1 scales the gradients tenfold, and with them Adam's magnification
#: of float noise in near-zero gradient entries beyond the weights' tolerance below).
STEPS = (
    "trainer.logging_steps=1",
    "trainer.eval_steps=0",
    "trainer.warmup_steps=0",
    "data.eval_size=0",
    "loss.beta=0.1",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir, *overrides: str, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node <nproc> -m alignlab.cli train <overrides>` into `run_dir`; its stdout."""
    port = _free_port()
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(port),
        "-m",
        "alignlab.cli",
        "train",
        f"hydra.run.dir={run_dir}",
        "model.name_or_path=builtin:tiny",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir, key: str = "loss") -> dict[int, float]:
    """Per-step values of `key` (the training loss by default) in a run's metrics.jsonl."""
    return {r["step"]: r[key] for r in _records(run_dir) if key in r and "train_runtime" not in r}


def _weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def _saved_weights(model_dir) -> dict[str, torch.Tensor]:
    """A LoRA adapter's tensors, or the parameters of the model as plain transformers loads it (a
    DeepSpeed save may also store a tied head that `save_pretrained` leaves out)."""
    if (model_dir / "adapter_model.safetensors").exists():
        return load_file(model_dir / "adapter_model.safetensors")
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())


CASES = {
    # name: (the engine's override, overrides of both runs, overrides of the two-process run only)
    "zero2-dpo": ("deepspeed=zero2", ("+recipe=dpo",), ()),
    # TR-DPO: each process mixes the (unpartitioned) ZeRO-2 policy into its reference after every step
    "zero2-trdpo": ("deepspeed=zero2", ("+recipe=trdpo", "model.reference_sync.every=1"), ()),
    # full-vocabulary logits: chunked heads of the policy and of the partitioned reference engine
    "zero3-tdpo": ("deepspeed=zero3", ("+recipe=tdpo",), ()),
    # the reference is the adapter-disabled policy (LoRA dropout off: it would draw per-process masks)
    "zero3-dpo-lora": (
        "deepspeed=zero3",
        ("+recipe=dpo", "model.lora.enabled=true", "model.lora.dropout=0", "trainer.learning_rate=1e-2"),
        (),
    ),
    # scored half each (in step: 2400 rows in 25 batches of 96, the process with 12 repeats one) with the
    # partitioned reference, gathered, cached by process 0; vs a live reference
    "zero3-dpo-precomputed": (
        "deepspeed=zero3",
        ("+recipe=dpo",),
        ("model.reference_mode=precomputed", "trainer.per_device_eval_batch_size=96"),
    ),
    # teachers as partitioned inference engines, their full logits chunked through gathered frozen heads
    "zero3-aligndistil": (
        "deepspeed=zero3",
        (
            "+recipe=dpo",
            "loss=aligndistil",
            "loss.dpo_teacher=builtin:tiny",
            "loss.reverse_teacher=builtin:tiny",
        ),
        (),
    ),
    # one logit position per chunk: the processes' batches need different numbers of chunks (lengths and
    # response positions differ), and each chunk gathers the partitioned head collectively
    "zero3-tdpo-small-chunks": ("deepspeed=zero3", ("+recipe=tdpo", "model.logit_chunk_size=1"), ()),
    # DDP without DeepSpeed; SparsePO's own mask heads get their gradients averaged too
    "ddp-sparsepo": ("deepspeed=none", ("+recipe=sparsepo",), ()),
    # FSDP2 (accelerate's fully_shard): full-vocabulary logits chunked through the sharded policy's head
    # (gathered with the embeddings and final norm as one unit) and the whole, unsharded live reference
    "fsdp2-tdpo": ("distributed=fsdp2", ("+recipe=tdpo",), ()),
    # the whole reference scores half the rows in each process, gathered, cached by process 0
    "fsdp2-dpo-precomputed": (
        "distributed=fsdp2",
        ("+recipe=dpo",),
        ("model.reference_mode=precomputed", "trainer.per_device_eval_batch_size=96"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_like_one(case, tmp_path, compose_run):
    engine, common, multi_only = CASES[case]
    if engine.startswith("deepspeed=") and engine != "deepspeed=none":
        pytest.importorskip("deepspeed")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    single = run(
        compose_run(*common, *STEPS, "trainer.max_steps=3", "trainer.per_device_train_batch_size=32", cache),
        output_dir=tmp_path / "single",
    )
    out = _torchrun(
        tmp_path / "two",
        *common,
        *multi_only,
        *STEPS,
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=16",
        engine,
        cache,
    )

    two = _losses(tmp_path / "two")
    assert list(two) == [1, 2, 3]  # one record a step: only process 0 writes metrics.jsonl
    assert [two[s] for s in (1, 2, 3)] == pytest.approx(single.train_losses, abs=TOL)
    assert _losses(tmp_path / "two", "grad_norm") == pytest.approx(
        _losses(single.output_dir, "grad_norm"), abs=TOL
    )
    assert two[3] != two[1]  # and it did train (AlignDistil from teachers equal to the student starts at 0)
    # the final weights (gathered from the ZeRO-3 partitions; the adapter with LoRA), as loaded back, are
    # the same too, to Adam's magnification of float noise in near-zero gradients
    a, b = _saved_weights(single.model_dir), _saved_weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4)
    assert (
        out.count("alignlab: run finished") == 1 and out.count("data builtin:sentiment") == 1
    )  # process 0 prints
    if engine == "distributed=fsdp2":  # sharded, not DDP: each process holds about half of the policy
        shares = re.findall(
            r"FSDP2: process (\d) of 2 holds ([\d,]+) of the policy's ([\d,]+) parameters", out
        )
        assert sorted(s[0] for s in shares) == ["0", "1"], out[-3000:]
        total = int(shares[0][2].replace(",", ""))
        assert sum(int(s[1].replace(",", "")) for s in shares) == total
        assert all(int(s[1].replace(",", "")) < 0.6 * total for s in shares)
    if "model.reference_mode=precomputed" in multi_only:
        assert out.count("reference log-probs: computed") == 1
        caches = list((tmp_path / "cache" / "reference").glob("reference-*.arrow"))
        assert len(caches) == 1  # one writer
        # each process scored half of the rows, to a batch (whole batches, dealt out round-robin), and the
        # cache holds exactly what one process scoring them all writes
        share = r"process (\d) scored (\d+ of \d+ rows \(\d+ batches(?:, 1 repeated)?\))"
        shares = dict(re.findall(share, out))
        assert shares == {
            "0": "1248 of 2400 rows (13 batches)",
            "1": "1152 of 2400 rows (12 batches, 1 repeated)",
        }
        run(
            compose_run(
                *common, *multi_only, *STEPS, "trainer.max_steps=1", f"data.cache_dir={tmp_path / 'one'}"
            ),
            output_dir=tmp_path / "one-run",
        )
        one = list((tmp_path / "one" / "reference").glob("reference-*.arrow"))
        assert [p.name for p in one] == [caches[0].name]  # the same key
        assert caches[0].read_bytes() == one[0].read_bytes()


def test_gradient_accumulation_equals_the_large_batch(tmp_path, compose_run):
    """2 micro-batches of 16 accumulated = one batch of 32: same per-step losses and final weights."""
    # SGD: its update is proportional to the gradient, so a wrongly scaled one would show in the weights
    common = (
        "+recipe=dpo",
        *STEPS,
        "trainer.max_steps=3",
        "trainer.optim=sgd",
        "trainer.learning_rate=0.5",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    large = run(compose_run(*common, "trainer.per_device_train_batch_size=32"), output_dir=tmp_path / "large")
    accumulated = run(
        compose_run(
            *common, "trainer.per_device_train_batch_size=16", "trainer.gradient_accumulation_steps=2"
        ),
        output_dir=tmp_path / "accumulated",
    )
    assert accumulated.train_losses == pytest.approx(large.train_losses, abs=TOL)
    grad_norms = _losses(large.output_dir, "grad_norm")
    assert _losses(accumulated.output_dir, "grad_norm") == pytest.approx(grad_norms, abs=TOL)
    a, b = _weights(large.model_dir), _weights(accumulated.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("engine", ["deepspeed=zero2", "distributed=fsdp2"])
def test_two_process_run_resumes_from_its_checkpoint(engine, tmp_path, compose_run):
    """BCO under ZeRO-2 or FSDP2: its running reward mean δ is all-reduced (so two processes match one)
    and travels with the checkpoint (so the resumed run matches the uninterrupted one); FSDP2 resumes
    from accelerate's own checkpoint files (pytorch_model_fsdp.bin, optimizer.bin)."""
    if engine.startswith("deepspeed="):
        pytest.importorskip("deepspeed")
    common = (
        "+recipe=bco",
        *STEPS,
        "trainer.max_steps=4",
        "trainer.save_steps=2",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    two = ("trainer.per_device_train_batch_size=16", engine)
    single = run(
        compose_run(*common, "trainer.per_device_train_batch_size=32"), output_dir=tmp_path / "single"
    )
    _torchrun(tmp_path / "full", *common, *two)
    full = _losses(tmp_path / "full")
    assert [full[s] for s in (1, 2, 3, 4)] == pytest.approx(single.train_losses, abs=TOL)

    if engine == "distributed=fsdp2":  # accelerate's FSDP checkpoint, not a plain one
        assert (tmp_path / "full" / "checkpoint-2" / "optimizer.bin").exists()
    (tmp_path / "resumed").mkdir()  # an interrupted run: only the step-2 checkpoint survived
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _torchrun(tmp_path / "resumed", *common, *two, "trainer.resume_from_checkpoint=latest")
    resumed = _losses(tmp_path / "resumed")
    assert list(resumed) == [3, 4]  # continues from the saved step
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[3], full[4]], abs=TOL)
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "resumed" / "model")
    for name in a:  # Adam magnifies float noise in near-zero gradients: 1e-5 is 1% of one step (lr 1e-3)
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)
