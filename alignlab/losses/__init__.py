"""The loss registry.

Adding a loss is one file in this folder that calls `register`, plus one import line below. No
other module names a loss: the trainer and the data pipeline read `Loss.needs`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, SequenceLogps


@dataclass(frozen=True)
class Entry:
    name: str
    config: type
    loss: type[Loss]


REGISTRY: dict[str, Entry] = {}


def register(name: str, config: type):
    """Class decorator: register `cls` under `name` with its config dataclass `config`.

    The config dataclass must have a `name: str` field defaulting to `name`; it becomes the Hydra
    option `loss=<name>`.
    """

    def wrap(cls: type[Loss]) -> type[Loss]:
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        if getattr(config, "name", None) != name:
            raise ValueError(f"{config.__name__}.name must default to {name!r}")
        REGISTRY[name] = Entry(name, config, cls)
        cls.registry_name = name
        return cls

    return wrap


def get(name: str) -> Entry:
    """Look a loss up by name, suggesting the nearest one on a typo."""
    try:
        return REGISTRY[name]
    except KeyError:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"unknown loss {name!r}.{hint} Known losses: {', '.join(sorted(REGISTRY))}") from None


def build(cfg) -> Loss:
    """Instantiate the loss for a config object (a registered dataclass or an OmegaConf node)."""
    from omegaconf import OmegaConf

    entry = get(cfg.name)
    if not isinstance(cfg, entry.config):
        cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else entry.config(**cfg)
    return entry.loss(cfg)


# One import line per loss file.
from alignlab.losses import aligndistil, asft, bco, dpo, modpo, npo, rdpo, rpo, sft, sparsepo, tdpo, tpo  # noqa: E402,F401

__all__ = ["REGISTRY", "Loss", "LossInputs", "LossOutput", "Needs", "SequenceLogps", "build", "get", "register"]
