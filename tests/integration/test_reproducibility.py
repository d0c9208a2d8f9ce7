"""Reproducible and safe runs: same seed, same losses; SIGKILL then resume gives the uninterrupted
trajectory; log-probs stay fp32 under bf16; secrets never reach the run directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from alignlab import builtin
from alignlab.checkpoints import COMPLETE
from alignlab.forward import concatenated_forward
from alignlab.train import run

pytestmark = pytest.mark.slow


def _losses(path):
    return {step: loss for step, loss in _loss_records(path)}


def _loss_records(path) -> list[tuple[int, float]]:
    """(step, loss) of every training-loss record, in file order (duplicates kept)."""
    return [
        (json.loads(line)["step"], json.loads(line)["loss"])
        for line in path.read_text().splitlines()
        if '"loss"' in line and '"train_runtime"' not in line
    ]


def _logged_step(path) -> int:
    """The last step `metrics.jsonl` has a loss for (0 if none yet, or if its last line is being written)."""
    try:
        return max((step for step, _ in _loss_records(path)), default=0)
    except (OSError, ValueError):
        return 0


def test_same_seed_same_losses(tmp_path, compose_run):
    common = (
        "+recipe=dpo",
        "trainer.max_steps=5",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    a = run(compose_run(*common), output_dir=tmp_path / "a")
    b = run(compose_run(*common), output_dir=tmp_path / "b")
    c = run(compose_run(*common, "seed=7"), output_dir=tmp_path / "c")
    assert _losses(a.metrics_file) == _losses(b.metrics_file)  # bitwise: same floats
    assert _losses(a.metrics_file) != _losses(c.metrics_file)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    # batch 64 of 2400 rows: the 40 steps cross an epoch (37.5 steps), so the resumed sampler must too
    cmd = [
        sys.executable,
        "-m",
        "alignlab.cli",
        "train",
        "+recipe=dpo",
        "model.name_or_path=builtin:tiny",
        "trainer.max_steps=40",
        "trainer.save_steps=5",
        "trainer.per_device_train_batch_size=64",
        "trainer.logging_steps=1",
        "trainer.eval_steps=0",
        "data.eval_size=0",
        "eval.generate=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    full = tmp_path / "full"
    subprocess.run([*cmd, f"hydra.run.dir={full}"], check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).randint(11, 14)  # past checkpoint-10, before checkpoint-15
    proc = subprocess.Popen(
        [*cmd, f"hydra.run.dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and _logged_step(killed / "metrics.jsonl") < kill_after:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no chance to save or clean up
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    logged = _logged_step(killed / "metrics.jsonl")
    assert 11 <= logged < 15 and (killed / "checkpoint-10" / COMPLETE).exists(), logged
    done = subprocess.run(
        [*cmd, f"hydra.run.dir={killed}", "trainer.resume_from_checkpoint=latest"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout and "checkpoint-10" in done.stdout
    assert f"dropped {logged - 10} records logged after step 10" in done.stdout
    want, got = _loss_records(full / "metrics.jsonl"), _loss_records(killed / "metrics.jsonl")
    assert (
        [step for step, _ in got] == [step for step, _ in want] == list(range(1, 41))
    )  # none skipped or repeated
    for (step, a), (_, b) in zip(want, got):
        assert b == pytest.approx(a, abs=1e-6), step


def test_log_probs_are_fp32_under_bf16():
    tok = builtin.build_tokenizer()
    model = builtin.build_model(len(tok), seed=0).to(torch.bfloat16)
    ids = torch.randint(6, len(tok), (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"x_input_ids": ids, "x_attention_mask": torch.ones_like(ids), "x_labels": labels}
    for chunk in (0, 4):
        out = concatenated_forward(model, batch, ("x",), chunk_size=chunk)["x"]
        assert out.token_logps.dtype == torch.float32


def test_secrets_never_reach_the_run_directory(tmp_path, compose_run, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    # a credential passed the recommended way (an interpolation of the environment) and resolved into the
    # config, a checkpoint (HF pickles TrainingArguments into training_args.bin) and the eval
    result = run(
        compose_run(
            "+recipe=dpo",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "trainer.save_steps=1",
            "+trainer.extra.hub_token=${oc.env:HF_TOKEN}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
        output_dir=tmp_path / "run",
    )
    assert "hub_token: <redacted>" in (result.output_dir / "config.yaml").read_text()
    assert (result.output_dir / "checkpoint-2").is_dir()
    for path in result.output_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"] == secret


def test_a_credential_typed_on_the_command_line_stays_out_of_every_file_and_output(tmp_path):
    secret = "hf_typed-on-the-command-line-0987654321"
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlab.cli",
            "train",
            "+recipe=dpo",
            "model.name_or_path=builtin:tiny",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "eval.generate=false",
            f"+trainer.extra.hub_token={secret}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert secret not in out.stdout + out.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").exists()  # Hydra's record of the command line, redacted
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
