"""What a run leaves beside its model for a person to read: training curves and the environment."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: packages whose versions decide a run's results.
PACKAGES = (
    "alignlab",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "deepspeed",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "tokenizers",
    "scikit-learn",
    "wandb",
)


#: config keys whose values are credentials: never written to a run's files.
SECRET_KEY = re.compile(
    r"((^|_)(hub_token|hf_token|access_token|auth_token|api_?key|secret(_key)?|password|passwd|"
    r"credentials?)|^token)$",
    re.IGNORECASE,
)
REDACTED = "<redacted>"


def redact(value):
    """`value` (config dicts and lists, or `key=value` command-line words) with every credential-like
    key's value replaced by `REDACTED`, e.g. `trainer.extra.hub_token=...` or `wandb.api_key`."""
    if isinstance(value, dict):
        return {k: REDACTED if _secret(str(k)) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "=" in value:
        if _secret(value.split("=", 1)[0]):  # one command-line word: key=value, the value as typed
            return f"{value.split('=', 1)[0]}={REDACTED}"
        # several, e.g. Hydra's override_dirname "a=1,+trainer.extra.hub_token=...,b=2"
        return _ASSIGNMENT.sub(lambda m: f"{m[1]}={REDACTED}" if _secret(m[1]) else m[0], value)
    return value


_ASSIGNMENT = re.compile(r"([+~-]*[\w.]+)=([^,\s]*)")


def _secret(key: str) -> bool:
    """Whether a config key (or a dotted override key, `+trainer.extra.hub_token`) names a credential."""
    return bool(SECRET_KEY.search(key.lstrip("+~-").rsplit(".", 1)[-1]))


def environment() -> dict:
    """Package versions, Python, platform and the git revision of the code (for reproducibility)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git": _git_revision(),
        "argv": redact(list(sys.argv)),
    }


def _git_revision() -> dict | None:
    """The commit of the alignlab checkout and whether it had uncommitted changes, if it is one."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def plot_curves(metrics_file: Path, out: Path, curves: tuple[str, ...]) -> Path | None:
    """Draw the logged `curves` of `metrics.jsonl` (train, and eval_ when evaluated) into one PNG;
    None when none was logged. The curves are the loss's: `STANDARD_CURVES` plus `Loss.curves`."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    panels = [name for name in curves if any(name in r or f"eval_{name}" in r for r in records)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for key, label, style in ((name, "train", "-"), (f"eval_{name}", "held-out", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
