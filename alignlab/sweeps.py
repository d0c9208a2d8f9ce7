"""Sweeps (`alignlab train -m`): a failing member recorded without a traceback, and the sweep's summary.

Every member trains in its own directory (Hydra's `<sweep dir>/<member number>/`). A member that
fails writes `error.log` there (its one-line error, then the traceback) and prints the line; the
other members still run. When the sweep ends, `SweepSummary` (a Hydra callback, configs/config.yaml)
writes `sweep.md` and `sweep.csv` in the sweep's directory, one row per member: the overrides that
differ between members, its status (`ok`, `failed: <error>` or `unfinished`) and its headline figures
(held-out accuracy and margin, win rate, reward and KL of the end-of-training eval, wall time). The
command then exits with status 2 if a member failed.
"""

from __future__ import annotations

import csv
import json
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback

from alignlab.errors import UserError, first_line

#: in a member's directory: its one-line error, then the traceback.
ERROR_LOG = "error.log"
#: headline figures: column -> (file in the member's directory, key).
FIGURES = {
    "held-out accuracy": ("summary.json", "eval_rewards/accuracies"),
    "held-out margin": ("summary.json", "eval_rewards/margins"),
    "held-out loss": ("summary.json", "eval_loss"),
    "win rate": ("eval/eval.json", "win_rate"),
    "reward": ("eval/eval.json", "reward_policy"),
    "reference reward": ("eval/eval.json", "reward_reference"),
    "KL": ("eval/eval.json", "kl_policy_reference"),
    "seconds": ("summary.json", "wall_seconds"),
}

#: (sweep directory, rows) of the last sweep this process finished; `alignlab train` reads its statuses.
last: tuple[Path, list[dict]] | None = None


def record_failure(err: BaseException, member_dir: Path) -> str:
    """Write `error.log` in the member's directory; return the one line to print."""
    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}"
    member_dir.mkdir(parents=True, exist_ok=True)
    (member_dir / ERROR_LOG).write_text(message + "\n\n" + traceback.format_exc())
    if isinstance(err, UserError):
        return message
    return f"{message} (member {member_dir.name}; traceback in {member_dir / ERROR_LOG})"


def member_row(member_dir: Path) -> dict:
    """One member's overrides, status and headline figures."""
    import yaml

    overrides_file = member_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    if (member_dir / ERROR_LOG).exists():
        status = "failed: " + (member_dir / ERROR_LOG).read_text().splitlines()[0]
    elif (member_dir / "summary.json").exists():
        status = "ok"
    else:
        status = "unfinished"
    figures = {}
    for column, (name, key) in FIGURES.items():
        path = member_dir / name
        if path.exists():
            content = json.loads(path.read_text())
            value = content.get(key, content.get("eval", {}).get(key))
            if isinstance(value, (int, float)):
                figures[column] = value
    return {"member": member_dir.name, "overrides": overrides, "status": status, **figures}


def summarize(sweep_dir: Path) -> list[dict]:
    """The rows of every member directory (numbered folders) of a sweep, in member order."""
    members = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    return [member_row(p) for p in members]


def write_summary(sweep_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """`sweep.md` and `sweep.csv`: the overrides that differ between members, status, figures."""
    varying = _varying(rows)
    columns = [c for c in FIGURES if any(c in row for row in rows)]
    header = ["member", "overrides", "status", *columns]
    table = [
        [
            row["member"],
            " ".join(o for o in row["overrides"] if o in varying) or "-",
            row["status"],
            *(_fmt(row.get(c)) for c in columns),
        ]
        for row in rows
    ]
    md = sweep_dir / "sweep.md"
    failed = sum(row["status"] != "ok" for row in rows)
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(rows)} members, {failed} not ok. Common overrides: "
        + (" ".join(o for o in (rows[0]["overrides"] if rows else []) if o not in varying) or "none"),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in table]
    md.write_text("\n".join(lines) + "\n")
    path = sweep_dir / "sweep.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    return md, path


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, the summary table and a line saying where it is."""

    def on_multirun_end(self, config, **kwargs) -> None:
        global last
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir)
        md, _ = write_summary(sweep_dir, rows)
        failed = [row["member"] for row in rows if row["status"] != "ok"]
        print(
            f"alignlab: sweep of {len(rows)} members, {len(failed)} not ok"
            f"{' (' + ', '.join(failed) + ')' if failed else ''}; summary in {md} and sweep.csv"
        )
        last = (sweep_dir, rows)


def _varying(rows: list[dict]) -> set[str]:
    """The overrides that not every member shares (all of them for a single member)."""
    if len(rows) < 2:
        return {o for row in rows for o in row["overrides"]}
    common = set.intersection(*(set(row["overrides"]) for row in rows))
    return {o for row in rows for o in row["overrides"] if o not in common}


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
