"""Peak memory of one training step (forward + loss + backward), chunked logits against dense.

Each measurement runs in a fresh process: peak RSS after the step minus RSS after setup (model,
reference and batch built, one warm-up step excluded by design: the first step is the measured one).

    python scripts/bench_memory.py                  # stories260k (../shared) and a 50k-vocab Llama
    python scripts/bench_memory.py --markdown out.md

Results and the command are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260k"
#: name -> (model source, batch size, sequence length)
WORKLOADS = {
    "stories260k": ("stories260k", 8, 256),
    "llama-50k-vocab": ("config:hidden=512,layers=4,heads=8,intermediate=1376,vocab=50257", 4, 256),
}
LOSSES = ("dpo", "tdpo")
CHUNKS = (0, 64)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _model(source: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if source == "stories260k":
        return AutoModelForCausalLM.from_pretrained(STORIES)
    spec = dict(kv.split("=") for kv in source.removeprefix("config:").split(","))
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=int(spec["hidden"]),
            num_hidden_layers=int(spec["layers"]),
            num_attention_heads=int(spec["heads"]),
            num_key_value_heads=int(spec["heads"]),
            intermediate_size=int(spec["intermediate"]),
            vocab_size=int(spec["vocab"]),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )


def measure(workload: str, loss_name: str, chunk: int) -> dict:
    """One step in this process; returns the peak RSS increase over the post-setup baseline."""
    import copy

    import torch

    from alignlab.forward import ForwardPlan
    from alignlab.losses import REGISTRY, build
    from alignlab.losses.base import LossInputs

    torch.manual_seed(0)
    source, b, t = WORKLOADS[workload]
    policy = _model(source)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    vocab = policy.config.vocab_size
    batch = {}
    for r in ("chosen", "rejected"):
        ids = torch.randint(3, vocab, (b, t))
        labels = ids.clone()
        labels[:, : t // 2] = -100
        batch.update(
            {f"{r}_input_ids": ids, f"{r}_attention_mask": torch.ones_like(ids), f"{r}_labels": labels}
        )
    loss_fn = build(REGISTRY[loss_name].config())
    plan = ForwardPlan(("chosen", "rejected"), loss_fn.needs.full_logits, chunk_size=chunk)
    policy_plan, reference_plan = plan.fitted(policy), plan.fitted(reference)
    base = _rss_mib()
    pol = policy_plan(policy, policy.get_output_embeddings(), batch)
    with torch.no_grad():
        ref = reference_plan(reference, reference.get_output_embeddings(), batch)
    loss_fn(LossInputs(policy=pol, reference=ref)).losses.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "workload": workload,
        "loss": loss_name,
        "chunk": chunk,
        "batch": b,
        "seq_len": t,
        "vocab": vocab,
        "peak_increase_mib": round(peak - base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "LOSS", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    rows = []
    for workload in WORKLOADS:
        if workload == "stories260k" and not STORIES.exists():
            print(f"skipping {workload}: {STORIES} is absent", file=sys.stderr)
            continue
        for loss_name in LOSSES:
            for chunk in CHUNKS:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", workload, loss_name, str(chunk)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    lines = [
        "| workload | B × T | vocab | loss | logits | peak memory of one step (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = f"chunked ({r['chunk']})" if r["chunk"] else "dense"
        lines.append(
            f"| {r['workload']} | {r['batch']} × {r['seq_len']} | {r['vocab']} | {r['loss']} | {kind} | "
            f"{r['peak_increase_mib']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
