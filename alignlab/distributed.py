"""Everything multi-process, DeepSpeed- and FSDP-specific: one module, so the rest of alignlab never asks.

* Processes. Under `torchrun` / the `deepspeed` launcher every process runs `alignlab.train.run` on
  the same config. `init_processes` starts the process group first thing (accelerate picks the
  backend: NCCL on GPUs, gloo on CPUs), so the processes can agree on one run directory
  (`same_on_all`), fill caches one writer at a time (`main_process_first`) and leave the files of a
  run (reports, summary, merged model) to process 0 (`is_main_process`).
* DeepSpeed. `deepspeed=zero1|zero2|zero3|zero3_offload` (configs/deepspeed/) is a DeepSpeed config
  with "auto" values that HF Trainer fills from `trainer.*`; it becomes `TrainingArguments.deepspeed`
  (`deepspeed_config`) and HF Trainer / accelerate run the policy's engine. Frozen models (the
  reference, teachers) are `prepare_frozen`-ed: under ZeRO-3 each becomes a DeepSpeed inference
  engine (parameters partitioned across processes, eval mode, no optimizer state), as TRL's
  `prepare_deepspeed` does; otherwise it is placed on the device in the engine's precision.
* FSDP2. `distributed=fsdp2` (configs/distributed/) becomes `TrainingArguments.fsdp` / `fsdp_config`
  (`fsdp_config`), and accelerate shards the policy with PyTorch's `fully_shard`. Frozen models stay
  whole in each process. On CPUs accelerate 1.15 would silently fall back to DDP (`fsdp_on_cpu`).

Models are loaded whole in each process and partitioned when their engine starts (no `zero.Init`
at load time): simple and exact, at the price of one full copy per process in CPU memory while loading.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from alignlab.config import AlignConfig, DeepSpeedConfig, DistributedConfig
from alignlab.errors import ConfigError

#: ZeRO-3 settings that HF Trainer derives from the model's hidden size h (as in `trainer_config_finalize`).
_HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


# -- processes ------------------------------------------------------------------------------------


def launched_multiprocess() -> bool:
    """Whether a launcher (torchrun, deepspeed, srun via torchrun) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_processes() -> None:
    """Start the process group now when several processes were launched (no-op otherwise).

    HF Trainer would start it later, in `TrainingArguments`; the run needs it earlier, to agree on
    its directory and its caches. accelerate's `PartialState` picks the backend and device, and HF
    Trainer / DeepSpeed reuse the group.
    """
    if launched_multiprocess() and not _initialized():
        PartialState(cpu=not torch.cuda.is_available())


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# accelerate's `PartialState` does the process control below. A single process (no process group)
# never builds one: PartialState() would pick a device before `TrainingArguments` does.


def is_main_process() -> bool:
    """Process 0, or the only process."""
    return not _initialized() or PartialState().is_main_process


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _initialized():
        PartialState().wait_for_everyone()


def same_on_all(value: Any) -> Any:
    """Process 0's `value` in every process (e.g. a run directory named after the clock)."""
    return broadcast_object_list([value], from_process=0)[0] if _initialized() else value


def all_true(flag: bool) -> bool:
    """Whether `flag` holds in every process."""
    return all(gather_object([bool(flag)])) if _initialized() else flag


def process_index_and_count() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) in a single process)."""
    if not _initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_gather(value: Any) -> list:
    """Every process's `value` (picklable), in rank order, in every process (`[value]` in a single one)."""
    if not _initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@contextmanager
def main_process_first() -> Iterator[None]:
    """Process 0 runs the block first, then each node's local process 0, then the others.

    For work that fills a cache: the later processes find it filled, on a shared file system (after
    process 0) or a node-local one (after their node's first process).
    """
    if not _initialized():
        yield
        return
    state = PartialState()
    with state.main_process_first(), state.local_main_process_first():
        yield


# -- DeepSpeed ------------------------------------------------------------------------------------


@contextmanager
def whole_models(args=None) -> Iterator[None]:
    """Models loaded in the block are whole, ordinary models, even while the run's ZeRO-3 `args`
    (`TrainingArguments`) exist.

    transformers loads every model under `deepspeed.zero.Init` (partitioned, with a collective per
    parameter) while a ZeRO-3 `TrainingArguments` is alive. A model used outside the engine (the base
    a LoRA adapter is merged into) or loaded by one process alone (the end-of-training eval on process
    0, while the others are not loading) must not be. transformers' public switch: unset the config,
    then set the run's back.
    """
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    hf = _hf_config(args) if args is not None else None
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf is not None:
            set_hf_deepspeed_config(hf)


