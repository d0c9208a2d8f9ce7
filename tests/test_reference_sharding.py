"""Precomputed reference log-probs shared across processes (`alignlab.reference.shard` / `reassemble`):
each of N processes scores its 1/N of the batches, all run the same number of forwards, and the gathered
results come back in row order, identical to one process's. The processes here are a fake world of
threads (`_fake_world`); the real two-process run is tests/integration/test_distributed.py."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

import alignlab.reference as reference_module
from alignlab import builtin, losses
from alignlab.config import ModelConfig
from alignlab.data.collate import PreferenceCollator
from alignlab.reference import column, precompute, reassemble, shard
from alignlab.train import forward_plan


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_rows, batch_size", [(0, 4), (1, 4), (5, 1), (7, 2), (24, 8), (25, 8), (10, 16)])
def test_each_process_scores_its_share_in_step(world, n_rows, batch_size):
    single, own = shard(n_rows, batch_size, 0, 1)
    assert own == len(single) and [i for rows in single for i in rows] == list(range(n_rows))
    shards = [shard(n_rows, batch_size, rank, world) for rank in range(world)]
    assert len({len(batches) for batches, _ in shards}) == 1  # the same number of forwards on every process
    mine = [batches[:own] for batches, own in shards]
    assert reassemble(mine) == single  # each batch scored once, by one process, and put back in row order
    counts = [sum(map(len, batches)) for batches in mine]
    assert max(counts) - min(counts) <= batch_size  # 1/N of the rows each, to a batch
    for batches, own in shards:  # a process with a batch fewer repeats one of the batches (result dropped)
        assert all(rows in single for rows in batches[own:])


def test_reassemble_order_with_a_fake_world_of_three():
    per_process = [["b0", "b3", "b6"], ["b1", "b4"], ["b2", "b5"]]
    assert reassemble(per_process) == [f"b{k}" for k in range(7)]


def _fake_world(monkeypatch, world: int):
    """`alignlab.reference`'s view of the processes, for threads standing for `world` processes."""
    local, box, wall = threading.local(), [None] * world, threading.Barrier(world)

    def all_gather(value):
        box[local.rank] = value
        wall.wait()
        out = list(box)
        wall.wait()
        return out

    monkeypatch.setattr(reference_module, "process_index_and_count", lambda: (local.rank, world))
    monkeypatch.setattr(reference_module, "all_gather", all_gather)
    monkeypatch.setattr(reference_module, "all_true", lambda flag: all(all_gather(bool(flag))))
    monkeypatch.setattr(reference_module, "is_main_process", lambda: local.rank == 0)
    monkeypatch.setattr(reference_module, "barrier", wall.wait)
    return local


@pytest.mark.parametrize("world", [2, 3])
def test_shared_scoring_equals_one_process(world, tmp_path, monkeypatch, capsys):
    gen = torch.Generator().manual_seed(0)
    vocab = len(builtin.build_tokenizer())

    def ids(lo, hi):
        return torch.randint(
            6, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen
        ).tolist()

    from datasets import Dataset

    dataset = Dataset.from_list(
        [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(11)]
    )
    model = builtin.build_model(vocab, seed=0).eval().requires_grad_(False)
    needs = losses.build(losses.get("dpo").config()).needs
    plan = forward_plan("dpo", replace(ModelConfig(), reference_mode="precomputed"), needs)
    collator = PreferenceCollator(0, responses=needs.responses)
    kwargs = {"identity": "tiny", "batch_size": 3, "device": "cpu"}

    def score(cache_dir):
        return precompute(model, dataset, collator, plan, needs.responses, cache_dir=cache_dir, **kwargs)

    one = score(tmp_path / "one")
    cache_one = next((tmp_path / "one").glob("reference-*.arrow"))

    local = _fake_world(monkeypatch, world)
    results, errors = [None] * world, []

    def process(rank):
        local.rank = rank
        try:
            results[rank] = score(tmp_path / "shared")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    out = capsys.readouterr().out
    scored = sorted(
        int(line.split(" scored ")[1].split()[0]) for line in out.splitlines() if " scored " in line
    )
    assert (
        sum(scored) == len(dataset) and len(scored) == world
    )  # 4 batches of 3 rows (the last of 2), dealt out
    assert max(scored) <= -(-4 // world) * 3
    for rank in range(world):  # every process holds all the values, in row order
        for r in needs.responses:
            assert results[rank][column(r)] == one[column(r)]
    cache_shared = list((tmp_path / "shared").glob("reference-*.arrow"))
    assert [p.name for p in cache_shared] == [cache_one.name]  # one writer, the same key
    assert cache_shared[0].read_bytes() == cache_one.read_bytes()
