"""The `alignlab` command: `alignlab train [hydra overrides]` and `alignlab list`."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignlab import sweeps
from alignlab.config import recipe_names, resource_dir
from alignlab.errors import ConfigError, RunStopped, UserError
from alignlab.rundir import INTERRUPTS, check_writable

USAGE = """usage: alignlab <command> [args]

commands:
  train [OVERRIDES]   train with Hydra composition, e.g.
                        alignlab train +recipe=dpo
                        alignlab train +recipe=dpo model=stories260k data=hh_rlhf loss.beta=0.5
                        alignlab train +recipe=dpo --cfg job      (print the composed config)
                        alignlab train -m +recipe=dpo loss.beta=0.05,0.1,0.5   (a sweep)
                        alignlab train --config-dir mine +recipe=mine   (your own mine/recipe/mine.yaml)
                      a recipe with `stages` trains them first (once; see alignlab.stages), e.g.
                        alignlab train -m +recipe=modpo loss.weights='[0.1,0.9]','[0.5,0.5]','[0.9,0.1]'
  eval RUN_DIR [--reward module:function] [--num-prompts N] [--max-new-tokens N]
                      evaluate a saved run against its reference: held-out metrics, samples,
                      KL(policy||reference), reward and win rate, lengths -> RUN_DIR/eval/report.md
  list                every loss (what it optimises, its paper, what it needs), and every recipe
"""


def _train(argv: list[str]) -> None:
    INTERRUPTS.install()  # SIGTERM / Ctrl-C from now on stop the run cleanly (alignlab.rundir)
    try:
        _train_hydra(argv)
    finally:
        INTERRUPTS.uninstall()


def _train_hydra(argv: list[str]) -> None:
    import hydra

    # deferred, like every heavy import here: torch (the losses)
    from alignlab.compose import COMPOSITION_ERRORS, explain, register_configs

    register_configs()

    @hydra.main(version_base=None, config_path=str(resource_dir("configs")), config_name="config")
    def _main(cfg) -> None:
        from alignlab.train import run, run_stages, sweep_dir  # deferred: torch, transformers

        try:
            run_stages(cfg)  # earlier stages of a multi-stage recipe (none for most recipes)
            run(cfg)
        except Exception as err:
            if (
                sweep_dir() is not None
            ):  # recorded in the member's error.log and the sweep's table; the others run on
                from hydra.core.hydra_config import HydraConfig

                line = sweeps.record_failure(err, Path(HydraConfig.get().runtime.output_dir))
                print(f"alignlab: error: {line}", file=sys.stderr)
                return
            if not isinstance(err, (UserError, RunStopped)):
                raise  # a bug: its traceback is the report
            # the message says what to do; a traceback would only bury it
            print(f"alignlab: {'error: ' * isinstance(err, UserError)}{err}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", 2))  # errors.EXIT_CODES

    overrides, config_dir, config_name = split_argv(argv)
    # a sweep: every member's keys and options checked before any member trains; a single run: Hydra
    # composes it once, and a mistake is explained from the exception it raises
    sweep = any(a in ("-m", "--multirun") for a in argv)
    problem = explain_overrides(argv) if sweep else _missing_config_dir(config_dir)
    if problem:
        print(f"alignlab: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not any(a in ("-m", "--multirun", "--cfg", "-c", "--help", "-h") for a in argv):
        run_dir = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
        try:  # the run directory (or runs/, where Hydra makes one) takes files, or one line says why not
            check_writable(run_dir[-1] if run_dir else "runs")
        except RunStopped as err:
            print(f"alignlab: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
    sys.argv = ["alignlab train", *argv]
    try:
        with _hydra_raises():
            _main()
    except COMPOSITION_ERRORS as err:
        print(f"alignlab: error: {explain(err, overrides, config_dir, config_name)}", file=sys.stderr)
        sys.exit(2)
    if sweeps.last is not None and any(row["status"] != "ok" for row in sweeps.last[1]):
        sys.exit(2)  # a member failed: the sweep's table says which


@contextmanager
def _hydra_raises() -> Iterator[None]:
    """`hydra.main` raises its exceptions instead of printing them (Hydra's documented
    HYDRA_FULL_ERROR=1), so that a mistake is named from the exception itself."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def _missing_config_dir(config_dir: str | None) -> str | None:
    if config_dir is not None and not Path(config_dir).expanduser().is_dir():
        return f"--config-dir {config_dir}: no such folder (relative paths start at {os.getcwd()})"
    return None


