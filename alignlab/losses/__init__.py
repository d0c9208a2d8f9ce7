"""The loss registry.

Adding a loss is one file in this folder that calls `alignlab.losses.base.register`, plus one import
line below. No other module names a loss: the trainer and the data pipeline read `Loss.needs`, the
end-of-run summary `Loss.headline`, the curves `Loss.curves`, and `alignlab list` `Loss.paper`,
`Loss.summary` and `Loss.options`.
"""

from __future__ import annotations

import dataclasses
import difflib

from alignlab.losses.base import REGISTRY, Entry, Loss, LossInputs, LossOutput, Needs, SequenceLogps, register


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

    Enumerable: booleans, and the values a loss declares for a string option in `Loss.options`. One
    option at a time, from the defaults; values the config refuses on their own are left out.
    """
    base = entry.config()
    out = []
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        if f.name == "name":
            continue
        if isinstance(value, bool):
            others = [not value]
        elif f.name in entry.loss.options:
            others = [x for x in entry.loss.options[f.name] if x != value]
        else:
            continue
        for other in others:
            try:
                entry.config(**{f.name: other})
            except (ValueError, TypeError, KeyError):
                continue
            out.append((f.name, other))
    return out


def numeric_cases(entry: Entry) -> list[tuple[str, dict | None]]:
    """`(option, config kwargs)` that run each numeric option (an int or float config field) of a loss
    at a value other than its default, for the registry-generated tests.

    The loss's declaration in `Loss.numeric_options` when it has one (the value, with any option it
    applies under); else the option alone at half its default (0.1 for a default of 0), or twice it
    where the config refuses half. kwargs is None where the config accepts neither. Options declared
    with a reason (a string: no batch's losses can show them) are left out.
    """
    base = entry.config()
    out = []
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        if f.name == "name" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        declared = entry.loss.numeric_options.get(f.name)
        if isinstance(declared, str):
            continue
        if declared is not None:
            out.append((f.name, dict(declared)))
            continue
        if isinstance(value, int):
            candidates = [value // 2, value * 2] if value else [1]
        else:
            candidates = [value / 2, value * 2] if value else [0.1]
        kwargs = None
        for other in candidates:
            try:
                entry.config(**{f.name: other})
            except (ValueError, TypeError, KeyError):
                continue
            kwargs = {f.name: other}
            break
        out.append((f.name, kwargs))
    return out


def build(cfg) -> Loss:
    """Instantiate the loss for a config object (a registered dataclass or an OmegaConf node)."""
    from omegaconf import OmegaConf

    entry = get(cfg.name)
    if not isinstance(cfg, entry.config):
        cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else entry.config(**cfg)
    return entry.loss(cfg)


# One import line per loss file.
from alignlab.losses import (  # noqa: E402,F401  # noqa: E402,F401
    aligndistil,
    asft,
    bco,
    combo,
    cpo,
    dpo,
    jpo,
    kto,
    modpo,
    npo,
    orpo,
    rdpo,
    rpo,
    sft,
    simpo,
    sparsepo,
    tdpo,
    tpo,
)

__all__ = [
    "REGISTRY",
    "Entry",
    "Loss",
    "LossInputs",
    "LossOutput",
    "Needs",
    "SequenceLogps",
    "build",
    "get",
    "option_values",
    "register",
]
