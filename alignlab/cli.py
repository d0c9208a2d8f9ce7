"""The `alignlab` command: `alignlab train [hydra overrides]` and `alignlab list`."""

from __future__ import annotations

import dataclasses
import re
import sys

USAGE = """usage: alignlab <command> [args]

commands:
  train [OVERRIDES]   train with Hydra composition, e.g.
                        alignlab train +recipe=dpo
                        alignlab train +recipe=dpo model=stories260k data=hh_rlhf loss.beta=0.5
                        alignlab train +recipe=dpo --cfg job      (print the composed config)
                        alignlab train -m +recipe=dpo loss.beta=0.05,0.1,0.5   (a sweep)
                      a recipe with `stages` trains them first (once; see alignlab.stages), e.g.
                        alignlab train -m +recipe=modpo loss.weights='[0.1,0.9]','[0.5,0.5]','[0.9,0.1]'
  eval RUN_DIR [--reward module:function] [--num-prompts N] [--max-new-tokens N]
                      evaluate a saved run against its reference: held-out metrics, samples,
                      KL(policy||reference), reward and win rate, lengths -> RUN_DIR/eval/report.md
  list                every loss (what it optimises, its paper, what it needs), and every recipe
"""


def _train(argv: list[str]) -> None:
    from alignlab.rundir import INTERRUPTS

    INTERRUPTS.install()  # SIGTERM / Ctrl-C from now on stop the run cleanly (alignlab.rundir)
    try:
        _train_hydra(argv)
    finally:
        INTERRUPTS.uninstall()


