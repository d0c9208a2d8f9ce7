"""alignlab.distributed in one process: the DeepSpeed configs compose into the dict HF Trainer takes,
unworkable setups are refused naming the fix, and the multi-process helpers are no-ops here.
(Two-process runs: tests/integration/test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignlab import distributed
from alignlab.config import DeepSpeedConfig
from alignlab.errors import ConfigError
from alignlab.train import to_typed

OPTIONS = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}


@pytest.mark.parametrize("option, stage", OPTIONS.items())
def test_options_become_deepspeed_configs(option, stage, compose_run):
    typed = to_typed(compose_run("+recipe=dpo", f"deepspeed={option}"))
    ds = distributed.deepspeed_config(typed.deepspeed)
    assert typed.deepspeed.enabled and ds["zero_optimization"]["stage"] == stage
    # "auto": HF Trainer fills batch sizes, accumulation, clipping and precision from trainer.*
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"] == {"enabled": "auto"} and ds["fp16"] == {"enabled": "auto"}
    json.dumps(ds)  # plain data, as TrainingArguments(deepspeed=...) takes it
    assert ds is not distributed.deepspeed_config(typed.deepspeed)  # a fresh copy: HF fills it in place


def test_none_is_the_default_and_override_and_path_work(compose_run, tmp_path):
    assert distributed.deepspeed_config(to_typed(compose_run("+recipe=dpo")).deepspeed) is None
    typed = to_typed(
        compose_run("+recipe=dpo", "deepspeed=zero2", "deepspeed.config.zero_optimization.overlap_comm=false")
    )
    assert distributed.deepspeed_config(typed.deepspeed)["zero_optimization"]["overlap_comm"] is False
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    typed = to_typed(compose_run("+recipe=dpo", f"deepspeed.path={own}"))
    assert distributed.deepspeed_config(typed.deepspeed)["zero_optimization"]["stage"] == 3


def test_unknown_deepspeed_keys_and_options_fail_at_compose_time(compose_run):
    with pytest.raises(Exception, match="deepspeed.cofnig"):
        compose_run("+recipe=dpo", "deepspeed.cofnig.x=1")
    with pytest.raises(Exception, match="deepspeed/zero4"):
        compose_run("+recipe=dpo", "deepspeed=zero4")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("deepspeed.path=/nonexistent/ds.json",), "deepspeed.path='/nonexistent/ds.json' is not a readable"),
        (("deepspeed=zero2", "+trainer.extra.deepspeed=ds.json"), "remove trainer.extra.deepspeed"),
        (("deepspeed=zero3", "model.lora.enabled=true", "model.lora.load_in_4bit=true"), "QLoRA.* ZeRO-3"),
    ],
)
def test_unworkable_setups_are_refused(overrides, message, compose_run):
    with pytest.raises(ConfigError, match=message):
        distributed.check(to_typed(compose_run("+recipe=dpo", *overrides)))


def test_fsdp2_becomes_the_fsdp_config_hf_trainer_takes(compose_run, tmp_path, monkeypatch):
    from alignlab.train import training_arguments

    assert distributed.fsdp_config(to_typed(compose_run("+recipe=dpo")).distributed) is None  # none: default
    typed = to_typed(
        compose_run("+recipe=dpo", "distributed=fsdp2", "distributed.fsdp_config.reshard_after_forward=false")
    )
    fsdp = distributed.fsdp_config(typed.distributed)
    assert fsdp["version"] == 2 and fsdp["reshard_after_forward"] is False
    assert fsdp is not distributed.fsdp_config(typed.distributed)  # a fresh copy: HF normalises it in place
    with pytest.raises(
        ConfigError, match="distributed=fsdp2 shards the model across processes, and this run"
    ):
        distributed.check(typed)  # one process: HF Trainer would refuse it after the models loaded
    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher
    distributed.check(typed)
    monkeypatch.delenv("WORLD_SIZE")  # TrainingArguments below would start a process group
    args = training_arguments(typed.trainer, tmp_path, 0, False, [], None, fsdp)
    assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert args.fsdp_plugin_args["reshard_after_forward"] is False
    assert not training_arguments(typed.trainer, tmp_path, 0, False, []).fsdp  # without it: no FSDP


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("distributed=fsdp2", "deepspeed=zero3"),
            "distributed=fsdp2 and deepspeed both set an engine .* pick FSDP2 \\(deepspeed=none\\) or "
            "DeepSpeed \\(distributed=none\\)",
        ),
        (("distributed=fsdp2", "deepspeed.path=ds.json"), "distributed=fsdp2 and deepspeed.path both"),
    ],
)
def test_fsdp2_and_deepspeed_together_are_refused(overrides, message, compose_run):
    with pytest.raises(ConfigError, match=message):
        distributed.check(to_typed(compose_run("+recipe=dpo", *overrides)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("distributed=fsdp2", "distributed.fsdp_config.version=1"),
            "distributed.fsdp_config.version=1: only",
        ),
        (
            ("+trainer.extra.fsdp=true",),
            "alignlab sets TrainingArguments.fsdp itself \\(distributed=fsdp2\\)",
        ),
        (("+trainer.extra.fsdp_config={}",), "TrainingArguments.fsdp_config itself \\(distributed=fsdp2\\)"),
    ],
)
def test_fsdp_settings_outside_the_group_are_refused(overrides, message, compose_run):
    with pytest.raises(ConfigError, match=message):
        to_typed(compose_run("+recipe=dpo", *overrides))


def test_a_loss_with_its_own_parameters_is_refused_under_deepspeed(compose_run):
    class Heads(torch.nn.Module):
        def param_groups(self):
            return [{"params": [torch.nn.Parameter(torch.zeros(1))]}]

    with pytest.raises(ConfigError, match="deepspeed=none"):
        distributed.check_loss_parameters(
            to_typed(compose_run("+recipe=sparsepo", "deepspeed=zero2")), Heads()
        )
    with pytest.raises(ConfigError, match="FSDP2's optimizers cannot take; use distributed=none"):
        distributed.check_loss_parameters(
            to_typed(compose_run("+recipe=sparsepo", "distributed=fsdp2")), Heads()
        )
    distributed.check_loss_parameters(
        to_typed(compose_run("+recipe=sparsepo")), Heads()
    )  # fine without DeepSpeed or FSDP2


def test_frozen_models_without_deepspeed_are_placed_on_the_device():
    class Args:
        deepspeed = None
        device = torch.device("cpu")

    model = torch.nn.Linear(2, 2)
    assert distributed.prepare_frozen(model, Args()) is model and model.weight.device.type == "cpu"
    assert distributed.prepare_frozen(None, Args()) is None
    view = torch.nn.Module()  # a module with no weights of its own (the adapter-disabled view) is left alone
    assert distributed.prepare_frozen(view, Args()) is view
    assert distributed.chunkable_head(model) is model  # only ZeRO-3-partitioned frozen heads are wrapped


def test_process_helpers_are_no_ops_in_one_process(tmp_path):
    assert distributed.is_main_process() and not distributed.launched_multiprocess()
    assert (
        distributed.same_on_all("x") == "x" and distributed.all_true(True) and not distributed.all_true(False)
    )
    with distributed.main_process_first():
        (tmp_path / "ran").touch()
    assert (tmp_path / "ran").exists()
    distributed.barrier()
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    distributed.average_gradients([param])
    assert torch.equal(param.grad, torch.full((2,), 3.0))
    assert not DeepSpeedConfig().enabled and DeepSpeedConfig(path="x.json").enabled


def test_whole_models_switches_zero3_off_in_the_block_and_back_after():
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    class Zero3:  # what TrainingArguments holds as hf_deepspeed_config under deepspeed=zero3
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    class Args:
        deepspeed = {"zero_optimization": {"stage": 3}}
        hf_deepspeed_config = Zero3()

    args = Args()
    set_hf_deepspeed_config(args.hf_deepspeed_config)
    try:
        assert is_deepspeed_zero3_enabled()
        with distributed.whole_models(args):
            assert not is_deepspeed_zero3_enabled()  # from_pretrained loads whole models here
        assert is_deepspeed_zero3_enabled()
        with distributed.whole_models():  # no run arguments: nothing to set back
            pass
        assert not is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()


def _two_processes(rank: int, port: int, out: str) -> None:
    import os
    import time

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    distributed.init_processes()
    log = Path(out) / "order.txt"
    with distributed.main_process_first():
        if rank == 0:
            time.sleep(0.5)  # process 1 must still wait
        with log.open("a") as f:
            f.write(f"{rank}\n")
    distributed.barrier()
    result = {
        "main": distributed.is_main_process(),
        "same": distributed.same_on_all(f"from {rank}"),
        "all_true": distributed.all_true(rank == 0),
        "all_true_both": distributed.all_true(True),
    }
    (Path(out) / f"{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_process_helpers_across_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_processes, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    first, second = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first == {"main": True, "same": "from 0", "all_true": False, "all_true_both": True}
    assert second == {"main": False, "same": "from 0", "all_true": False, "all_true_both": True}
    assert (tmp_path / "order.txt").read_text().split() == ["0", "1"]  # process 0 filled the cache first
