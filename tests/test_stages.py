"""Multi-stage recipes (alignlab.stages): stage configs, hashed directories, `${stage:NAME}`, reuse, failure.

Planning tests compose configs only; the tests marked slow train the embedded tiny model for 2 steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab.errors import ConfigError
from alignlab.losses.dpo import DPOConfig
from alignlab.stages import StageError, plan, used_stages
from alignlab.train import run, run_stages, to_typed


@pytest.fixture
def compose(compose_run, tmp_path):
    """`compose(*overrides)`: a 2-step DPO run on a few builtin pairs, stages and caches in tmp_path."""

    def make(*overrides: str):
        return compose_run(
            "+recipe=dpo",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "trainer.logging_steps=1",
            "data.limit=64",
            "data.eval_size=16",
            f"stages_dir={tmp_path / 'stages'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        )

    return make


def _expected_hash(stage_cfg) -> str:
    """sha256 of the stage's config without its location settings, written out independently."""
    content = OmegaConf.to_container(stage_cfg, resolve=True)
    for key in ("output_dir", "stages_dir"):
        content.pop(key)
    content["data"].pop("cache_dir")
    content["trainer"].pop("resume_from_checkpoint")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


# --- planning: what a stage is and where it goes --------------------------------------------------


def test_stage_config_is_the_run_plus_its_overrides(compose, tmp_path):
    cfg = compose("loss.beta=0.3", '+stages.reverse=["data.swap_pairs=true","trainer.learning_rate=0.01"]')
    (stage,) = plan(cfg)
    assert stage.name == "reverse"
    assert stage.config.data.swap_pairs is True and stage.config.trainer.learning_rate == 0.01
    assert stage.config.loss.beta == 0.3 and stage.config.trainer.max_steps == 2  # the run's own settings
    assert stage.config.stages == {}
    assert stage.directory == (tmp_path / "stages" / f"reverse-{_expected_hash(stage.config)}")
    assert stage.config.output_dir == str(stage.directory)
    assert cfg.data.swap_pairs is False  # the run's config is untouched


def test_group_override_replaces_the_whole_group(compose_run, tmp_path):
    # the modpo recipe sets loss.weights and loss.margins; its margin stage selects loss=dpo
    cfg = compose_run("+recipe=modpo", "loss.beta=0.3", f"stages_dir={tmp_path}")
    (margin,) = plan(cfg)
    # exactly DPO's own defaults: nothing of the recipe's loss group (weights, margins, beta) leaks in
    dpo_defaults = dataclasses.asdict(DPOConfig())
    assert "weights" not in dpo_defaults and dpo_defaults["beta"] == 0.1
    assert OmegaConf.to_container(margin.config.loss) == dpo_defaults
    assert margin.config.data.path == "builtin:sentiment-understated"
    assert to_typed(margin.config).loss.name == "dpo"


def test_stage_directory_depends_on_what_it_trains_only(compose):
    def directory(*overrides: str) -> Path:
        return plan(compose('+stages.first=["trainer.learning_rate=0.01"]', *overrides))[0].directory

    base = directory()
    assert directory("trainer.max_steps=3") != base  # a different training run
    assert directory("seed=1") != base
    assert directory("output_dir=/elsewhere", "data.cache_dir=/elsewhere/cache") == base  # where files go
    assert directory("trainer.resume_from_checkpoint=latest") == base


def test_members_of_a_weight_sweep_share_the_margin_stage(compose_run, tmp_path):
    dirs = {
        plan(compose_run("+recipe=modpo", f"loss.weights={w}", f"stages_dir={tmp_path}"))[0].directory
        for w in ("[0.1,0.9]", "[0.5,0.5]", "[0.9,0.1]")
    }
    assert len(dirs) == 1


def test_stage_resolver_gives_the_planned_directory(compose_run, tmp_path):
    cfg = compose_run("+recipe=modpo", f"stages_dir={tmp_path / 'stages'}")
    (margin,) = plan(cfg)
    typed = to_typed(cfg)  # resolves ${stage:margin}/model
    assert typed.loss.margins[0].model == f"{margin.directory}/model"
    assert Path(typed.loss.margins[0].model).is_absolute()


