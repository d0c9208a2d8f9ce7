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
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
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
