"""Reproducible and safe runs: same seed, same losses; SIGKILL then resume gives the uninterrupted
trajectory; log-probs stay fp32 under bf16; secrets never reach the run directory."""

from __future__ import annotations

import json
import os
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
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in path.read_text().splitlines()
            if '"loss"' in line}


def test_same_seed_same_losses(tmp_path, compose_run):
    common = ("+recipe=dpo", "trainer.max_steps=5", "trainer.logging_steps=1", "trainer.eval_steps=0",
              f"data.cache_dir={tmp_path / 'cache'}")
    a = run(compose_run(*common), output_dir=tmp_path / "a")
    b = run(compose_run(*common), output_dir=tmp_path / "b")
    c = run(compose_run(*common, "seed=7"), output_dir=tmp_path / "c")
    assert _losses(a.metrics_file) == _losses(b.metrics_file)  # bitwise: same floats
    assert _losses(a.metrics_file) != _losses(c.metrics_file)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    cmd = [sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "trainer.max_steps=40", "trainer.save_steps=5",
           "trainer.logging_steps=1", "trainer.eval_steps=0", "data.eval_size=0", f"data.cache_dir={tmp_path / 'cache'}"]
    full = tmp_path / "full"
    subprocess.run([*cmd, f"hydra.run.dir={full}"], check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint-10" / COMPLETE).exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save or clean up
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run([*cmd, f"hydra.run.dir={killed}", "trainer.resume_from_checkpoint=latest"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = _losses(full / "metrics.jsonl"), _losses(killed / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 41))  # no step skipped or repeated
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


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
    result = run(compose_run("+recipe=dpo", "trainer.max_steps=2", "trainer.eval_steps=0",
                             f"data.cache_dir={tmp_path / 'cache'}"), output_dir=tmp_path / "run")
    for path in result.output_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"] == secret
