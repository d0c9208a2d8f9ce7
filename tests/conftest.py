"""Shared test helpers: composing a run config and locating ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests never reach a hub or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the repo), which is absent on this machine")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder, or skip with the reason."""
    return _shared_path()


@pytest.fixture(scope="session")
def shared_path():
    """`shared_path(*parts)`: a path under ../shared, skipping the test when it is absent."""
    return _shared_path


@pytest.fixture(scope="session")
def compose_run():
    """`compose_run(*overrides)`: the composed config of `alignlab train <overrides>`."""
    return _compose_run


@pytest.fixture
def run_and_resume(tmp_path):
    """`run_and_resume(recipe, steps, save_every)`: train `steps` steps, then replay an interruption.

    Returns `(full, resumed)`: the uninterrupted run, and a run that found only the first
    checkpoint (`checkpoint-<save_every>`) of the full run and resumed from it to the same step.
    """
    import shutil

    from alignlab.train import run

    def go(recipe: str, steps: int, save_every: int, *overrides: str):
        common = (
            f"+recipe={recipe}",
            f"trainer.max_steps={steps}",
            f"trainer.save_steps={save_every}",
            "trainer.logging_steps=1",
            "trainer.eval_steps=0",
            "data.eval_size=0",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        )
        full = run(_compose_run(*common), output_dir=tmp_path / "full")
        checkpoint = f"checkpoint-{save_every}"
        (tmp_path / "resumed").mkdir()
        shutil.copytree(full.output_dir / checkpoint, tmp_path / "resumed" / checkpoint)
        resumed = run(
            _compose_run(*common, "trainer.resume_from_checkpoint=latest"), output_dir=tmp_path / "resumed"
        )
        return full, resumed

    return go


#: the embedded model as configs/model/tiny.yaml writes it: the random tiny model after its `sft` stage.
TINY_AFTER_SFT = "builtin:tiny@${stage:sft}/model"


def _compose_run(*overrides: str, sft: bool = False):
    """The composed (untyped) run config for `alignlab train <overrides>`.

    Tests of the machinery train the random `builtin:tiny` directly, without the embedded default's
    `sft` stage (seconds each time it is trained); `sft=True` keeps it, as `alignlab train` does.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from alignlab.compose import register_configs
    from alignlab.config import resource_dir

    register_configs()
    with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    raw = OmegaConf.to_container(cfg.model, resolve=False)["name_or_path"]
    if not sft and raw == TINY_AFTER_SFT:
        cfg.model.name_or_path = "builtin:tiny"
        with open_dict(cfg):
            del cfg.stages["sft"]
    return cfg
