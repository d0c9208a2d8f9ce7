"""Precomputed reference log-probs (`model.reference_mode=precomputed`).

The frozen reference gives the same log-probs for an example at every epoch, so they can be computed
once, before training, and the reference model dropped from memory and from every step. The
per-token log-probs of each response are stored as a column (`ref_<response>_logps`, response
tokens only) of the tokenized dataset and cached on disk, keyed by a fingerprint of the dataset,
the reference model and the forward settings, so reruns and the members of a sweep reuse them.

Several processes (torchrun, DeepSpeed) share the scoring, as TRL's DPOTrainer does: the dataset's
batches are those of a single-process pass (so every row is scored in the same batch, padded alike,
and gets the same values), dealt out round-robin (`shard`: batch k to process k % N), each process
scores its own 1/N, and the results are gathered (`distributed.all_gather`) and put back in row
order (`reassemble`). The processes run their forwards in step, the same number each (a ZeRO-3
reference is partitioned across them, so every forward needs all of them): one with a batch fewer
repeats one and drops its result. Every process then holds all the values; only process 0 writes the
cache file, the others keep theirs in memory.

Losses that need the reference's full-vocabulary logits (TDPO, SparsePO, NPO+KL) cannot use them:
`alignlab.train.check_combination` refuses that combination before any model loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from alignlab.distributed import all_gather, all_true, barrier, is_main_process, process_index_and_count
from alignlab.losses.base import SequenceLogps

#: bump when the stored values change for the same inputs.
CACHE_VERSION = 1


def column(response: str) -> str:
    """The dataset column holding a response's reference log-probs."""
    return f"ref_{response}_logps"


def model_identity(name_or_path: str, dtype: str, seed: int) -> str:
    """What identifies the reference's weights: its files (name, size, mtime) or its name and seed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.iterdir()
            if p.suffix in (".safetensors", ".json")
        )
        return json.dumps([str(path.resolve()), dtype, files])
    return json.dumps([name_or_path, dtype, seed])  # hub names and builtin:tiny (seeded random init)


@torch.no_grad()
def precompute(
    reference,
    dataset,
    collator,
    plan,
    responses: tuple[str, ...],
    *,
    identity: str,
    batch_size: int,
    device,
    cache_dir: Path,
):
    """`dataset` with a `ref_<r>_logps` column per response, from the cache when it has it.

    Args:
        reference: the frozen reference model.
        dataset: a tokenized dataset (`datasets.Dataset`).
        collator: the run's `PreferenceCollator`.
        plan: the run's `alignlab.forward.ForwardPlan` (same logits path as live training), fitted here
            to the reference.
        responses: the responses to score.
        identity: `model_identity(...)` of the reference.
        batch_size: examples per forward pass.
        device: where the reference runs.
        cache_dir: where the scored dataset is cached.
    """
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, dataset._fingerprint, identity, list(responses)]).encode()
    )
    key = key.hexdigest()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"reference-{key[:40]}.arrow"
    hit = all_true(cache_file.exists())  # all processes read the cache, or all score (in step)
    on_disk = hit or is_main_process()  # the others keep their (identical) scores in memory
    head = reference.get_output_embeddings()
    plan = replace(plan, responses=responses, full_logits=False).fitted(reference)

    def score(rows: range) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Per response: the log-probs of the response tokens of rows `rows`, concatenated; their counts."""
        columns = dataset[rows.start : rows.stop]
        examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
        batch = {k: v.to(device) for k, v in collator(examples).items()}
        out = plan(reference, head, batch)
        return {r: (out[r].token_logps[out[r].mask].cpu(), out[r].mask.sum(-1).tolist()) for r in responses}

    values: dict[str, list] = {column(r): [] for r in responses}
    if not hit:
        rank, world = process_index_and_count()
        batches, own = shard(len(dataset), batch_size, rank, world)
        results = [score(rows) for rows in batches][:own]  # the repeated batch's result is dropped
        if world > 1:
            rows = sum(map(len, batches[:own]))
            repeated = ", 1 repeated" if len(batches) > own else ""
            # one write, flushed: the processes' lines stay whole in a shared stdout
            print(
                f"reference log-probs: process {rank} scored {rows} of {len(dataset)} rows ({own} batches"
                f"{repeated})\n",
                end="",
                flush=True,
            )
        for result in reassemble(all_gather(results)):
            for r, (flat, counts) in result.items():
                values[column(r)].extend(row.tolist() for row in flat.split(counts))

    def attach(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {name: [scores[i] for i in indices] for name, scores in values.items()}

    scored = dataset.map(
        attach,
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        new_fingerprint=key[:32],
        load_from_cache_file=hit or None,
        cache_file_name=str(cache_file) if on_disk else None,
        keep_in_memory=not on_disk,
        desc="Reference log-probs",
    )
    barrier()  # the cache file is complete before any process goes on
    if is_main_process():
        print(
            f"reference log-probs: {'reused from cache' if hit else 'computed'} for {len(dataset)} examples "
            f"({cache_file})"
        )
    return scored


def shard(n_rows: int, batch_size: int, rank: int, world: int) -> tuple[list[range], int]:
    """The batches (row ranges) process `rank` of `world` scores, and how many of them are its own.

    Batch k holds rows [k*b, (k+1)*b), as in a single-process pass, and goes to process k % world.
    Every process gets ceil(batches / world) of them: one with fewer repeats its last (or the first
    batch), whose result it drops; the first `own` are its own.
    """
    n_batches = -(-n_rows // batch_size)
    batches = [
        range(k * batch_size, min((k + 1) * batch_size, n_rows)) for k in range(rank, n_batches, world)
    ]
    own = len(batches)
    filler = batches[-1] if batches else range(min(batch_size, n_rows))
    return batches + [filler] * (-(-n_batches // world) - own), own


def reassemble(per_process: list[list]) -> list:
    """All batches' results in batch (= row) order, from each process's own ones (in `shard`'s order)."""
    world = len(per_process)
    return [per_process[k % world][k // world] for k in range(sum(map(len, per_process)))]


def from_columns(
    inputs: dict[str, torch.Tensor], policy: dict[str, SequenceLogps]
) -> dict[str, SequenceLogps]:
    """Reference `SequenceLogps` rebuilt from a batch's `ref_<r>_logps` columns, on the policy's masks."""
    out = {}
    for name, seq in policy.items():
        values = inputs[column(name)]  # (B, L), NaN-padded
        valid = ~torch.isnan(values)
        if not torch.equal(valid.sum(-1), seq.mask.sum(-1)):
            raise RuntimeError(
                f"precomputed reference log-probs of {name!r} do not match the batch's response "
                "tokens; the cache is stale: delete it (data.cache_dir) and rerun"
            )
        token = torch.zeros_like(seq.token_logps)
        token[seq.mask] = values[valid].to(token.dtype)
        out[name] = SequenceLogps(token_logps=token, mask=seq.mask, input_mask=seq.input_mask)
    return out
