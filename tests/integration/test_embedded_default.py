"""`alignlab train +recipe=dpo`, as a new user types it: the SFT stage teaches the tiny model the task,
then DPO makes it write positive reviews. The command's own end-of-training eval must show it: the
policy beats the reference on held-out prompts (win rate >= 0.8) with fluent, positive samples."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignlab.builtin import NEGATIVE, POSITIVE, _words

pytestmark = pytest.mark.slow


def test_the_embedded_default_shows_dpo_working(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlab.cli",
            "train",
            "+recipe=dpo",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage sft: training in" in out.stdout
    (run_dir,) = (tmp_path / "runs" / "dpo").iterdir()
    sft = json.loads(next((tmp_path / "runs" / "stages").glob("sft-*/summary.json")).read_text())
    assert sft["train_losses"][-1] < 2.0 < sft["train_losses"][0]  # the reference learnt the task's reviews

    figures = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert figures["num_prompts"] == 64 and figures["distinct_prompts"] == 8  # held-out subjects and openings
    assert figures["win_rate"] >= 0.8, figures["win_rate"]
    assert figures["reward_policy"] > figures["reward_reference"] + 0.1
    assert figures["kl_policy_reference"] < 30  # reviews, not word salad
    positive = sum(r > 0 for r in figures["rewards_policy"]) / len(figures["rewards_policy"])
    assert positive >= 0.8, positive
    vocabulary = set(_words())
    for sample in figures["samples"]:  # sentences of the task: its words, more praise than criticism
        words = sample["policy"].split()
        assert len(words) >= 5 and set(words) <= vocabulary, sample
        assert sum(w in POSITIVE for w in words) > sum(w in NEGATIVE for w in words), sample
    assert f"win rate {figures['win_rate']:.3f}" in out.stdout
