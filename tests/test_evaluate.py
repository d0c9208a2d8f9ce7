"""Evaluation metrics on hand-made cases, and the report of a real (tiny) run."""

from __future__ import annotations

import pytest
import torch

from alignlab import builtin
from alignlab.evaluate import evaluate, sample, win_rate


@pytest.fixture(scope="module")
def tiny():
    tok = builtin.build_tokenizer()
    return tok, builtin.build_model(len(tok), seed=0).eval()


def test_kl_of_the_reference_against_itself_is_zero(tiny):
    tok, model = tiny
    gen = sample(
        model, model, tok, ["review : the film was", "verdict : our game looked"], max_new_tokens=8, seed=0
    )
    assert torch.equal(gen.logps_self, gen.logps_other)
    assert float((gen.logps_self - gen.logps_other).mean()) == 0.0


def test_a_model_against_itself_wins_half(tiny):
    tok, model = tiny
    prompts = ["review : the film was", "my take : this book felt", "in short , the show is"]
    a = sample(model, model, tok, prompts, max_new_tokens=8, seed=1)
    b = sample(model, model, tok, prompts, max_new_tokens=8, seed=1)
    reward = builtin.sentiment_reward
    assert win_rate(reward(prompts, a.completions), reward(prompts, b.completions)) == 0.5


def test_win_rate_by_hand():
    assert win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 1.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_sentiment_reward_by_hand():
    assert builtin.sentiment_reward([""], ["really great and dull ."]) == [pytest.approx((1 - 1) / 5)]
    assert builtin.sentiment_reward([""], ["great great"]) == [1.0]


@pytest.mark.slow
def test_eval_of_a_saved_run_writes_its_report(tmp_path, compose_run):
    from alignlab.train import run

    result = run(
        compose_run(
            "+recipe=dpo",
            "trainer.max_steps=20",
            "trainer.eval_steps=0",
            "eval.generate=false",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
        output_dir=tmp_path / "run",
    )
    figures = evaluate(
        result.output_dir, reward="alignlab.builtin:sentiment_reward", num_prompts=4, max_new_tokens=6
    )
    first = tmp_path / "run" / "eval" / "report.md"
    assert figures["report"] == str(first) and first.read_text().startswith("# Evaluation of")
    assert figures["kl_policy_reference"] > 0 and 0 <= figures["win_rate"] <= 1
    assert figures["held_out"]["eval_rewards/accuracies"] > 0.5
    # a second evaluation, with other settings, goes beside the first
    before = first.read_text()
    again = evaluate(result.output_dir, num_prompts=12, max_new_tokens=3)
    assert again["report"] == str(tmp_path / "run" / "eval-2" / "report.md") and first.read_text() == before
    assert again["num_prompts"] == 12 and again["distinct_prompts"] == 8  # the 8 held-out prompts, cycled
    assert (
        "12 samples on 8 distinct held-out prompts" in (tmp_path / "run" / "eval-2" / "report.md").read_text()
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--reward", "alignlab.builtin"], "must be module:function"),
        (["--reward", "alignlab.no_such_module:f"], "cannot import module 'alignlab.no_such_module'"),
        (
            ["--reward", "alignlab.builtin:no_such_function"],
            "module 'alignlab.builtin' has no function 'no_such_function'",
        ),
    ],
)
def test_eval_arguments_are_checked_before_any_model_loads(tmp_path, monkeypatch, capsys, argv, message):
    import alignlab.evaluate
    from alignlab.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("{}\n")

    def refuse(*args, **kwargs):
        raise AssertionError("the run's config and models were loaded before the arguments were checked")

    monkeypatch.setattr(alignlab.evaluate, "load_run_config", refuse)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and message in err[0], err


def test_right_padded_batch_labels_only_the_completion():
    from alignlab.evaluate import _right_padded

    batch = _right_padded([([5, 6], [7]), ([5], [8, 9, 2])], pad=0, device="cpu")
    assert batch["x_input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 9, 2]]
    assert batch["x_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["x_labels"].tolist() == [[-100, -100, 7, -100], [-100, 8, 9, 2]]
    assert {t.dtype for t in batch.values()} == {torch.long}
