"""alignlab.checkpoints on hand-made folders: what makes a checkpoint resumable, and the metrics log
trimmed to the checkpoint a run resumes from."""

from __future__ import annotations

import json

import pytest

from alignlab.checkpoints import COMPLETE, latest_complete, problem, truncate_log


def _checkpoint(folder, files):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    return folder


PLAIN = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors", COMPLETE)
DEEPSPEED = ("trainer_state.json", "global_step4/mp_rank_00_model_states.pt",
             "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt", COMPLETE)


@pytest.mark.parametrize("files", [PLAIN, DEEPSPEED], ids=["plain", "deepspeed"])
def test_a_complete_checkpoint_is_resumable(tmp_path, files):
    assert problem(_checkpoint(tmp_path / "checkpoint-4", files)) is None


@pytest.mark.parametrize("files, reason", [
    ([f for f in PLAIN if f != "optimizer.pt"], "lacks optimizer.pt"),
    ([f for f in PLAIN if f != "model.safetensors"], "lacks model weights"),
    ([f for f in PLAIN if f != COMPLETE], "was not finished"),
    ([f for f in DEEPSPEED if "optim_states" not in f], "lacks DeepSpeed optimizer states"),
    ([f for f in DEEPSPEED if "model_states" not in f], "lacks DeepSpeed model states"),
])
def test_an_incomplete_checkpoint_is_named_with_its_reason(tmp_path, files, reason):
    assert reason in problem(_checkpoint(tmp_path / "checkpoint-4", files))


def test_latest_takes_the_newest_complete_checkpoint_and_names_the_skipped(tmp_path):
    _checkpoint(tmp_path / "checkpoint-2", PLAIN)
    _checkpoint(tmp_path / "checkpoint-10", PLAIN)  # numeric order: 10 is newer than 2 and 4
    _checkpoint(tmp_path / "checkpoint-12", [f for f in PLAIN if f != COMPLETE])
    path, skipped = latest_complete(tmp_path)
    assert path == tmp_path / "checkpoint-10"
    assert len(skipped) == 1 and "checkpoint-12" in skipped[0]


def test_the_log_keeps_only_the_steps_up_to_the_resumed_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # cut by the kill
    truncate_log(log, checkpoint)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert "dropped 3 records logged after step 2" in capsys.readouterr().out
