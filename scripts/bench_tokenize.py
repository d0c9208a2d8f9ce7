"""Tokenisation of the preference data: cold in one process, cold in several, and from the cache.

    python scripts/bench_tokenize.py                       # HH-RLHF (../shared), GPT-2 tokenizer, 3 repeats
    python scripts/bench_tokenize.py --repeats 1 --copies 1   # quicker

Each figure is `alignlab.data.build_datasets` end to end (read, normalise, hold out, tokenise, settle
bad rows) on the 2,312 HH-RLHF harmless-base test pairs (`configs/data/hh_rlhf.yaml`, repeated
`--copies` times with the row text made unique, so that the work is large enough to time), with the
GPT-2 fast tokenizer built from ../shared/tokenizers/gpt2:

* cold, `data.num_proc=1`: a fresh cache folder, tokenised in this process;
* cold, `data.num_proc=N`: a fresh cache folder, tokenised by N worker processes (`datasets.map`);
* warm: the same config again: the tokenised splits come from the cache (keyed by the rows' content,
  the tokenizer and the tokenisation settings), no tokenizer call.

Medians over `--repeats` (each cold run in a fresh cache folder), printed as a markdown table.

**Data at scale** (`--rows`): files of N pairs made by `scripts/make_big_data.py` (HH-RLHF recombined,
seeded), each read and tokenised cold by `build_datasets` in a fresh process per run, num_proc 1 and
2 alternating (the order swapped every repeat), with rows/s, the peak RSS of the process and of the
process with its `datasets.map` workers (sampled from /proc every 50 ms), the file's Arrow size,
and the machine's load average around every run:

    python scripts/bench_tokenize.py --rows 10000 100000 --repeats 3     # ~6 min on 2 quiet cores
    python scripts/bench_tokenize.py --rows 1000000 --repeats 1 --procs 1   # the million-row figure
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = SHARED / "tokenizers" / "gpt2"


def data_file(folder: Path, copies: int) -> Path:
    """HH-RLHF rows, `copies` times, each copy's text made unique (a row number in the first human turn)."""
    rows = [json.loads(line) for line in gzip.open(HH, "rt")]
    path = folder / f"hh-x{copies}.jsonl"
    with open(path, "w") as f:
        for c in range(copies):
            for i, r in enumerate(rows):
                tag = f"\n\nHuman: [{c}.{i}] "
                f.write(json.dumps({k: v.replace("\n\nHuman: ", tag, 1) for k, v in r.items()}) + "\n")
    return path


def timed_build(path: Path, cache: Path, num_proc: int, tokenizer) -> tuple[float, dict]:
    from omegaconf import OmegaConf

    from alignlab.config import DataConfig
    from alignlab.data import build_datasets

    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(DataConfig),
            OmegaConf.load(REPO / "configs" / "data" / "hh_rlhf.yaml"),
            {"path": str(path), "cache_dir": str(cache), "num_proc": num_proc},
        )
    )
    start = time.perf_counter()
    prepared = build_datasets(cfg, tokenizer)
    return time.perf_counter() - start, {
        "rows": prepared.report.train_rows + prepared.report.eval_rows,
        "cache_hit": prepared.report.cache_hit,
    }


def _rss_kib(pid: int) -> dict[str, int]:
    """Resident set of `pid` and its descendants, KiB: in all, anonymous (heap) and file-backed (the
    memory-mapped Arrow pages it has touched, which the kernel can drop); zeros for a process gone."""
    total = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
    try:
        for line in open(f"/proc/{pid}/status"):
            key = line.split(":")[0]
            if key in total:
                total[key] += int(line.split()[1])
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in open(f"/proc/{pid}/task/{task}/children").read().split():
                for key, value in _rss_kib(int(child)).items():
                    total[key] += value
    except OSError:
        pass
    return total


