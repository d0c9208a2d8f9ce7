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


def _compose_run(*overrides: str):
    """The composed (untyped) run config for `alignlab train <overrides>`."""
    from hydra import compose, initialize_config_dir

    from alignlab.config import register_configs, resource_dir

    register_configs()
    with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
        return compose("config", overrides=list(overrides))
