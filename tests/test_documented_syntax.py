"""The syntax the docs show works as shown: dictionaries without `+`, chat templates by name, file
or text, recipes of one's own with `--config-dir`, and TRL's names pointed to alignlab's keys."""

from __future__ import annotations

import json

import pytest

from alignlab.cli import explain_overrides
from alignlab.compose import compose


def test_dictionaries_take_new_keys_without_plus():
    cfg = compose(
        [
            "+recipe=dpo",
            "data.columns={prompt: question, chosen: good}",
            "data.columns.rejected=bad",
            "trainer.extra.hub_model_id=me/x",
            "deepspeed=zero2",
            "deepspeed.config.zero_optimization.stage=3",
        ]
    )
    assert dict(cfg.data.columns) == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert dict(cfg.trainer.extra) == {"hub_model_id": "me/x"}
    assert cfg.deepspeed.config.zero_optimization.stage == 3
    assert (
        explain_overrides(
            ["+recipe=dpo", "data.columns={prompt: question}", "trainer.extra.push_to_hub=true"]
        )
        is None
    )
    assert (
        explain_overrides(["+recipe=dpo", "+trainer.extra.hub_token=x"]) is None
    )  # the `+` form still works


def test_typed_nodes_stay_closed():
    assert "unknown key 'data.colums'. Did you mean data.columns?" in explain_overrides(
        ["data.colums={a: b}"]
    )
    assert "could not be converted" in explain_overrides(["data.max_length=long"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.beta=0.1", "loss.beta"),
        ("trainer.gradient_checkpointing=true", "model.gradient_checkpointing"),
        ("trainer.max_length=512", "data.max_length"),
        ("trainer.max_prompt_length=64", "data.max_prompt_length"),
        ("trainer.precompute_ref_log_probs=true", "model.reference_mode=precomputed"),
    ],
)
def test_trl_names_point_to_alignlab_keys(override, key):
    problem = explain_overrides(["+recipe=dpo", override])
    assert (
        problem.startswith(f"unknown key '{override.split('=')[0]}'")
        and f"in alignlab it is {key}" in problem
    )


def test_recipe_of_ones_own_with_config_dir(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: dpo\nloss:\n  beta: 0.3\n"
    )
    assert explain_overrides(["--config-dir", str(tmp_path), "+recipe=mine"]) is None
    assert explain_overrides([f"--config-dir={tmp_path}", "+recipe=mine", "--cfg", "job"]) is None
    assert compose(["+recipe=mine"], str(tmp_path)).loss.beta == 0.3
    problem = explain_overrides(["+recipe=mine"])  # without --config-dir: say how to use one's own
    assert "unknown recipe 'mine'" in problem and "--config-dir" in problem
    assert "no such folder" in explain_overrides(["--config-dir", str(tmp_path / "nope"), "+recipe=mine"])
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - config\n  - _self_\nseed: 7\n"
    )  # a primary config of one's own
    assert explain_overrides(["-cd", str(tmp_path), "--config-name", "mine", "+recipe=mine"]) is None
    assert compose(["+recipe=mine"], str(tmp_path), "mine").seed == 7
    assert "loss.bta" in explain_overrides(["-cd", str(tmp_path), "--config-name=mine", "loss.bta=1"])


def test_unparsable_value_says_how_to_quote():
    problem = explain_overrides(["+recipe=dpo", "model.chat_template={% for m in messages %}"])
    assert problem.startswith("cannot parse") and "Quote" in problem


def test_chat_template_by_name_file_folder_or_text(tmp_path):
    from alignlab.models import CHAT_TEMPLATES, ModelError, chat_template

    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert chat_template(text) == text
    assert chat_template("chatml") == CHAT_TEMPLATES["chatml"]
    (tmp_path / "t.jinja").write_text(text)
    assert chat_template(str(tmp_path / "t.jinja")) == text
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": text}))
    assert chat_template(str(tmp_path / "tok")) == text
    for bad, says in [
        ("chatmll", "is not a template name (plain, chatml)"),
        (str(tmp_path), "holds no chat template"),
    ]:
        with pytest.raises(ModelError, match=r"model\.chat_template=") as err:
            chat_template(bad)
        assert says in str(err.value)


def test_named_template_renders_a_conversation():
    from alignlab.builtin import build_tokenizer
    from alignlab.models import CHAT_TEMPLATES

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATES["plain"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "user: hi\nassistant: "


@pytest.mark.parametrize(
    "alias, dtype",
    [
        ("bf16", "bfloat16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("fp32", "float32"),
        ("torch.bfloat16", "bfloat16"),
        ("auto", "auto"),
    ],
)
def test_dtype_aliases(alias, dtype):
    from alignlab.config import ModelConfig

    assert ModelConfig(name_or_path="x", dtype=alias).dtype == dtype


def test_every_trl_name_is_in_the_from_trl_page():
    import re
    from pathlib import Path

    from alignlab.config import TRL_NAMES

    page = (Path(__file__).resolve().parents[1] / "docs" / "from_trl.md").read_text()
    spans = " ".join(re.findall(r"`([^`]*)`", page))
    assert [name for name in TRL_NAMES if not re.search(rf"\b{name}\b", spans)] == []