def child(path: Path, cache: Path, num_proc: int) -> int:
    """One cold `build_datasets` of `path` in this fresh process: print its figures as JSON."""
    from datasets.utils.logging import disable_progress_bar
    from transformers import GPT2TokenizerFast

    disable_progress_bar()
    tokenizer = GPT2TokenizerFast(vocab=str(GPT2 / "vocab.json"), merges=str(GPT2 / "merges.txt"))
    tokenizer.pad_token = tokenizer.eos_token
    before = _rss_kib(os.getpid())
    peak, done = dict(before), threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for key, value in _rss_kib(os.getpid()).items():
                peak[key] = max(peak[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, info = timed_build(path, cache, num_proc, tokenizer)
    done.set()
    sampler.join()
    assert not info["cache_hit"], "a cold run hit the cache"
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = {"rss_before_kib": before["VmRSS"], "peak_self_kib": self_peak, "peak_total_kib": peak["VmRSS"]}
    figures.update(peak_anon_kib=peak["RssAnon"], peak_file_kib=peak["RssFile"])
    print(json.dumps({**info, "seconds": seconds, **figures}))
    return 0


def scale(sizes: list[int], repeats: int, folder: Path, procs: tuple[int, ...] = (1, 2)) -> None:
    """The `--rows` table (module docstring)."""
    runs: dict[tuple[int, int], list[dict]] = {}
    loads = []
    print(f"uptime at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for rows in sizes:
        path = folder / f"hh-{rows}.jsonl"
        if not path.exists():
            subprocess.run(
                [
                    sys.executable,
                    str(REPO / "scripts" / "make_big_data.py"),
                    "--rows",
                    str(rows),
                    "--out",
                    str(path),
                ],
                check=True,
                capture_output=True,
            )
        arrow = json.loads(Path(f"{path}.info.json").read_text())["arrow_bytes"]
        for rep in range(repeats):
            for num_proc in procs if rep % 2 == 0 else procs[::-1]:
                load = os.getloadavg()[0]
                cache = folder / f"cache-{rows}-{rep}-{num_proc}"
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(path),
                        "--cache",
                        str(cache),
                        "--num-proc",
                        str(num_proc),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                run = json.loads(out.stdout.strip().splitlines()[-1])
                run.update(arrow_bytes=arrow, load=(load, os.getloadavg()[0]))
                loads.extend(run["load"])
                runs.setdefault((rows, num_proc), []).append(run)
                print(f"{rows} rows, num_proc={num_proc}, repeat {rep}: {json.dumps(run)}", flush=True)
                subprocess.run(["rm", "-rf", str(cache)], check=True)
    print(f"uptime at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(
        f"\n{os.cpu_count()} CPU cores, 1-minute load average {min(loads):.2f}–{max(loads):.2f} "
        f"around the runs; medians of {repeats} [min–max], each run a fresh process\n"
    )
    print(
        "| pairs | data.num_proc | seconds | pairs/s | peak RSS, process (MiB) | peak RSS with workers (MiB) "
        "| RSS before build (MiB) | Arrow size (MiB) | peak RSS / Arrow size |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )

    def cell(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}–{max(xs):{fmt}}]"

    mib = 1024
    for (rows, num_proc), xs in runs.items():
        arrow = xs[0]["arrow_bytes"] / 2**20
        total = [x["peak_total_kib"] / mib for x in xs]
        print(
            f"| {rows:,} | {num_proc} | {cell([x['seconds'] for x in xs], '.1f')} "
            f"| {cell([x['rows'] / x['seconds'] for x in xs], ',.0f')} "
            f"| {cell([x['peak_self_kib'] / mib for x in xs], ',.0f')} | {cell(total, ',.0f')} "
            f"| {statistics.median(x['rss_before_kib'] / mib for x in xs):,.0f} | {arrow:,.0f} "
            f"| {statistics.median(total) / arrow:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", help="the data-at-scale table for these file sizes")
    p.add_argument(
        "--folder", type=Path, help="--rows: where the files and caches go (default: a temp folder)"
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--procs", type=int, nargs="+", default=[1, 2], help="--rows: the data.num_proc values, alternating"
    )
    p.add_argument("--copies", type=int, default=4, help="copies of the 2,312 pairs (unique text each)")
    p.add_argument(
        "--num-proc", type=int, default=os.cpu_count() or 2, help="worker processes of the parallel run"
    )
    args = p.parse_args(argv)
    if not HH.exists() or not GPT2.exists():
        print(
            f"bench_tokenize: needs {HH} and {GPT2} (the ../shared folder beside the repository)",
            file=sys.stderr,
        )
        return 2
    if args.child:
        return child(args.child, args.cache, args.num_proc)
    if args.rows:
        if args.folder:
            args.folder.mkdir(parents=True, exist_ok=True)
            scale(args.rows, args.repeats, args.folder, tuple(args.procs))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                scale(args.rows, args.repeats, Path(tmp), tuple(args.procs))
        return 0
    from datasets.utils.logging import disable_progress_bar
    from transformers import GPT2TokenizerFast

    disable_progress_bar()
    tokenizer = GPT2TokenizerFast(vocab=str(GPT2 / "vocab.json"), merges=str(GPT2 / "merges.txt"))
    tokenizer.pad_token = tokenizer.eos_token
    times: dict[str, list[float]] = {
        "cold, num_proc=1": [],
        f"cold, num_proc={args.num_proc}": [],
        "warm (cache hit)": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = data_file(Path(tmp), args.copies)
        for rep in range(args.repeats):
            for label, num_proc in (
                (f"cold, num_proc={args.num_proc}", args.num_proc),
                ("cold, num_proc=1", 1),
            ):
                cache = Path(tmp) / f"cache-{rep}-{num_proc}"
                seconds, info = timed_build(path, cache, num_proc, tokenizer)
                assert not info["cache_hit"], "a cold run hit the cache"
                times[label].append(seconds)
            seconds, info = timed_build(path, cache, 1, tokenizer)
            assert info["cache_hit"], "the warm run missed the cache"
            times["warm (cache hit)"].append(seconds)
            print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    cold = statistics.median(times["cold, num_proc=1"])
    print(
        f"\n{info['rows']} pairs tokenised ({args.copies} × 2,312 HH-RLHF pairs, GPT-2 tokenizer, "
        "max_length 256), "
        f"{os.cpu_count()} CPU cores, medians of {args.repeats}\n"
    )
    print(
        "| data.num_proc, cache | seconds (median [min–max]) | speed-up over cold, one process |\n"
        "|---|---|---|"
    )
    for label, xs in times.items():
        med = statistics.median(xs)
        print(f"| {label} | {med:.2f} [{min(xs):.2f}–{max(xs):.2f}] | {cold / med:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
