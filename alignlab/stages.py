"""Multi-stage recipes: earlier training runs a run depends on, each trained once and then reused.

A recipe declares its stages in config, in order, as overrides of itself::

    stages:
      margin: ["loss=dpo", "data.path=builtin:sentiment-understated"]
    loss:
      margins: [{kind: implicit, model: "${stage:margin}/model"}]

A stage is the same composed experiment (the recipe and every command-line override) with the
stage's own overrides applied, and without ``stages``:

* ``key=value`` sets a value, in Hydra's override syntax (``data.swap_pairs=true``,
  ``trainer.max_steps=50``, ``model.name_or_path=${stage:sft}/model``);
* ``group=option`` (``loss=dpo``) replaces that whole config group with the option's defaults: the
  recipe's and the command line's settings of the group were made for another option. (This is why
  a stage is not re-composed from the command line plus its overrides: Hydra would merge the
  recipe's ``loss.weights`` into ``loss=dpo`` and fail.)

Each stage trains in ``<stages_dir>/<name>-<12 hex>``, the start of the sha256 of its resolved config
without the settings that only say where files go (`LOCATION_KEYS`). So an identical stage, in a
later run or in every member of a sweep, is trained once. A stage is finished when its
``summary.json`` exists (`alignlab.train.run` writes it last): finished stages are reused, unfinished
ones run again, resuming from their latest checkpoint if they saved one. A stage is identified by its
config, not by the content of the files it reads.

``${stage:NAME}`` resolves to a stage's directory (absolute) anywhere in the config, including in a
later stage's overrides. `alignlab train` runs `alignlab.train.run_stages` and then the run itself;
`alignlab.train.run` trains one config and refuses one whose stages are unfinished. A stage that
nothing refers to (no ``${stage:NAME}`` in the config or in a used stage's overrides) is skipped:
the embedded model's ``sft`` stage (configs/model/tiny.yaml) is unused once ``model.name_or_path``
names another model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab.config import resource_dir
from alignlab.errors import ConfigError, UserError, first_line, user_error_behind

RESOLVER = "stage"
#: written last by `alignlab.train.run`: its presence means the stage finished.
FINISHED = "summary.json"
#: the traceback of a failed stage, in its directory.
ERROR_LOG = "error.log"
#: settings that say where a run's files go, not what it trains: left out of a stage's hash.
LOCATION_KEYS = ("output_dir", "stages_dir", "data.cache_dir", "trainer.resume_from_checkpoint")


class StageError(UserError):
    """A stage failed; the message names it, its directory and the cause."""


@dataclass(frozen=True)
class Stage:
    """One planned stage.

    Attributes:
        name: its key under ``stages``.
        config: its resolved config (``stages`` empty, ``output_dir`` = `directory`, resuming from
            the directory's latest checkpoint when there is one).
        directory: ``<stages_dir>/<name>-<hash>``, absolute.
    """

    name: str
    config: DictConfig
    directory: Path

    @property
    def finished(self) -> bool:
        """Whether the stage ran to the end (its ``summary.json`` exists)."""
        return (self.directory / FINISHED).is_file()


#: while a stage's own config is resolved: (its name, directories of the stages before it).
_planning: ContextVar[tuple[str, Mapping[str, Path]] | None] = ContextVar("alignlab_planning", default=None)


def plan(cfg: DictConfig, until: str | None = None) -> list[Stage]:
    """The stages of a composed config, in order, each with its config and directory; nothing runs.

    Args:
        cfg: the composed (unresolved) config of the run.
        until: stop after this stage (what ``${stage:NAME}`` needs).

    Raises:
        ConfigError: `until` is not a stage, or a stage's overrides cannot be applied.
    """
    stages: dict[str, list[str]] = OmegaConf.to_container(cfg.stages, resolve=False)  # type: ignore
    if until is not None and until not in stages:
        known = ", ".join(stages) or "none"
        raise ConfigError(
            f"${{{RESOLVER}:{until}}}: this config has no stage named {until!r} (its stages: "
            f"{known}). Fix: declare it under stages: {{{until}: [overrides...]}}"
        )
    root = Path(cfg.stages_dir).expanduser().resolve()
    planned: list[Stage] = []
    for name, overrides in stages.items():
        config = _stage_config(cfg, name, overrides, {stage.name: stage.directory for stage in planned})
        directory = root / f"{name}-{config_hash(config)[:12]}"
        config.output_dir = str(directory)
        config.trainer.resume_from_checkpoint = "latest" if _has_checkpoint(directory) else None
        planned.append(Stage(name, config, directory))
        if name == until:
            break
    return planned


def require_finished(cfg: DictConfig) -> None:
    """Refuse to train a config whose stages have not all finished.

    Raises:
        ConfigError: naming the first unfinished stage.
    """
    used = used_stages(cfg)
    for stage in plan(cfg):
        if stage.name in used and not stage.finished:
            raise ConfigError(
                f"stage {stage.name!r} of this config has not been trained ({stage.directory} has no "
                f"{FINISHED}). Fix: train with `alignlab train`, or call alignlab.train.run_stages(cfg) "
                "before alignlab.train.run(cfg)"
            )


_REFERENCE = re.compile(r"\$\{" + RESOLVER + r":\s*([\w.-]+)\s*\}")


def used_stages(cfg: DictConfig) -> set[str]:
    """The stages whose output the run uses: those named by a ``${stage:NAME}`` anywhere in the config
    outside ``stages``, and those named in the overrides of a used stage.

    A stage nothing refers to is skipped: e.g. the embedded model's ``sft`` stage once
    ``model.name_or_path`` names another model.
    """
    content = OmegaConf.to_container(cfg, resolve=False)
    declared = content.pop("stages", None) or {}
    used = set(_REFERENCE.findall(json.dumps(content)))
    todo = list(used)
    while todo:
        for name in _REFERENCE.findall(json.dumps(declared.get(todo.pop(), []))):
            if name not in used:
                used.add(name)
                todo.append(name)
    return used


def config_hash(cfg: DictConfig) -> str:
    """sha256 of a resolved config without its `LOCATION_KEYS`."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for key in LOCATION_KEYS:
        *parents, leaf = key.split(".")
        node = content
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def register_resolver() -> None:
    """Register ``${stage:NAME}`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _stage_directory)


def _stage_directory(name: str, _root_: DictConfig) -> str:
    """``${stage:NAME}``: the stage's directory, planned from the config being resolved."""
    planning = _planning.get()
    if planning is None:
        return str(plan(_root_, until=name)[-1].directory)
    current, earlier = planning  # resolving a stage's own config: only earlier stages exist yet
    if name == current:
        raise ConfigError(
            f"stage {current!r} refers to its own directory ${{{RESOLVER}:{name}}}: a stage "
            "inherits every setting of the run, so override this one in the stage's overrides "
            '(e.g. "model.reference=null")'
        )
    if name not in earlier:
        raise ConfigError(
            f"stage {current!r} refers to ${{{RESOLVER}:{name}}}, which is not a stage before "
            f"it (stages run in order; before it: {', '.join(earlier) or 'none'})"
        )
    return str(earlier[name])


def _stage_config(
    cfg: DictConfig, name: str, overrides: list[str], earlier: Mapping[str, Path]
) -> DictConfig:
    """`cfg` with the stage's overrides applied and no stages, resolved."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    stage = copy.deepcopy(cfg)
    stage.stages = {}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"stage {name!r}: {first_line(err)}") from None
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override() or override.type.name != "CHANGE" or override.package is not None:
            raise ConfigError(
                f"stage {name!r}: override {text!r} is not supported in a stage; use key=value "
                "or group=option"
            )
        try:
            _apply(stage, override.key_or_group, override.value())
        except Exception as err:  # omegaconf / hydra errors: unknown key, wrong type, unknown option
            raise ConfigError(f"stage {name!r}: cannot apply {text!r}: {first_line(err)}") from None
    token = _planning.set((name, earlier))
    try:
        OmegaConf.resolve(stage)
    except Exception as err:
        cause = user_error_behind(err)  # e.g. from ${stage:NAME}, which names the stage already
        if cause is not None:
            raise cause from None
        raise ConfigError(f"stage {name!r}: {first_line(err)}") from None
    finally:
        _planning.reset(token)
    return stage


def _apply(cfg: DictConfig, key: str, value) -> None:
    """One stage override: a group option replaces the group, anything else sets a value."""
    if "." not in key and isinstance(value, str) and OmegaConf.is_dict(cfg.get(key)):
        cfg[key] = _group_option(key, value)
    else:
        OmegaConf.update(cfg, key, value, merge=False)


def _group_option(group: str, option: str) -> DictConfig:
    """The defaults of ``group=option`` (e.g. ``loss=dpo``), composed by Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={option}"]
    if GlobalHydra.instance().is_initialized():  # inside `alignlab train`, or a compose context
        return copy.deepcopy(compose("config", overrides=overrides)[group])
    with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
        return copy.deepcopy(compose("config", overrides=overrides)[group])


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.startswith("checkpoint-") for p in directory.iterdir())
