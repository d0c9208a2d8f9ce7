"""Every YAML under configs/ and recipes/ composes against the typed schema; mistakes fail early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignlab.compose import register_configs
from alignlab.config import resource_dir
from alignlab.train import to_typed

CONFIGS, RECIPES = resource_dir("configs"), resource_dir("recipes")
register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=overrides)


def _group_overrides() -> list[list[str]]:
    out = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parent != Path("."):  # a group option such as configs/model/tiny.yaml
            out.append([f"{rel.parent.as_posix()}={rel.stem}"])
    out += [[f"+recipe={p.stem}"] for p in sorted(RECIPES.rglob("*.yaml"))]
    return out


def test_every_yaml_is_covered():
    n_files = len(list(CONFIGS.rglob("*.yaml"))) + len(list(RECIPES.rglob("*.yaml")))
    assert len(_group_overrides()) == n_files - 1  # all but the root config.yaml, which every case composes


@pytest.mark.parametrize("overrides", _group_overrides(), ids=lambda o: o[0])
def test_composes_and_validates(overrides):
    typed = to_typed(_compose(overrides))
    assert typed.model.name_or_path and typed.data.path and typed.loss.name


def test_recipe_overrides_defaults():
    cfg = _compose(["+recipe=dpo", "loss.beta=0.25"])
    assert cfg.loss.beta == 0.25 and cfg.trainer.max_steps > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.alhpa=1"], "loss.alhpa"),
        (["trainer.learning_rate=fast"], "trainer.learning_rate"),
        (["+recipe=dpx"], "recipe/dpx"),
        (["model=nonexistent"], "model/nonexistent"),
        (["loss=dpx"], "loss/dpx"),
    ],
)
def test_mistakes_fail_at_compose_time(overrides, message):
    with pytest.raises(Exception, match=message):
        _compose(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.loss_type=sigmod"], "loss.loss_type must be one of"),
        (["data.on_bad_row=ignore"], "data.on_bad_row must be one of"),
        (["data.max_prompt_length=64", "data.max_length=32"], "data.max_prompt_length"),
        (["data.eval_size=1.5"], "a fraction below 1 or a whole number of rows, got 1.5"),
        (["data.max_prompt_length=0"], "data.max_prompt_length must be >= 1"),
        (["data.num_proc=0"], "data.num_proc must be >= 1"),
        (["seed=-1"], r"seed must be in \[0, 2\*\*32\)"),
        (["trainer.gradient_accumulation_steps=0"], "trainer.gradient_accumulation_steps must be >= 1"),
        (["trainer.learning_rate=-1e-5"], "trainer.learning_rate must be >= 0"),
        (["trainer.max_steps=0"], "trains zero steps"),
        (["model.dtype=int8"], "model.dtype must be one of"),
    ],
)
def test_bad_values_fail_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        to_typed(_compose(overrides))


def test_cli_prints_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "loss.beta=0.3", "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cfg = OmegaConf.to_container(OmegaConf.create(out))  # as printed, interpolations unresolved
    assert cfg["loss"]["name"] == "dpo" and cfg["loss"]["beta"] == 0.3
    assert cfg["model"]["name_or_path"] == "builtin:tiny@${stage:sft}/model" and "sft" in cfg["stages"]


# --- the embedded default's settings stay bound to it (${embedded:TOY,REAL}) -------------------------

EMBEDDED_RECIPES = [
    "aligndistil",
    "asft",
    "bco",
    "combo",
    "cpo",
    "dpo",
    "kto",
    "modpo",
    "npo",
    "orpo",
    "rdpo",
    "rpo",
    "simpo",
    "sparsepo",
    "tdpo",
    "tpo",
]


@pytest.mark.slow  # plans the sft stage of every recipe: about 60 Hydra compositions
def test_every_recipe_on_the_embedded_default_uses_the_toy_settings_and_the_sft_stage():
    from alignlab.stages import used_stages

    assert sorted(p.stem for p in RECIPES.glob("*.yaml") if "_" not in p.stem) == EMBEDDED_RECIPES
    for recipe in EMBEDDED_RECIPES:
        cfg = _compose([f"+recipe={recipe}"])
        typed = to_typed(cfg)
        assert "sft" in used_stages(cfg), recipe
        assert typed.model.name_or_path.startswith("builtin:tiny@") and typed.model.name_or_path.endswith(
            "/model"
        )
        assert typed.trainer.learning_rate >= 1e-4 and typed.trainer.max_steps > 0, recipe  # seconds on a CPU
        assert (typed.data.max_length, typed.data.max_prompt_length) == (48, 16), recipe


@pytest.mark.parametrize("recipe", EMBEDDED_RECIPES)
def test_naming_a_model_gives_real_settings_and_no_sft_stage(recipe, tmp_path):
    from alignlab.stages import used_stages

    cfg = _compose(
        [
            f"+recipe={recipe}",
            f"model.name_or_path={tmp_path / 'my-model'}",
            f"data.path={tmp_path / 'pairs.jsonl'}",
        ]
    )
    typed = to_typed(cfg)
    assert "sft" not in used_stages(cfg)
    assert typed.model.name_or_path == str(tmp_path / "my-model")
    assert (
        typed.trainer.learning_rate <= 1e-5 and typed.trainer.max_steps == -1
    )  # epochs, at a real model's rate
    assert typed.trainer.num_train_epochs >= 1 and typed.trainer.per_device_train_batch_size == 8
    assert (typed.data.max_length, typed.data.max_prompt_length) == (1024, 512)
    assert typed.eval.num_prompts == 8


def test_dpo_real_settings_are_trl_and_the_handbook():
    typed = to_typed(_compose(["+recipe=dpo", "model.name_or_path=org/model", "data.path=org/pairs"]))
    t = typed.trainer
    assert (t.learning_rate, t.per_device_train_batch_size, t.num_train_epochs, t.warmup_steps) == (
        1e-6,
        8,
        1,
        0.1,
    )
    assert typed.loss.beta == 0.1


@pytest.mark.parametrize("model", ["builtin:tiny", "org/model"])
def test_command_line_settings_win_on_either_model(model):
    typed = to_typed(
        _compose(
            [
                "+recipe=dpo",
                f"model.name_or_path={model}",
                "trainer.learning_rate=2e-4",
                "trainer.max_steps=7",
                "data.max_length=100",
                "data.max_prompt_length=50",
            ]
        )
    )
    assert (typed.trainer.learning_rate, typed.trainer.max_steps) == (2e-4, 7)
    assert (typed.data.max_length, typed.data.max_prompt_length) == (100, 50)


def test_raw_tiny_model_keeps_toy_settings_without_the_stage():
    from alignlab.stages import used_stages

    cfg = _compose(["+recipe=dpo", "model.name_or_path=builtin:tiny"])
    assert used_stages(cfg) == set() and to_typed(cfg).trainer.max_steps == 150
