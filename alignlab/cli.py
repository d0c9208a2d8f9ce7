"""The `alignlab` command: `alignlab train [hydra overrides]` and `alignlab list`."""

from __future__ import annotations

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
  list                every loss with its needs, and every recipe
"""


def _train(argv: list[str]) -> None:
    import hydra

    from alignlab.config import register_configs, resource_dir

    register_configs()

    @hydra.main(version_base=None, config_path=str(resource_dir("configs")), config_name="config")
    def _main(cfg) -> None:
        from alignlab.errors import UserError
        from alignlab.stages import run_stages
        from alignlab.train import run

        try:
            run_stages(cfg)  # earlier stages of a multi-stage recipe (none for most recipes)
            run(cfg)
        except UserError as err:  # the message says what to change; a traceback would only bury it
            print(f"alignlab: error: {err}", file=sys.stderr)
            if _in_sweep():
                raise  # Hydra records this member as failed and runs the others
            sys.exit(2)

    problem = explain_overrides(argv)
    if problem:
        print(f"alignlab: error: {problem}", file=sys.stderr)
        sys.exit(2)
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

    print("losses (needs shown for the default config):")
    for name, entry in sorted(REGISTRY.items()):
        n = build(entry.config()).needs
        needs = f"reference={'yes' if n.reference else 'no'}, full_logits={'yes' if n.full_logits else 'no'}, " \
                f"responses={'/'.join(n.responses)}"
        print(f"  {name:<12} {entry.loss.summary}\n  {'':<12} needs: {needs}")
    print("recipes (alignlab train +recipe=NAME):")
    for name in recipe_names():
        print(f"  {name}")


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