#: Hydra's flags that take a value (the next argument, or after `=`).
_VALUE_FLAGS = (
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--info",
    "-i",
)


def explain_overrides(argv: list[str]) -> str | None:
    """Compose `argv`'s overrides once up front (with its `--config-dir`; for a sweep, every value of
    every swept key); on a mistake, one line naming it with the nearest names
    (`alignlab.compose.compose`). A value that composes but fails validation (`loss.beta=-1`) is left
    to its run: in a sweep, that member fails alone. Hydra's own overrides and flags are left to Hydra.
    """
    from alignlab.compose import compose  # deferred: torch (the losses)

    overrides, config_dir, config_name = split_argv(argv)
    if _missing_config_dir(config_dir):
        return _missing_config_dir(config_dir)
    if not any(a in ("-m", "--multirun") for a in argv):
        try:
            compose(overrides, config_dir, config_name)
        except ConfigError as err:
            return str(err)
        return None
    try:
        members = sweep_members(overrides)
    except ConfigError as err:
        return str(err)
    for member in members:  # every key and option of every member; a bad value fails that member alone
        try:
            compose(member, config_dir, config_name)
        except ConfigError as err:
            swept = [o for o in member if o not in members[0]] or member[-1:]
            return f"{err} (sweep member with {' '.join(swept)})"
    return None


def split_argv(argv: list[str]) -> tuple[list[str], str | None, str]:
    """`alignlab train`'s arguments as (overrides other than Hydra's own `hydra.*`, --config-dir,
    --config-name)."""
    overrides, values, flag = [], {}, None
    for arg in argv:
        if flag is not None:
            values[flag], flag = arg, None
        elif arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if eq:
                values[name] = value
            flag = name if name in _VALUE_FLAGS and not eq else None
        elif not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)
    config_dir = values.get("--config-dir", values.get("-cd"))
    return overrides, config_dir, values.get("--config-name", values.get("-cn", "config"))