def _train_hydra(argv: list[str]) -> None:
    import hydra

    from alignlab.config import register_configs, resource_dir

    register_configs()

    @hydra.main(version_base=None, config_path=str(resource_dir("configs")), config_name="config")
    def _main(cfg) -> None:
        from alignlab.errors import RunStopped, UserError
        from alignlab.stages import run_stages
        from alignlab.train import run

        try:
            run_stages(cfg)  # earlier stages of a multi-stage recipe (none for most recipes)
            run(cfg)
        except (UserError, RunStopped) as err:  # the message says what to do; a traceback would only bury it
            print(f"alignlab: {'error: ' * isinstance(err, UserError)}{err}", file=sys.stderr)
            if _in_sweep():
                raise  # Hydra records this member as failed and runs the others
            sys.exit(getattr(err, "exit_code", 2))  # errors.EXIT_CODES

    problem = explain_overrides(argv)
    if problem:
        print(f"alignlab: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not any(a in ("-m", "--multirun", "--cfg", "-c", "--help", "-h") for a in argv):
        from alignlab.errors import RunStopped
        from alignlab.rundir import check_writable

        run_dir = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
        try:  # the run directory (or runs/, where Hydra makes one) takes files, or one line says why not
            check_writable(run_dir[-1] if run_dir else "runs")
        except RunStopped as err:
            print(f"alignlab: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
    sys.argv = ["alignlab train", *argv]
    _main()


def explain_overrides(argv: list[str]) -> str | None:
    """Compose `argv`'s overrides once up front; on a mistake, one line naming it with the nearest names.

    Sweeps (`-m`) and Hydra's own flags are left to Hydra.
    """
    import difflib
    import re

    from hydra import compose, initialize_config_dir

    from alignlab.config import register_configs, resource_dir

    if any(a in ("-m", "--multirun") for a in argv):
        return None
    register_configs()
    overrides, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd")
            continue
        if not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)

    def compose_with(items):
        with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
            return compose("config", overrides=items)

    try:
        compose_with(overrides)
        return None
    except Exception as err:  # noqa: BLE001 - turned into one line below
        text = "\n".join(str(e) for e in (err, err.__cause__) if e is not None)
    missing = re.search(r"Could not find '([\w/]+)/([\w-]+)'", text)
    if missing:
        group, name = missing.groups()
        options = [o for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if o != "schema"]
        near = difflib.get_close_matches(name, options, n=1)
        hint = f" Did you mean {'+' if group == 'recipe' else ''}{group}={near[0]}?" if near else ""
        return f"unknown {group} {name!r}.{hint} Options: {', '.join(options)}"
    unknown = re.search(r"Could not override '([\w.]+)'", text)
    if unknown:
        key = unknown.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
        try:
            node = compose_with(rest).get(parent) if parent else compose_with(rest)
            keys = list(node.keys()) if hasattr(node, "keys") else []
        except Exception:  # noqa: BLE001 - the other overrides are broken too; say what we know
            keys = []
        near = difflib.get_close_matches(leaf, keys, n=1)
        hint = f" Did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
        listed = f" Keys of {parent or 'the config'}: {', '.join(keys)}" if keys else ""
        return f"unknown key {key!r}.{hint}{listed}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "full_key" not in line]
    return "; ".join(lines[:2]) or f"invalid overrides: {' '.join(overrides)}"


def _eval(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="alignlab eval", description="Evaluate a saved run against its reference.")
    parser.add_argument("run_dir", help="a run directory (it holds model/ and config.yaml)")
    parser.add_argument("--reward", help="module:function(prompts, completions) -> scores, e.g. "
                                         "alignlab.builtin:sentiment_reward")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from alignlab.errors import UserError
    from alignlab.evaluate import evaluate

    try:
        result = evaluate(args.run_dir, args.reward, args.num_prompts, args.max_new_tokens, args.seed)
    except (UserError, FileNotFoundError, ValueError, AttributeError, ImportError) as err:
        print(f"alignlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"alignlab eval: report in {args.run_dir}/eval/report.md")
    for key in ("kl_policy_reference", "reward_policy", "reward_reference", "win_rate"):
        if key in result:
            print(f"  {key:<22} {result[key]:.4f}")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _list() -> None:
    from alignlab.config import recipe_names
    from alignlab.losses import REGISTRY, build

    print("losses: what each optimises [its paper]\n"
          "        needs: what you supply for the default config; then what a loss.OPTION=VALUE changes")
    for name, entry in sorted(REGISTRY.items()):
        cfg = entry.config()
        items = _need_items(build(cfg).needs, cfg)
        changes = [f"{option}: {change}" for option, change in _needs_by_option(entry, items)]
        print(f"  {name:<12} {loss_description(entry)} [{loss_paper(entry)}]\n"
              f"  {'':<12} needs: {', '.join(items)}" + "".join(f"; {c}" for c in changes))
    print("recipes (alignlab train +recipe=NAME):")
    for name in recipe_names():
        print(f"  {name}")


#: an author-year citation in parentheses, e.g. "(Rafailov et al. 2023)".
_CITATION = re.compile(r"\s*\(([^()]*\b(?:19|20)\d\d)\)")


def loss_paper(entry) -> str:
    """The paper of a registered loss, e.g. "Rafailov et al. 2023, arXiv:2305.18290".

    Read from the loss module's docstring, which opens "NAME — Authors Year, "Title", arXiv:ID";
    the authors fall back to the citation in `Loss.summary`.
    """
    doc = " ".join((sys.modules[entry.loss.__module__].__doc__ or "").split("\n\n")[0].split())
    authors = re.search(r"—\s*(.+?\b(?:19|20)\d\d)\b", doc)
    cited = _CITATION.search(entry.loss.summary)
    arxiv = re.search(r"arXiv:\s*(\d{4}\.\d{4,5})", doc)
    parts = [authors.group(1) if authors else cited.group(1) if cited else "paper not declared"]
    if arxiv:
        parts.append(f"arXiv:{arxiv.group(1)}")
    return ", ".join(parts)


def loss_description(entry) -> str:
    """`Loss.summary` without its citation (`alignlab list` shows the paper beside it)."""
    return " ".join(_CITATION.sub("", entry.loss.summary).split()) or "(no summary)"


def _need_items(needs, cfg) -> list[str]:
    """What a user must supply for `needs` (and what costs memory: full logits), as short phrases."""
    items = ["reference model" if needs.reference else "no reference"]
    if needs.full_logits:
        items.append("full logits" + (" (prompt too)" if needs.logits_on_prompt else ""))
    responses = [r for r in needs.responses if r != "retain"]
    items.append("pairs chosen/rejected" if tuple(responses) == ("chosen", "rejected")
                 else f"response{'s' * (len(responses) > 1)} {'/'.join(responses)}")
    if "retain" in needs.responses:
        items.append("retain set (data.retain)")
    if needs.fields:
        items.append(f"data column{'s' * (len(needs.fields) > 1)} {'/'.join(needs.fields)}")
    if needs.teachers:
        where = {str(getattr(cfg, f.name)): f"loss.{f.name}" for f in dataclasses.fields(cfg)}  # the option
        teachers = [f"{name} ({where.get(path, path)})" for name, path in needs.teachers]
        items.append(f"teachers {', '.join(teachers)}")
    if needs.prepared_fields:  # the loss computes them itself: nothing to supply, but a step to know of
        items.append(f"{'/'.join(needs.prepared_fields)} (computed before training)")
    return items


def _needs_by_option(entry, default: list[str]) -> list[tuple[str, str]]:
    """`(loss.OPTION=VALUE, change)` for each enumerable option value that changes the needs.

    Enumerable: booleans, and strings whose default is in a tuple of strings of the loss's module
    (its `VARIANTS`, `LOSS_TYPES`, ...). One option at a time, from the defaults; invalid
    combinations are skipped.
    """
    module = sys.modules[entry.config.__module__]
    constants = [v for k, v in vars(module).items()
                 if k.isupper() and isinstance(v, tuple) and v and all(isinstance(x, str) for x in v)]
    base = entry.config()
    changes: dict[tuple[str, str], list[str]] = {}  # (option, change) -> values
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
                cfg = entry.config(**{f.name: other})
                items = _need_items(entry.loss(cfg).needs, cfg)
            except (ValueError, TypeError, KeyError):
                continue
            added = [f"+{i}" for i in items if i not in default]
            removed = [f"-{i}" for i in default if i not in items]
            if added or removed:
                changes.setdefault((f.name, ", ".join(added + removed)), []).append(
                    str(other).lower() if isinstance(other, bool) else other)
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
