"""`eval.*`: alignlab eval at the end of training, its PNG, and batched sampling's log-probs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from alignlab import builtin
from alignlab.evaluate import sample


def test_batched_sample_logps_match_a_plain_forward():
    tok = builtin.build_tokenizer()
    model = builtin.build_model(len(tok), seed=0).eval()
    prompts = ["review : the film was", "verdict : our game looked really", "in short , the show is"]
    gen = sample(model, model, tok, prompts, max_new_tokens=6, seed=0, batch_size=2)  # padding within a batch
    for (p, c), prompt, logp in zip(gen.ids, prompts, gen.logps_self):
        assert p == tok(prompt)["input_ids"] and len(c) == 6 or c[-1] == tok.eos_token_id
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].log_softmax(-1)
        by_hand = sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert float(logp) == pytest.approx(by_hand, abs=1e-4)


def test_eval_config_is_checked(compose_run):
    from alignlab.errors import ConfigError
    from alignlab.train import to_typed

    with pytest.raises(ConfigError, match="eval.reward must be module:function"):
        to_typed(compose_run("+recipe=dpo", "eval.reward=vader"))
    with pytest.raises(ConfigError, match="eval.num_prompts"):
        to_typed(compose_run("+recipe=dpo", "eval.num_prompts=0"))


def test_auto_reward_is_the_one_the_builtin_task_registers(monkeypatch):
    assert builtin.task_reward("builtin:sentiment") == "alignlab.builtin:sentiment_reward"
    assert builtin.task_reward("builtin:sentiment-understated") is None
    assert builtin.task_reward("org/pairs") is None
    own = replace(builtin.DATASETS["sentiment-forget"], reward="mine:score")  # a task and its reward
    monkeypatch.setitem(builtin.DATASETS, "mine", own)
    assert builtin.task_reward("builtin:mine") == "mine:score"


def test_end_of_training_eval_asks_the_task_for_its_reward(monkeypatch, tmp_path, compose_run):
    from alignlab import train

    seen = {}
    monkeypatch.setattr(
        train, "evaluate", lambda run_dir, reward, **kw: seen.setdefault("reward", reward) and {}
    )
    mine = replace(builtin.DATASETS["sentiment"], reward="mine:score")
    monkeypatch.setitem(builtin.DATASETS, "sentiment", mine)
    train.end_of_training_eval(train.to_typed(compose_run("+recipe=dpo")), tmp_path)
    assert seen["reward"] == "mine:score"


@pytest.mark.slow
def test_training_ends_with_an_eval_report_and_plot(tmp_path, compose_run):
    from alignlab.train import run

    run(
        compose_run(
            "+recipe=dpo",
            "trainer.max_steps=10",
            "trainer.eval_steps=0",
            "eval.num_prompts=4",
            "eval.max_new_tokens=5",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
        output_dir=tmp_path / "run",
    )
    figures = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert figures["num_prompts"] == 4 and figures["reward"] == "alignlab.builtin:sentiment_reward"
    assert len(figures["rewards_policy"]) == 4 and len(figures["logratios"]) == 4
    assert figures["kl_policy_reference"] == pytest.approx(sum(figures["logratios"]) / 4, abs=1e-3)
    png = tmp_path / "run" / "eval" / "reward_kl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reward_kl.png" in (tmp_path / "run" / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_eval_can_be_switched_off(tmp_path, compose_run):
    from alignlab.train import run

    run(
        compose_run(
            "+recipe=dpo",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "eval.generate=false",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
        output_dir=tmp_path / "run",
    )
    assert not (tmp_path / "run" / "eval").exists()
