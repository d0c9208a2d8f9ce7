"""Time of one DPO training step (policy forward + backward, reference forward) per forward switch.

The switches of `alignlab.forward.ForwardPlan` measured on their own and together, on random batches
shaped like the issue-#8 workloads:

* W2: a 38M Llama (hidden 512, 4 layers, 8 heads, intermediate 1376, 50,257 vocabulary, tied
  embeddings), 4 pairs per batch, prompt and each response 32–256 tokens (uniform).
* W1: stories260k (../shared, or a random model of its shape), 16 pairs per batch, max_length 64
  (prompt 8–32, responses 8–32 tokens).
* W4: W2's model at 8k context, 1 pair per batch, prompt and each response 3,072–4,096 tokens, with
  gradient checkpointing (as bench_trl.py's `w4-8k`).

    python scripts/bench_forward.py                       # W1 and W2, every variant
    python scripts/bench_forward.py --workload w2 --steps 6
    python scripts/bench_forward.py --workload w4 --steps 2 --threads 2 \
        --variants skip+no_padding_mask,skip_unused_logits,skip+prefix_sharing,defaults   # ~9 min

Each variant forces its layout on every batch (`pair_weight` 0: packed or shared whenever that saves
positions), except `defaults`, which chooses per batch as a run does (`forward.layout_cost`).

Variants run round-robin, one step each in turn, so that all see the same machine load.
Reports the median CPU time of a step over `--steps` steps (after one warm-up step; one torch
thread by default, so that the figure does not depend on what else the machine runs; wall time
alongside), policy tokens per CPU-second (real, non-padding tokens of the policy forward) and the
padding share of the batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260k"
VARIANTS = {  # name -> (skip_unused_logits, padding_free, prefix_sharing, drop_padding_mask)
    "plain": (False, False, False, False),
    "skip_unused_logits": (True, False, False, False),
    "padding_free": (False, True, False, False),
    "skip+padding_free": (True, True, False, False),
    "skip+prefix_sharing": (True, False, True, False),
    "skip+no_padding_mask": (True, False, False, True),
    "defaults": (True, True, True, True),
}


def _model(workload: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if workload == "w1":
        if STORIES.exists():
            return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa")
        config = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=5,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=172,
            vocab_size=512,
            tie_word_embeddings=True,
        )
    else:  # W2's model; W4 is the same with room for 8k tokens
        config = LlamaConfig(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=1376,
            vocab_size=50257,
            max_position_embeddings=8192 if workload == "w4" else 1024,
            tie_word_embeddings=True,
        )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def _batches(workload: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    from alignlab.data.collate import PreferenceCollator

    gen = torch.Generator().manual_seed(seed)
    size, lo, hi, bsz = {"w1": (None, 8, 32, 16), "w2": (None, 32, 256, 4), "w4": (None, 3072, 4096, 1)}[
        workload
    ]

    def ids(lo_, hi_):
        return torch.randint(
            3, vocab, (int(torch.randint(lo_, hi_ + 1, (1,), generator=gen)),), generator=gen
        ).tolist()

    collate = PreferenceCollator(pad_token_id=0)
    return [
        collate(
            [
                {"prompt_ids": ids(lo, hi), "chosen_ids": ids(lo, hi), "rejected_ids": ids(lo, hi)}
                for _ in range(bsz)
            ]
        )
        for _ in range(n)
    ]


def run(workload: str, steps: int, chunk: int, variants: list[str]) -> None:
    import copy
    from dataclasses import replace

    from alignlab.forward import ForwardPlan

    policy = _model(workload)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    if workload == "w4":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = _batches(workload, steps + 1, policy.config.vocab_size)
    pairs = ("chosen", "rejected")
    real = [sum(int(b[f"{r}_attention_mask"].sum()) for r in pairs) for b in batches[1:]]
    total = [sum(b[f"{r}_attention_mask"].numel() for r in pairs) for b in batches[1:]]
    print(
        f"{workload}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params, "
        f"padding {1 - sum(real) / sum(total):.0%} of batch positions, "
        f"{statistics.mean(real):.0f} real tokens/batch, "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    plans = {}  # name -> (policy's plan, reference's plan), fitted once as in a run
    for name in variants:
        skip, packed, shared, unmasked = VARIANTS[name]
        plan = ForwardPlan(
            pairs,
            chunk_size=chunk,
            skip_unused_logits=skip,
            layout="shared_prompts" if shared else "packed" if packed else "padded",
            padding_mask=not unmasked,
            padding_free=packed,
        )
        fitted = plan.fitted(policy), plan.fitted(reference)
        if name != "defaults":  # the variant's layout on every batch it saves positions in
            fitted = tuple(replace(f, pair_weight=0.0) for f in fitted)
        plans[name] = fitted
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i, batch in enumerate(batches):
        for name in variants:  # round-robin, so that every variant sees the same machine load
            start, cpu = time.perf_counter(), time.process_time()
            policy_plan, reference_plan = plans[name]
            pol = policy_plan(policy, policy.get_output_embeddings(), batch)
            with torch.no_grad():
                ref = reference_plan(reference, reference.get_output_embeddings(), batch)
            u = (pol["chosen"].logps - ref["chosen"].logps) - (pol["rejected"].logps - ref["rejected"].logps)
            F.softplus(-0.1 * u).mean().backward()
            policy.zero_grad(set_to_none=True)
            if i:  # the first step warms up
                times[name].append((time.process_time() - cpu, time.perf_counter() - start))
    base = statistics.median(t[0] for t in times[variants[0]])
    for name in variants:
        step = statistics.median(t[0] for t in times[name])
        wall = statistics.median(t[1] for t in times[name])
        print(
            f"  {name:20s} CPU {step * 1000:7.0f} ms/step (wall {wall * 1000:7.0f} ms)   policy tokens/CPU-s "
            f"{statistics.mean(real) / step:8.0f}   x{base / step:.2f} vs {variants[0]}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("w1", "w2", "w4", "both"), default="both")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=128, help="model.logit_chunk_size")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 makes the CPU time a stable measure on a shared machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for workload in ("w1", "w2") if args.workload == "both" else (args.workload,):
        run(workload, args.steps, args.chunk, args.variants.split(","))


if __name__ == "__main__":
    main()