def test_later_stage_refers_to_an_earlier_one(compose):
    cfg = compose(
        '+stages.first=["trainer.learning_rate=0.01"]',
        '+stages.second=["model.reference=${stage:first}/model"]',
    )
    first, second = plan(cfg)
    assert second.config.model.reference == f"{first.directory}/model"
    # the second stage's identity includes the first's: change the first, and both move
    first2, second2 = plan(
        compose(
            '+stages.first=["trainer.learning_rate=0.02"]',
            '+stages.second=["model.reference=${stage:first}/model"]',
        )
    )
    assert first2.directory != first.directory and second2.directory != second.directory


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.reference=${stage:nope}/model",), r"no stage named 'nope' \(its stages: none\)"),
        (
            ('+stages.first=["model.reference=${stage:second}/model"]', '+stages.second=["seed=1"]'),
            r"stage 'first' refers to \$\{stage:second\}, which is not a stage before it",
        ),
        (
            ('+stages.first=["trainer.learning_rate=0.01"]', "model.reference=${stage:first}/model"),
            r"stage 'first' refers to its own directory \$\{stage:first\}: a stage inherits every setting",
        ),
        (
            ('+stages.first=["trainer.learnin_rate=1"]',),
            r"stage 'first': cannot apply 'trainer.learnin_rate=1'",
        ),
        (('+stages.first=["loss=dpx"]',), r"stage 'first': cannot apply 'loss=dpx'"),
        (
            ('+stages.first=["trainer.max_steps=1,2"]',),
            r"stage 'first': override 'trainer.max_steps=1,2' is not supported",
        ),
    ],
)
def test_bad_stage_references_and_overrides_are_named(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = compose(*overrides)
        plan(cfg)  # what `alignlab train` does first
        to_typed(cfg)


def test_a_stage_nothing_refers_to_is_not_used(compose):
    cfg = compose(
        '+stages.first=["trainer.learning_rate=0.01","model.reference=null"]',
        '+stages.second=["model.reference=${stage:first}/model"]',
        '+stages.third=["seed=3"]',
        "model.reference=${stage:second}/model",
    )
    assert used_stages(cfg) == {"first", "second"}  # second directly, first through second's overrides
    assert [stage.name for stage in plan(cfg)] == [
        "first",
        "second",
        "third",
    ]  # every declared stage is planned
    assert used_stages(compose('+stages.first=["seed=3"]')) == set()


def test_naming_another_model_leaves_the_embedded_sft_stage_unused(compose_run, tmp_path, capsys):
    cfg = compose_run("+recipe=dpo", f"stages_dir={tmp_path}", sft=True)
    assert used_stages(cfg) == {"sft"}
    cfg = compose_run(
        "+recipe=dpo", f"stages_dir={tmp_path}", f"model.name_or_path={tmp_path / 'mine'}", sft=True
    )
    assert used_stages(cfg) == set()
    assert run_stages(cfg) == []  # nothing trains
    assert "stage sft: not used by this run" in capsys.readouterr().out
    run_sft = compose_run("+recipe=dpo", f"stages_dir={tmp_path}", sft=True)
    (sft,) = plan(run_sft)
    assert to_typed(run_sft).model.name_or_path == f"builtin:tiny@{sft.directory}/model"
    assert to_typed(sft.config).loss.name == "sft" and sft.config.model.name_or_path == "builtin:tiny"


def test_every_embedded_recipe_shares_one_sft_stage(compose_run, tmp_path):
    def sft(*overrides):
        return next(
            s for s in plan(compose_run(*overrides, f"stages_dir={tmp_path}", sft=True)) if s.name == "sft"
        )

    directories = {sft(f"+recipe={r}").directory for r in ("dpo", "npo", "modpo")}
    directories |= {
        sft(
            "+recipe=dpo",
            "trainer.max_steps=5",
            "loss.beta=0.3",
            "data.limit=100",
            "logger=wandb",
            "eval.num_prompts=16",
            "model.lora.enabled=true",
        ).directory
    }
    assert len(directories) == 1  # trained once, whatever the recipe and the run's own settings
    assert sft("+recipe=dpo", "seed=1").directory not in directories  # another random model: another stage


# --- running: train once, reuse, fail clearly -----------------------------------------------------


@pytest.mark.slow
def test_stages_train_once_and_are_reused(compose, capsys):
    # the run's model.reference is the first stage's model; the stage itself uses the default reference
    cfg = compose(
        '+stages.first=["trainer.learning_rate=0.01","model.reference=null"]',
        "model.reference=${stage:first}/model",
    )
    with pytest.raises(ConfigError, match=r"stage 'first' of this config has not been trained"):
        run(cfg, output_dir=Path(cfg.stages_dir).parent / "final")  # the single-run primitive refuses
    (first,) = run_stages(cfg)
    assert "stage first: training in" in capsys.readouterr().out
    assert (first.directory / "summary.json").is_file() and (first.directory / "model").is_dir()
    summary = json.loads((first.directory / "summary.json").read_text())
    assert summary["model_dir"] == str(first.directory / "model")

    mtime = (first.directory / "summary.json").stat().st_mtime_ns
    run_stages(cfg)  # a second invocation skips the finished stage
    assert f"stage first: reusing {first.directory}" in capsys.readouterr().out
    assert (first.directory / "summary.json").stat().st_mtime_ns == mtime

    final = run(cfg, output_dir=Path(cfg.stages_dir).parent / "final")  # now the final run may go
    saved = OmegaConf.load(final.output_dir / "config.yaml")
    assert saved.model.reference == f"{first.directory}/model"


@pytest.mark.slow
def test_unfinished_stage_is_run_again(compose, capsys):
    cfg = compose(
        '+stages.first=["trainer.learning_rate=0.01","model.reference=null"]',
        "model.reference=${stage:first}/model",
    )
    (first,) = plan(cfg)
    first.directory.mkdir(parents=True)
    (first.directory / "metrics.jsonl").write_text("{}\n")  # an interrupted run: no summary.json
    run_stages(cfg)
    assert "stage first: training in" in capsys.readouterr().out
    assert (first.directory / "summary.json").is_file()


@pytest.mark.slow
def test_failed_stage_names_itself_and_finished_stages_are_reused(compose, capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    cfg = compose(
        '+stages.first=["trainer.learning_rate=0.01","model.reference=null"]',
        f'+stages.second=["data.path={missing}","model.reference=${{stage:first}}/model"]',
        "model.reference=${stage:second}/model",
    )
    with pytest.raises(StageError) as caught:
        run_stages(cfg)
    first, second = plan(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"stage 'second' failed in {second.directory}: DataError: data file")
    assert "does not exist" in message and "reuses the finished stages (first)" in message
    assert "DataError" in (second.directory / "error.log").read_text()

    capsys.readouterr()
    with pytest.raises(StageError):
        run_stages(cfg)  # rerun: the first stage is not trained again
    assert f"stage first: reusing {first.directory}" in capsys.readouterr().out
