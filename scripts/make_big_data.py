"""A large HH-RLHF-like preference file, made from the 2,312 real pairs in ../shared by recombination.

    python scripts/make_big_data.py --rows 1000000 --out /tmp/hh-1m.jsonl     # ~1.4 GB, ~1 min

Row i (seeded, `--seed`) takes a random HH pair and, for every other row, prefixes both transcripts
with the first exchange (human turn and assistant reply) of another random pair, so that prompts
and lengths vary beyond the 2,312 originals; a row tag ``[i]`` in the first human turn makes every
row's text unique (no two rows tokenise to a cache-equivalent result). The output is JSON lines of
``{chosen, rejected}`` transcripts (`data.format=hh`), as `configs/data/hh_rlhf.yaml` reads them.

Beside it, ``<out>.info.json`` records the rows, the seed and the file's **Arrow size**: the bytes
of its two string columns as an Arrow table (UTF-8 text plus 32-bit offsets), the yardstick of the
data pipeline's peak-memory target (docs/performance.md, "Data at scale").
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman: "


def first_exchange(transcript: str) -> str:
    """The first human turn and the assistant's reply to it (up to the second human turn), or ""."""
    second = transcript.find(HUMAN, len(HUMAN))
    return transcript[:second] if second > 0 and ASSISTANT in transcript[:second] else ""


def make_rows(pairs: list[dict[str, str]], rows: int, seed: int):
    """`rows` recombined pairs (module docstring)."""
    rng = random.Random(seed)
    for i in range(rows):
        pair = pairs[rng.randrange(len(pairs))]
        prefix = first_exchange(pairs[rng.randrange(len(pairs))]["chosen"]) if i % 2 else ""
        tag = f"{HUMAN}[{i}] "
        yield {key: prefix + text.replace(HUMAN, tag, 1) for key, text in pair.items()}


def arrow_bytes(lengths: list[int], rows: int) -> int:
    """Arrow size of the string columns: the UTF-8 bytes, plus (rows + 1) int32 offsets per column."""
    return sum(lengths) + len(lengths) * 4 * (rows + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not HH.exists():
        print(f"make_big_data: needs {HH} (the ../shared folder beside the repository)", file=sys.stderr)
        return 2
    pairs = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    text = {"chosen": 0, "rejected": 0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in make_rows(pairs, args.rows, args.seed):
            for key in text:
                text[key] += len(row[key].encode("utf-8"))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {
        "rows": args.rows,
        "seed": args.seed,
        "source": str(HH.relative_to(REPO.parent)),
        "file_bytes": args.out.stat().st_size,
        "arrow_bytes": arrow_bytes(list(text.values()), args.rows),
    }
    Path(f"{args.out}.info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
