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

    sys.argv = ["alignlab train", *argv]
    _main()


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
    else:
        print(f"alignlab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
