"""TR-DPO (`model.reference_sync`): the updated reference travels with every checkpoint, so a run
interrupted after a checkpoint and resumed equals the uninterrupted run exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _losses(run_dir) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r and "train_runtime" not in r}


def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(run_and_resume):
    # τ = 2, checkpoint at 3: the checkpoint holds the reference updated at step 2, and the resumed run
    # must continue from it (the initial reference would change step 4's loss and every weight after)
    full, resumed = run_and_resume("trdpo", 6, 3, "model.reference_sync.every=2")
    got, want = _losses(resumed.output_dir), _losses(full.output_dir)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == [want[s] for s in got]  # exactly
    for name in ("reference.safetensors", "model.safetensors"):
        a = load_file(full.output_dir / "checkpoint-6" / name)
        b = load_file(resumed.output_dir / "checkpoint-6" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"


def test_a_checkpoint_without_the_reference_is_refused_on_resume(tmp_path, compose_run):
    import shutil

    from alignlab.errors import UserError
    from alignlab.train import run

    common = ("+recipe=trdpo", "trainer.max_steps=2", "data.eval_size=0", f"data.cache_dir={tmp_path / 'c'}")
    plain = run(
        compose_run(*common, "model.reference_sync.enabled=false", "trainer.save_steps=1"),
        output_dir=tmp_path / "plain",
    )
    (tmp_path / "synced").mkdir()
    shutil.copytree(plain.output_dir / "checkpoint-1", tmp_path / "synced" / "checkpoint-1")
    resume = ("trainer.resume_from_checkpoint=latest", "trainer.resume_any_config=true")
    with pytest.raises(UserError, match="has no reference.safetensors: it was written without"):
        run(compose_run(*common, "model.reference_sync.every=1", *resume), output_dir=tmp_path / "synced")
