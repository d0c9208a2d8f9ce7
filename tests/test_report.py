"""alignlab.report.redact: credentials never reach a run's files, other settings are kept as they are."""

from __future__ import annotations

from alignlab.report import REDACTED, redact


def test_credential_keys_are_redacted_at_any_depth():
    config = {
        "trainer": {"extra": {"hub_token": "hf_x", "push_to_hub_token": "hf_y", "logging_steps": 5}},
        "logger": {"wandb": {"api_key": "k", "project": "p"}},
        "token": "t",
        "db": [{"password": "pw"}],
        "eval": {"max_new_tokens": 32},
        "model": {"pad_token": "<pad>", "tokenizer": "gpt2"},
    }
    assert redact(config) == {
        "trainer": {"extra": {"hub_token": REDACTED, "push_to_hub_token": REDACTED, "logging_steps": 5}},
        "logger": {"wandb": {"api_key": REDACTED, "project": "p"}},
        "token": REDACTED,
        "db": [{"password": REDACTED}],
        "eval": {"max_new_tokens": 32},
        "model": {"pad_token": "<pad>", "tokenizer": "gpt2"},
    }


def test_command_line_words_and_joined_overrides_are_redacted():
    argv = [
        "alignlab",
        "train",
        "+trainer.extra.hub_token=hf_x",
        "WANDB_API_KEY=k",
        "eval.max_new_tokens=3",
        "hydra.job.override_dirname=a=1",
        "+recipe=dpo,+trainer.extra.hub_token=hf_x,seed=3",
    ]
    assert redact(argv) == [
        "alignlab",
        "train",
        f"+trainer.extra.hub_token={REDACTED}",
        f"WANDB_API_KEY={REDACTED}",
        "eval.max_new_tokens=3",
        "hydra.job.override_dirname=a=1",
        f"+recipe=dpo,+trainer.extra.hub_token={REDACTED},seed=3",
    ]
