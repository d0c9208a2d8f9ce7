"""A new user's first real run: DPO on a real pretrained model (stories260k from ../shared) and a
fresh 1,000-pair JSONL file, through `alignlab train` as the README writes it. It must succeed on
the first command, with the real-model settings (not the embedded toy's) and no SFT stage, and the
saved run must evaluate from any directory."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

SUBJECTS = [
    "a dog",
    "the park",
    "a red ball",
    "my sister",
    "the garden",
    "a small boat",
    "the rain",
    "a cake",
]


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """HH-style `{prompt, chosen, rejected}` rows in TinyStories words, all distinct."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        prompt = f"\n\nHuman: Tell me a short story about {subject}, number {i}.\n\nAssistant:"
        chosen = f" Once upon a time there was {subject}. It was happy and played all day."
        rejected = f" {subject} was sad. The end."
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def test_dpo_on_a_real_model_and_a_fresh_file_succeeds_first_time(tmp_path, shared_path):
    model = shared_path("models", "stories260k")
    work = tmp_path / "project"
    work.mkdir()
    (work / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _pairs(1000)))
    cmd = [
        sys.executable,
        "-m",
        "alignlab.cli",
        "train",
        "+recipe=dpo",
        f"model.name_or_path={model}",
        "data.path=pairs.jsonl",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "eval.max_new_tokens=8",
        f"data.cache_dir={tmp_path / 'cache'}",
        "hydra.run.dir=runs/first",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "read 1000 rows, kept 1000 (train 900, eval 100), skipped 0" in out.stdout
    assert "truncated 0 prompts (to data.max_prompt_length=512) and 0 responses" in out.stdout
    assert "stage sft: not used by this run" in out.stdout and not (work / "runs" / "stages").exists()

    run_dir = work / "runs" / "first"
    saved = OmegaConf.load(run_dir / "config.yaml")
    # a real model's settings: TRL's DPOConfig lengths and learning rate, the paper's β
    assert (saved.data.max_length, saved.data.max_prompt_length) == (1024, 512)
    assert (saved.trainer.learning_rate, saved.trainer.per_device_train_batch_size) == (1e-6, 8)
    assert saved.loss.beta == 0.1
    assert saved.data.path == str(work / "pairs.jsonl")  # stored absolute: the run evaluates from anywhere
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["train_losses"]) >= 1 and "eval_rewards/accuracies" in summary["eval"]

    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlab.cli",
            "eval",
            str(run_dir),
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
