"""alignlab.checkpoints on hand-made folders: what makes a checkpoint resumable (complete, every file
a resume needs, each file still as saved), `latest`'s choice, and the metrics log trimmed to the
checkpoint a run resumes from."""

from __future__ import annotations

import json

import pytest

from alignlab.checkpoints import (
    COMPLETE,
    LOSS_STATE,
    latest_complete,
    manifest,
    mark_complete,
    problem,
    truncate_log,
)


def _checkpoint(folder, files, *, complete=True, identity=None):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"contents of {name}")
    if complete:
        mark_complete(folder, identity)
    return folder


PLAIN = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors", "rng_state.pth")
DEEPSPEED = (
    "trainer_state.json",
    "rng_state.pth",
    "global_step4/mp_rank_00_model_states.pt",
    "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
)
#: FSDP2 through accelerate (FULL_STATE_DICT): its weights and optimizer states under its own names
FSDP = (
    "trainer_state.json",
    "scheduler.pt",
    "rng_state_0.pth",
    "model.safetensors",
    "pytorch_model_fsdp.bin",
    "optimizer.bin",
)


@pytest.mark.parametrize("files", [PLAIN, DEEPSPEED, FSDP], ids=["plain", "deepspeed", "fsdp"])
def test_a_complete_checkpoint_is_resumable(tmp_path, files):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", files)
    assert problem(checkpoint) is None
    recorded = manifest(checkpoint)["files"]
    assert sorted(recorded) == sorted(files)
    assert recorded["trainer_state.json"]["size"] == len("contents of trainer_state.json")
    assert len(recorded["trainer_state.json"]["digest"]) == 64


def test_a_digest_is_the_sha256_of_the_blocks_sha256s(tmp_path, monkeypatch):
    import hashlib

    import alignlab.checkpoints

    monkeypatch.setattr(alignlab.checkpoints, "BLOCK", 4)
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    blocks = [hashlib.sha256(part).digest() for part in (b"0123", b"4567", b"89")]
    assert alignlab.checkpoints.digests([path])[path] == hashlib.sha256(b"".join(blocks)).hexdigest()


@pytest.mark.parametrize(
    "files, reason",
    [
        ([f for f in PLAIN if f != "optimizer.pt"], "lacks optimizer.pt"),
        ([f for f in PLAIN if f != "rng_state.pth"], "lacks rng_state.pth"),
        ([f for f in PLAIN if f != "model.safetensors"], "lacks model weights"),
        ([f for f in DEEPSPEED if "optim_states" not in f], "lacks DeepSpeed optimizer states"),
        ([f for f in DEEPSPEED if "model_states" not in f], "lacks DeepSpeed model states"),
        ([f for f in FSDP if f != "optimizer.bin"], "lacks FSDP optimizer states (optimizer.bin)"),
        ([f for f in FSDP if f != "scheduler.pt"], "lacks scheduler.pt"),
    ],
)
def test_a_checkpoint_without_a_file_a_resume_needs_is_named_with_its_reason(tmp_path, files, reason):
    assert reason in problem(_checkpoint(tmp_path / "checkpoint-4", files))


def test_an_unmarked_checkpoint_is_unfinished(tmp_path):
    assert "was not finished" in problem(_checkpoint(tmp_path / "checkpoint-4", PLAIN, complete=False))


def test_the_loss_state_is_required_when_the_loss_keeps_state(tmp_path):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", PLAIN)
    assert problem(checkpoint) is None
    assert f"lacks {LOSS_STATE}" in problem(checkpoint, loss_state=True)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:5]), "is 5 bytes, 24 when saved (truncated"),
        (lambda f: f.write_bytes(b""), "is 0 bytes, 24 when saved"),
        (lambda f: f.write_text("contents of optimizer.PT"), "does not match its checksum"),
        (lambda f: f.unlink(), "lacks optimizer.pt"),
    ],
)
def test_a_file_changed_after_the_save_fails_verification(tmp_path, damage, reason):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", PLAIN)
    damage(checkpoint / "optimizer.pt")
    assert reason in problem(checkpoint)


def test_a_file_listed_in_the_manifest_must_still_be_there(tmp_path):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", (*PLAIN, "log_state.json"))
    (checkpoint / "log_state.json").unlink()
    assert "lost log_state.json after it was saved" in problem(checkpoint)


def test_an_older_marker_is_accepted_on_file_names(tmp_path):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", PLAIN, complete=False)
    (checkpoint / COMPLETE).write_text("complete\n")  # what alignlab wrote before checksums
    assert problem(checkpoint) is None


def test_latest_takes_the_newest_verified_checkpoint_and_names_the_skipped(tmp_path):
    _checkpoint(tmp_path / "checkpoint-2", PLAIN)
    _checkpoint(tmp_path / "checkpoint-10", PLAIN)  # numeric order: 10 is newer than 2 and 4
    (_checkpoint(tmp_path / "checkpoint-12", PLAIN) / "scheduler.pt").write_bytes(b"")
    _checkpoint(tmp_path / "checkpoint-14", PLAIN, complete=False)
    path, skipped = latest_complete(tmp_path)
    assert path == tmp_path / "checkpoint-10"
    assert (
        len(skipped) == 2
        and "checkpoint-14" in skipped[0]
        and "checkpoint-12/scheduler.pt is 0 bytes" in skipped[1]
    )


def test_latest_takes_only_checkpoints_of_this_config(tmp_path):
    _checkpoint(
        tmp_path / "checkpoint-2", PLAIN, identity={"run_id": "a", "fingerprint": "mine", "config": {}}
    )
    _checkpoint(
        tmp_path / "checkpoint-4", PLAIN, identity={"run_id": "b", "fingerprint": "theirs", "config": {}}
    )
    path, skipped = latest_complete(tmp_path, fingerprint="mine")
    assert path == tmp_path / "checkpoint-2"
    assert "checkpoint-4: written by another run (run b)" in skipped[0]
    assert latest_complete(tmp_path)[0] == tmp_path / "checkpoint-4"  # no fingerprint: any config


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


def test_the_log_drops_the_end_of_an_interrupted_train_call(tmp_path):
    # SIGTERM at step 2: the checkpoint, then HF's end-of-train record; or a kill during the final
    # evaluation of a finished run: its end-of-train record and the final eval, both at the last step
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    log = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 2, "eval_loss": 0.4},
        {"step": 2, "train_runtime": 1.0, "train_loss": 0.7},
        {"step": 2, "eval_loss": 0.4},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    truncate_log(log, checkpoint)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
