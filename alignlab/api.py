"""alignlab from Python: `train(overrides, dataset=...)` is `alignlab train OVERRIDES`, with the data
given as a `datasets.Dataset` or `DatasetDict` instead of `data.path`.

    from datasets import load_dataset
    from alignlab.api import train

    pairs = load_dataset("json", data_files="pairs.jsonl", split="train").filter(...)
    result = train(["+recipe=dpo", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"], dataset=pairs)
    print(result.model_dir, result.eval_metrics)

The dataset is written once with `save_to_disk` under `<data.cache_dir>/datasets/<sha256 of its
Arrow files>` and `data.path` points there, so the run's `config.yaml` names real files: `alignlab
eval RUN_DIR`, a resume or a rerun read the same rows. Rows are then read, checked and reported like
any other source's (bad rows name the split and row).
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignlab.errors import ConfigError


def train(
    overrides: Sequence[str] = (),
    *,
    dataset: Any = None,
    eval_dataset: Any = None,
    config_dir: str | None = None,
    output_dir: str | Path | None = None,
):
    """Train one run, as `alignlab train [--config-dir DIR] OVERRIDES` does (stages first, if any).

    Args:
        overrides: Hydra overrides, exactly as on the command line, e.g.
            ``["+recipe=dpo", "loss.beta=0.2", "data.columns={prompt: question}"]``.
        dataset: a `datasets.Dataset` (or a `DatasetDict`, read at `data.split`, with
            `data.eval_split` as the held-out split when set) used as `data.path`.
        eval_dataset: a `datasets.Dataset` of held-out rows, used as `data.eval_path`.
        config_dir: a folder of your own configs and recipes (``recipe/NAME.yaml``), as `--config-dir`.
        output_dir: the run directory; default ``output_dir=`` from the overrides, else
            ``runs/<loss>/<date_time>`` as on the command line.

    Returns:
        `alignlab.train.RunResult`: the run directory, the model directory and the headline figures.

    Raises:
        alignlab.errors.UserError: a mistake in the overrides, the data or the models, with the
            one-line message the command line prints.
    """
    from alignlab.compose import compose
    from alignlab.train import run, run_stages

    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(
            f"overrides must be a list of strings such as ['+recipe=dpo', 'loss.beta=0.2'], got {overrides!r}"
        )
    for given, key in ((dataset, "data.path"), (eval_dataset, "data.eval_path")):
        if given is not None and any(o.lstrip("+~").partition("=")[0] == key for o in overrides):
            argument = "eval_dataset" if "eval" in key else "dataset"
            raise ConfigError(f"both {key}= and the {argument} argument are given. Fix: drop one of them")
    cfg = compose(list(overrides), config_dir)
    cache = Path(cfg.data.cache_dir or Path.home() / ".cache" / "alignlab").expanduser()
    if dataset is not None:
        cfg.data.path = str(saved(dataset, cache / "datasets", "dataset"))
    if eval_dataset is not None:
        cfg.data.eval_path = str(saved(eval_dataset, cache / "datasets", "eval_dataset", allow_dict=False))
    default = Path("runs") / cfg.loss.name / time.strftime("%Y-%m-%d_%H-%M-%S")  # as the command line's
    run_dir = Path(output_dir or cfg.output_dir or default)
    run_stages(cfg)
    return run(cfg, output_dir=run_dir)


def saved(dataset: Any, root: Path, argument: str, allow_dict: bool = True) -> Path:
    """`dataset` written with `save_to_disk` under `root/<sha256 of its Arrow files>` (once), and that folder.

    Raises:
        ConfigError: `dataset` is not a `datasets.Dataset` (or `DatasetDict` where allowed).
    """
    import datasets

    kinds = (datasets.Dataset, datasets.DatasetDict) if allow_dict else (datasets.Dataset,)
    if not isinstance(dataset, kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ConfigError(
            f"{argument} must be a datasets.{names}, got {type(dataset).__name__}. Fix: build one, "
            "e.g. datasets.Dataset.from_list(rows) (an IterableDataset: Dataset.from_generator)"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".saving-{uuid.uuid4().hex}"
    dataset.save_to_disk(str(staging))
    digest = hashlib.sha256()
    content = (p for p in staging.rglob("*") if p.suffix == ".arrow" or p.name == "dataset_dict.json")
    for file in sorted(content):
        digest.update(str(file.relative_to(staging)).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    target = root / digest.hexdigest()[:16]
    if target.exists():  # the same rows were saved before
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target