def deepspeed_config(cfg: DeepSpeedConfig) -> dict | None:
    """The DeepSpeed config dict for `TrainingArguments.deepspeed` (a fresh copy), or None without
    DeepSpeed."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"deepspeed.path={cfg.path!r} is not a readable DeepSpeed JSON config ({err}); fix the "
                "path, or pick a built-in one with deepspeed=zero1|zero2|zero3|zero3_offload"
            ) from None
    return copy.deepcopy(cfg.config) if cfg.config else None


def fsdp_config(cfg: DistributedConfig) -> dict | None:
    """HF `TrainingArguments.fsdp_config` (a fresh copy) for `distributed=fsdp2`, or None without FSDP."""
    return copy.deepcopy(cfg.fsdp_config) if cfg.fsdp else None


def check(cfg: AlignConfig) -> None:
    """Refuse a DeepSpeed or FSDP setup that cannot work, before any model loads."""
    if cfg.deepspeed.enabled and cfg.distributed.fsdp:
        option = "deepspeed.path" if cfg.deepspeed.path else "deepspeed"
        raise ConfigError(
            f"distributed=fsdp2 and {option} both set an engine that shards the model, and a run has one; "
            "pick FSDP2 (deepspeed=none) or DeepSpeed (distributed=none)"
        )
    if cfg.distributed.fsdp and not launched_multiprocess():
        raise ConfigError(
            "distributed=fsdp2 shards the model across processes, and this run has one; start it under a "
            "launcher (torchrun --nproc_per_node N -m alignlab.cli train ...) or use distributed=none"
        )
    ds = deepspeed_config(cfg.deepspeed)
    if ds is None:
        return
    if "deepspeed" in cfg.trainer.extra:
        raise ConfigError(
            "trainer.extra.deepspeed and the deepspeed group both set a DeepSpeed config; remove "
            "trainer.extra.deepspeed and use deepspeed=<option> or deepspeed.path=<json>"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            "deepspeed is set but the deepspeed package is not installed: "
            "pip install 'alignlab[deepspeed]' (or use deepspeed=none)"
        ) from None
    if cfg.model.lora.load_in_4bit and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(
            "model.lora.load_in_4bit=true (QLoRA) with ZeRO-3 is not supported here; use deepspeed=zero2 "
            "(the 4-bit base is small) or model.lora.load_in_4bit=false"
        )


def check_loss_parameters(cfg: AlignConfig, loss) -> None:
    """Refuse DeepSpeed and FSDP2 for a loss that trains parameters of its own (known after `Loss.prepare`).

    ZeRO's optimizers only take parameters of the engine's model, and accelerate's FSDP2 swaps every
    optimizer parameter for its sharded model parameter, so e.g. SparsePO's learned mask heads cannot
    join them. (Under plain multi-process training they can: `average_gradients`.)
    """
    engine = "DeepSpeed's ZeRO" if cfg.deepspeed.enabled else "FSDP2's" if cfg.distributed.fsdp else None
    if engine and loss.param_groups():
        option = "deepspeed=none" if cfg.deepspeed.enabled else "distributed=none"
        raise ConfigError(
            f"loss {cfg.loss.name!r} trains parameters of its own (e.g. SparsePO's learned mask heads), "
            f"which {engine} optimizers cannot take; use {option} (torchrun still runs "
            "several processes, with DDP) or a variant without them (SparsePO: loss.mask=activation)"
        )


def average_gradients(params) -> None:
    """Average the gradients of parameters that no DDP wrapper syncs (the loss's own) over processes."""
    if not _initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.requires_grad:
            if p.grad is None:  # every process must join the collective
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _hf_config(args):
    """HF Trainer's DeepSpeed config object for these `TrainingArguments` (None without DeepSpeed)."""
    return getattr(args, "hf_deepspeed_config", None) if args.deepspeed else None


def prepare_frozen(model: nn.Module | None, args) -> nn.Module | None:
    """A frozen model (reference, teacher) ready for the run's engine; idempotent.

    Ours, not `trl.models.utils.prepare_deepspeed` (trl 1.16): TRL's writes the hidden-size settings as
    dotted top-level keys, which leaves a ZeRO-3 config's "auto" values unfilled, needs an
    `Accelerator`, and wraps a frozen model in a stage-0 engine without ZeRO-3.

    Under ZeRO-3 a DeepSpeed inference engine: parameters partitioned across processes (gathered
    module by module when it runs, including an output head called outside the model's forward,
    as the chunked logits do), eval mode, no optimizer. Otherwise the model on the run's device,
    in bf16/fp16 when DeepSpeed trains in it (DeepSpeed casts the policy itself). A view without
    parameters of its own (`alignlab.models.AdapterDisabled`) is returned as is: it runs the policy.
    """
    if model is None or _is_engine(model) or next(model.parameters(), None) is None:
        return model
    hf = _hf_config(args)
    if hf is None or not hf.is_zero3():
        dtype = hf.dtype() if hf is not None else None
        return model.to(device=args.device, dtype=dtype if dtype in (torch.bfloat16, torch.float16) else None)
    import deepspeed

    config = copy.deepcopy(hf.config)
    for block in ("optimizer", "scheduler"):  # inference: nothing to optimise or schedule
        config.pop(block, None)
    zero = config["zero_optimization"]
    zero.pop("offload_optimizer", None)
    hidden = getattr(model.config, "hidden_size", None) or max(getattr(model.config, "hidden_sizes", [0]))
    for key, value in _HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            if not hidden:
                raise ConfigError(
                    f"deepspeed: zero_optimization.{key}=auto needs the model's hidden_size, which "
                    f"{type(model).__name__}'s config lacks; "
                    f"set deepspeed.config.zero_optimization.{key}"
                )
            zero[key] = value(hidden)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def fsdp_on_cpu(accelerator, args) -> bool:
    """Make accelerate run the FSDP2 that `args` ask for on CPU processes (gloo); whether it had to.

    accelerate 1.15's `AcceleratorState` turns an FSDP plugin into `DistributedType.FSDP` only for
    accelerator devices (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...; `accelerate/state.py`, the branch that
    sets `self.fsdp_plugin`, lines 986-1016 in 1.15.0) and otherwise drops it: CPU processes would
    train with DDP, silently (HF Trainer reads `state.fsdp_plugin` for `is_fsdp_enabled`).
    PyTorch's `fully_shard` itself runs on a CPU device mesh over gloo, so this sets the state
    accelerate would have set on a GPU (distributed type and plugin); accelerate and HF Trainer then
    take their FSDP2 path unchanged (`fully_shard`, sharded optimizer, FSDP checkpoints).
    """
    from accelerate.state import AcceleratorState, DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin

    if args.fsdp_plugin_args is None or accelerator.state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState keeps it
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    return True


def fsdp_share(model: nn.Module) -> str | None:
    """This process's share of an FSDP2-sharded model, as a line (None for a model FSDP does not shard)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if not any(isinstance(p, DTensor) for p in params):
        return None
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    rank, count = process_index_and_count()
    return f"FSDP2: process {rank} of {count} holds {local:,} of the policy's {total:,} parameters"


def chunkable_head(head: nn.Module | None) -> nn.Module | None:
    """An output head that the chunked logits (`alignlab.chunked`) may call outside the model's forward.

    FSDP2 (accelerate) shards the head with the embeddings and final norm as one unit, whose
    parameters stay gathered from the model's forward until its backward; but calling that module
    again outside the forward re-runs FSDP's hooks out of order (a segmentation fault in the
    backward, torch 2.13). Such a head is called as a plain `linear` of its gathered weight.

    ZeRO-3 gathers a module's partitioned parameters in hooks around its forward, which serve a
    trainable head called chunk by chunk (recomputed in the backward) but not a frozen one (a LoRA
    policy's, a reference's): the recomputation sees the released, empty weight. Such a head is
    wrapped to gather its weight explicitly (`deepspeed.zero.GatheredParameters`) on every call.
    """
    weight = getattr(head, "weight", None)
    if isinstance(head, nn.Linear) and hasattr(weight, "ds_id") and not weight.requires_grad:
        return _GatheredFrozenHead(head)
    if isinstance(head, nn.Linear) and _is_fsdp_module(head):
        return _FsdpGatheredHead(head)
    return head


def _is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class _FsdpGatheredHead(nn.Module):
    """An FSDP2-sharded `nn.Linear` head, called without FSDP's hooks (see `chunkable_head`)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: FSDP owns it

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # between the model's forward and its backward the unit's parameters are the gathered ones; a
        # sharded DTensor here would fail loudly ("mixed torch.Tensor and DTensor"), not silently
        return nn.functional.linear(hidden, self.head.weight, self.head.bias)


class _GatheredFrozenHead(nn.Module):
    """A frozen, ZeRO-3-partitioned `nn.Linear` head, gathered for each call (see `chunkable_head`)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: the engine owns it

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.head.parameters())):
            # detached views keep the gathered storage for the backward after the block re-partitions
            bias = self.head.bias.detach() if self.head.bias is not None else None
            return nn.functional.linear(hidden, self.head.weight.detach(), bias)


def _is_engine(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def release(model: nn.Module | None) -> None:
    """Free what an engine made by `prepare_frozen` holds (no-op for a plain model)."""
    if model is not None and _is_engine(model):
        model.destroy()
