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


def option_values(entry: Entry) -> list[tuple[str, object]]:
    """`(option, value)` for each enumerable value of a loss's options other than its default.

    Enumerable: booleans, and strings whose default is in a tuple of strings of the loss's module
    (its `VARIANTS`, `LOSS_TYPES`, ...). One option at a time, from the defaults; values the config
    refuses on their own are left out.
    """
    import dataclasses
    import sys

    module = sys.modules[entry.config.__module__]
    constants = [v for k, v in vars(module).items()
                 if k.isupper() and isinstance(v, tuple) and v and all(isinstance(x, str) for x in v)]
    base = entry.config()
    out = []
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        if f.name == "name":
            continue
        if isinstance(value, bool):
            others = [not value]
        elif isinstance(value, str):
            others = list(dict.fromkeys(x for c in constants if value in c for x in c if x != value))
        else:
            continue
        for other in others:
            try:
                entry.config(**{f.name: other})
            except (ValueError, TypeError, KeyError):
                continue
            out.append((f.name, other))
    return out


def build(cfg) -> Loss:
    """Instantiate the loss for a config object (a registered dataclass or an OmegaConf node)."""
    from omegaconf import OmegaConf

    entry = get(cfg.name)
    if not isinstance(cfg, entry.config):
        cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else entry.config(**cfg)
    return entry.loss(cfg)


# One import line per loss file.
from alignlab.losses import aligndistil, asft, bco, dpo, modpo, npo, rdpo, rpo, sft, sparsepo, tdpo, tpo  # noqa: E402,F401
from alignlab.losses import cpo, orpo, simpo  # noqa: E402,F401

__all__ = ["REGISTRY", "Loss", "LossInputs", "LossOutput", "Needs", "SequenceLogps", "build", "get", "option_values",
           "register"]
