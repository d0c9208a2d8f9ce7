"""Hydra composition: the schemas, the loss registry and the recipes in Hydra's ConfigStore, and
`compose`, which turns overrides into a config or into one line naming the mistake.

It sits above the schemas (`alignlab.config`), the losses (their config dataclasses form the loss
group) and the stage planner (``${stage:NAME}``), which is why it is not part of `alignlab.config`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from alignlab.config import (
    EMBEDDED_RESOLVER,
    DataConfig,
    DeepSpeedConfig,
    DistributedConfig,
    LoggerConfig,
    ModelConfig,
    TrainerConfig,
    embedded_value,
    resource_dir,
    schema,
    trl_hint,
)
from alignlab.errors import ConfigError
from alignlab.losses import REGISTRY
from alignlab.stages import register_resolver

_registered = False


def register_configs() -> None:
    """Put the schemas, the losses and the recipes in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    register_resolver()  # ${stage:NAME}
    if not OmegaConf.has_resolver(EMBEDDED_RESOLVER):
        OmegaConf.register_new_resolver(EMBEDDED_RESOLVER, embedded_value)
    cs = ConfigStore.instance()
    cs.store(name="alignlab_schema", node=schema())
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    cs.store(group="deepspeed", name="schema", node=DeepSpeedConfig)
    cs.store(group="distributed", name="schema", node=DistributedConfig)
    for name, entry in REGISTRY.items():
        cs.store(group="loss", name=name, node=entry.config)
    # Recipes are complete experiments, `# @package _global_` files with their own defaults list.
    for path in sorted(resource_dir("recipes").glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    _registered = True


#: Hydra's exceptions for a mistake in the overrides or the config files (`explain` names it).
COMPOSITION_ERRORS = (OverrideParseException, MissingConfigException, ConfigCompositionException)


def compose(overrides: list[str], config_dir: str | None = None, config_name: str = "config"):
    """The composed (unresolved) config of `alignlab train [--config-dir DIR] [--config-name NAME] OVERRIDES`.

    Raises:
        ConfigError: one line naming the mistake (an unknown key, group option or recipe with the
            nearest valid names; a TRL name with its alignlab key; a bad value), from Hydra's exceptions.
    """
    try:
        return _composer(config_dir, config_name)(overrides)
    except COMPOSITION_ERRORS as err:
        raise ConfigError(explain(err, overrides, config_dir, config_name)) from None


def _composer(config_dir: str | None, config_name: str):
    """overrides -> the composed config, with Hydra's compose API."""
    register_configs()
    main = str(resource_dir("configs"))
    extra = str(Path(config_dir).expanduser().resolve()) if config_dir else None
    if extra and config_name != "config":  # a primary config of the user's own: its folder first
        main, extra = extra, main
    search = [f"hydra.searchpath=[file://{extra}]"] if extra else []

    def attempt(items):
        with initialize_config_dir(config_dir=main, version_base=None):
            return hydra_compose(config_name, overrides=[*search, *items])

    return attempt


def explain(
    err: Exception, overrides: list[str], config_dir: str | None = None, config_name: str = "config"
) -> str:
    """One line naming the mistake behind one of Hydra's `COMPOSITION_ERRORS`, from the exception's
    fields (`compose`'s, or the one `hydra.main` raised for `alignlab train`)."""
    if isinstance(err, OverrideParseException):
        return (
            f"cannot parse {err.override!r}: {err.message.splitlines()[0]}. Quote values holding "
            "{ } [ ] , = or spaces for Hydra, e.g. key='\"a value\"'"
        )
    if isinstance(err, MissingConfigException):
        return _missing_option(err, config_dir)
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if key is not None and _is_unknown_key(cause):
        GlobalHydra.instance().clear()  # hydra.main leaves its own initialised when it fails
        return _unknown_key(key, overrides, _composer(config_dir, config_name))
    # OmegaConf's `msg` is its message without the full_key / object_type lines that str() adds
    text = cause.msg if isinstance(cause, OmegaConfBaseException) else str(cause or err)
    where = f"{key}: " if key else ""
    return where + "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_unknown_key(error: BaseException) -> bool:
    return isinstance(error, (ConfigAttributeError, ConfigKeyError))


def _missing_option(err, config_dir: str | None) -> str:
    """'unknown recipe 'dpx'. Did you mean +recipe=dpo? Options: ...' from Hydra's exception."""
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    options = [o for o in (err.options or []) if o != "schema"]
    if not group:  # the primary config itself
        return f"config {name!r} not found{f' in {config_dir}' if config_dir else ''}"
    near = difflib.get_close_matches(name, options, n=1)
    hint = f" Did you mean {'+' if group == 'recipe' else ''}{group}={near[0]}?" if near else ""
    where = (
        ""
        if config_dir or group != "recipe"
        else (
            " (a recipe of your own: alignlab train --config-dir DIR +recipe=NAME, with DIR/recipe/NAME.yaml)"
        )
    )
    return f"unknown {group} {name!r}.{hint} Options: {', '.join(options)}{where}"


def _unknown_key(key: str, overrides: list[str], attempt) -> str:
    """'unknown key 'loss.bta'. Did you mean loss.beta? Keys of loss: ...' (or its TRL name's key)."""
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        node = attempt(rest)
        node = OmegaConf.select(node, parent) if parent else node
        keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    except Exception:  # noqa: BLE001 - the other overrides are broken too; say what we know
        keys = []
    trl = trl_hint(key)
    near = difflib.get_close_matches(leaf, keys, n=1)
    hint = trl or (f" Did you mean {parent + '.' if parent else ''}{near[0]}?" if near else "")
    listed = f" Keys of {parent or 'the config'}: {', '.join(keys)}" if keys and not trl else ""
    return f"unknown key {key!r}.{hint}{listed}"