def sweep_members(overrides: list[str]) -> list[list[str]]:
    """The override lists a sweep's members compose, enough to check every value once: all swept keys
    at their first value, then each other value of each swept key in turn (Hydra's own parser); none
    when a sweep is not a list of values (a sweeper's own kind, such as an interval).

    Raises:
        ConfigError: an override that does not parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the sweep: {str(err).splitlines()[0]}") from None
    try:
        sweeps = {
            i: [str(v) for v in o.sweep_string_iterator()]
            for i, o in enumerate(parsed)
            if o.is_sweep_override()
        }
    except Exception:  # noqa: BLE001 - a sweeper's own kind (e.g. optuna's interval()): left to Hydra
        return []
    prefix = {i: parsed[i].input_line.partition("=")[0] for i in sweeps}  # with its + / ++ / ~
    first = [f"{prefix[i]}={sweeps[i][0]}" if i in sweeps else o.input_line for i, o in enumerate(parsed)]
    members = [first]
    for i, values in sweeps.items():
        members += [[*first[:i], f"{prefix[i]}={value}", *first[i + 1 :]] for value in values[1:]]
    return members


def _eval(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="alignlab eval", description="Evaluate a saved run against its reference."
    )
    parser.add_argument("run_dir", help="a run directory (it holds model/ and config.yaml)")
    parser.add_argument(
        "--reward",
        help="module:function(prompts, completions) -> scores, e.g. alignlab.builtin:sentiment_reward",
    )
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value in (("--num-prompts", args.num_prompts), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            print(f"alignlab: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            sys.exit(2)
    from alignlab.evaluate import evaluate  # deferred: torch, transformers

    try:
        result = evaluate(args.run_dir, args.reward, args.num_prompts, args.max_new_tokens, args.seed)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"alignlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"alignlab eval: report in {result['report']}")
    for key in ("kl_policy_reference", "reward_policy", "reward_reference", "win_rate"):
        if key in result:
            print(f"  {key:<22} {result[key]:.4f}")


def _list() -> None:
    from alignlab.losses import REGISTRY, build

    print(
        "losses: what each optimises [its paper]\n"
        "        needs: what you supply for the default config; then what a loss.OPTION=VALUE changes"
    )
    for name, entry in sorted(REGISTRY.items()):
        cfg = entry.config()
        items = _need_items(build(cfg).needs, cfg)
        changes = [f"{option}: {change}" for option, change in _needs_by_option(entry, items)]
        print(
            f"  {name:<12} {entry.loss.summary} [{entry.loss.paper}]\n"
            f"  {'':<12} needs: {', '.join(items)}" + "".join(f"; {c}" for c in changes)
        )
    print(
        "reference updated during training (any loss that needs a reference model): "
        "model.reference_sync.enabled=true, .alpha, .every (TR-DPO, TR-IPO, TR-KTO) "
        "[Gorbatovski et al. 2024, arXiv:2404.09656]; +recipe=trdpo"
    )
    print("recipes (alignlab train +recipe=NAME):")
    for name in recipe_names():
        print(f"  {name}")


def _need_items(needs, cfg) -> list[str]:
    """What a user must supply for `needs` (and what costs memory: full logits), as short phrases."""
    items = ["reference model" if needs.reference else "no reference"]
    if needs.full_logits:
        items.append("full logits" + (" (prompt too)" if needs.logits_on_prompt else ""))
    if needs.activations is not None:
        items.append("reference " + ("hidden states" if needs.activations.hidden_states else "activations"))
    built = {new: source for new, source in needs.mismatched}
    responses = [r for r in needs.responses if r != "retain" and r not in built]
    items.append(
        "pairs chosen/rejected"
        if tuple(responses) == ("chosen", "rejected")
        else f"response{'s' * (len(responses) > 1)} {'/'.join(responses)}"
    )
    if needs.own_prompts:
        items.append(f"a prompt per response ({'/'.join(f'{r}_prompt' for r in needs.own_prompts)})")
    if "retain" in needs.responses:
        items.append("retain set (data.retain)")
    for new, source in built.items():  # built by the pipeline: nothing to supply
        items.append(f"{new}: another row's {source} after each prompt (built from the data)")
    if needs.fields:
        items.append(f"data column{'s' * (len(needs.fields) > 1)} {'/'.join(needs.fields)}")
    if needs.teachers:
        where = {str(getattr(cfg, f.name)): f"loss.{f.name}" for f in dataclasses.fields(cfg)}  # the option
        teachers = [f"{name} ({where.get(path, path)})" for name, path in needs.teachers]
        items.append(f"teachers {', '.join(teachers)}")
    if needs.prepared_fields:  # the loss computes them itself: nothing to supply, but a step to know of
        items.append(f"{'/'.join(needs.prepared_fields)} (computed before training)")
    for score in needs.scores:  # the pipeline scores every response once, before training
        items.append(
            f"{score.name} scores by {score.model} ({score.option or score.kind}, computed before training)"
        )
    return items


def _needs_by_option(entry, default: list[str]) -> list[tuple[str, str]]:
    """`(loss.OPTION=VALUE, change)` for each enumerable option value (`losses.option_values`) that
    changes the needs."""
    changes: dict[tuple[str, str], list[str]] = {}  # (option, change) -> values
    from alignlab.losses import option_values

    for option, other in option_values(entry):
        cfg = entry.config(**{option: other})
        items = _need_items(entry.loss(cfg).needs, cfg)
        added = [f"+{i}" for i in items if i not in default]
        removed = [f"-{i}" for i in default if i not in items]
        if added or removed:
            changes.setdefault((option, ", ".join(added + removed)), []).append(
                str(other).lower() if isinstance(other, bool) else other
            )
    return [(f"loss.{option}={'|'.join(values)}", change) for (option, change), values in changes.items()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        _train(rest)
    elif command == "list":
        _list()
    elif command == "eval":
        _eval(rest)
    else:
        print(f"alignlab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
