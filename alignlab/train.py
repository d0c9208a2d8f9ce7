"""`alignlab train`: compose → validate → data → models → HF Trainer → save → summary."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab import checkpoints, distributed, losses, models  # models.X: looked up at each call
from alignlab.builtin import task_reward
from alignlab.config import TRL_NAMES, AlignConfig, ModelConfig, TrainerConfig, to_typed
from alignlab.data import PreferenceCollator, build_datasets, check_data_needs
from alignlab.errors import ConfigError, RunStopped, StoppedAtOnce, UserError, first_line
from alignlab.evaluate import evaluate
from alignlab.forward import ForwardPlan
from alignlab.losses.base import PAIRWISE_HEADLINE, STANDARD_CURVES, Needs, PrepareContext
from alignlab.reference import column as reference_column
from alignlab.reference import model_identity, precompute
from alignlab.report import environment, plot_curves, redact
from alignlab.rundir import (
    INTERRUPTS,
    Identity,
    RunLock,
    claim,
    identity_config,
    interrupted,
    new_run_id,
    resume_command,
    storage_error,
    take_over,
    write_record,
)
from alignlab.scorers import add_scores, prompt_embedder
from alignlab.stages import ERROR_LOG, RESOLVER, Stage, StageError, plan, require_finished, used_stages


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    metrics_file: Path
    train_losses: list[float]
    eval_metrics: dict[str, float]
    wall_seconds: float
    #: `model_merged/` (the LoRA adapter merged into the base), when `model.lora.merge_on_save`.
    merged_dir: Path | None = None
    #: `model_dir` holds a LoRA adapter (peft) rather than full weights.
    adapter: bool = False
    #: lines about the run's figures, e.g. held-out accuracy falling while training accuracy rises.
    warnings: list[str] = field(default_factory=list)
    #: the loss's headline eval figures (`Loss.headline`): eval metric key -> summary line format.
    headline: dict[str, str] = field(default_factory=lambda: dict(PAIRWISE_HEADLINE))


def check_combination(cfg: AlignConfig, needs: Needs) -> None:
    """Refuse a config whose loss, model and data do not fit together, before any model loads."""

    if cfg.model.reference and not needs.reference:
        raise ConfigError(
            f"loss {cfg.loss.name!r} is reference-free, but model.reference={cfg.model.reference!r} is set; "
            "remove model.reference (it would never be used) or pick a loss that uses a reference"
        )
    check_forward(cfg.loss.name, cfg.model, needs)
    check_reference_sync(cfg, needs)
    for name, path in needs.teachers:
        if not path or "${" in path:
            raise ConfigError(
                f"loss {cfg.loss.name!r} needs its {name!r} teacher: set it in the loss config "
                f"(e.g. loss.{name}_teacher=<model dir>) or run the recipe that trains it"
            )
    check_data_needs(cfg.data, **needs.data_shape())
    models.check_model_folder(cfg.model.name_or_path)
    if cfg.model.reference:
        models.check_model_folder(cfg.model.reference, "model.reference")
    if (
        cfg.model.tokenizer
        and not Path(cfg.model.tokenizer).expanduser().exists()
        and cfg.model.tokenizer.startswith(("/", "./", "../", "~"))
    ):
        raise ConfigError(
            f"model.tokenizer={cfg.model.tokenizer!r} does not exist (relative paths start at "
            f"{Path.cwd()}). Fix: point it at a tokenizer folder, or leave it unset"
        )
    models.check_lora(cfg.model, _has_accelerator())
    if cfg.model.chat_template:
        models.chat_template(cfg.model.chat_template)  # a wrong name or path fails now, not after loading
    check_trainer(cfg.trainer)


def check_reference_sync(cfg: AlignConfig, needs: Needs) -> None:
    """Refuse TR-DPO's reference update (`model.reference_sync`) where there is no reference model to
    update in place: a reference-free loss, precomputed log-probs, LoRA's adapter-disabled policy, ZeRO-3
    and FSDP2 (a sharded policy)."""
    if not cfg.model.reference_sync.enabled:
        return
    off = "or model.reference_sync.enabled=false"
    if not needs.reference:
        raise ConfigError(
            f"model.reference_sync.enabled=true updates the reference, but loss {cfg.loss.name!r} is "
            f"reference-free (it has none). Fix: a loss with a reference (e.g. loss=dpo), {off}"
        )
    if cfg.model.reference_mode == "precomputed":
        raise ConfigError(
            "model.reference_sync.enabled=true with model.reference_mode=precomputed: the reference's "
            "log-probs are computed once before training and would be stale after the first update. "
            f"Fix: model.reference_mode=live, {off}"
        )
    if cfg.model.lora.enabled:
        raise ConfigError(
            "model.reference_sync.enabled=true with model.lora.enabled=true: the reference is the "
            "policy with its adapters disabled (or a model the adapter policy does not match parameter "
            f"by parameter), which cannot be mixed with the policy. Fix: model.lora.enabled=false, {off}"
        )
    steps = cfg.trainer.max_steps  # a run of epochs is checked when its step count is known (trainer)
    if 0 < steps <= cfg.model.reference_sync.every:
        raise ConfigError(
            f"model.reference_sync.every={cfg.model.reference_sync.every} is not below the run's "
            f"trainer.max_steps={steps}: the reference would never be updated before training ends. "
            f"Fix: set model.reference_sync.every below {steps}, {off}"
        )
    ds = distributed.deepspeed_config(cfg.deepspeed) or {}
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(
            "model.reference_sync.enabled=true with DeepSpeed ZeRO-3 is not supported (policy and "
            "reference are partitioned across processes and would have to be gathered for each "
            f"update). Fix: deepspeed=zero2 (or zero1, or none), {off}"
        )
    if cfg.distributed.fsdp:
        raise ConfigError(
            "model.reference_sync.enabled=true with distributed=fsdp2 is not supported (the policy is "
            "sharded across processes and would have to be gathered for each update). Fix: "
            f"distributed=none (DDP) or deepspeed=zero2, {off}"
        )


def check_trainer(trainer: TrainerConfig) -> None:
    """What HF Trainer would refuse only after the models loaded: an unknown `trainer.optim` or
    `trainer.lr_scheduler_type`, an 8-bit optimizer without bitsandbytes, and a `trainer.extra.NAME`
    that is no `TrainingArguments` field (TRL's names are pointed to their alignlab keys; the config
    refuses the fields alignlab sets itself)."""
    import difflib
    import importlib.util
    from dataclasses import fields

    from transformers import SchedulerType, TrainingArguments
    from transformers.training_args import OptimizerNames

    for name, value, options in (
        ("optim", trainer.optim, [o.value for o in OptimizerNames]),
        ("lr_scheduler_type", trainer.lr_scheduler_type, [o.value for o in SchedulerType]),
    ):
        if value not in options:
            near = difflib.get_close_matches(value, options, n=1)
            hint = f" Did you mean trainer.{name}={near[0]}?" if near else ""
            raise ConfigError(
                f"trainer.{name}={value!r} is not one of transformers' options.{hint} Options: "
                f"{', '.join(options)}"
            )
    if ("8bit" in trainer.optim or "bnb" in trainer.optim) and importlib.util.find_spec(
        "bitsandbytes"
    ) is None:
        raise ConfigError(
            f"trainer.optim={trainer.optim} needs bitsandbytes: pip install bitsandbytes (or use "
            "trainer.optim=adamw_torch)"
        )

    known = [f.name for f in fields(TrainingArguments) if f.init]
    for name in sorted(trainer.extra):
        if name in TRL_NAMES:
            raise ConfigError(
                f"trainer.extra.{name}: {name} is TRL's (or transformers') name; in alignlab it is "
                f"{TRL_NAMES[name]} (docs/from_trl.md)"
            )
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            own = {f.name for f in fields(TrainerConfig)}
            hint = (
                f" Did you mean trainer.{'' if near and near[0] in own else 'extra.'}{near[0]}?"
                if near
                else ""
            )
            raise ConfigError(
                f"trainer.extra.{name}: transformers.TrainingArguments has no field {name!r}.{hint} "
                "Fix: remove it or correct the name"
            )


def vocabulary_warning(train, tokenizer, model, path: str, rows: int = 1000) -> str | None:
    """A warning line when the tokenizer cannot read most of the data (over half its tokens unknown, in
    the first `rows` train rows), e.g. your own data with the builtin model, which knows only the
    builtin task's words."""
    unk = tokenizer.unk_token_id
    if unk is None:  # byte-level tokenizers read any text
        return None
    columns = [c for c in train.column_names if c.endswith("_ids")]
    sample = train.select(range(min(rows, len(train))))
    ids = [i for column in columns for row in sample[column] for i in row]
    share = sum(i == unk for i in ids) / max(len(ids), 1)
    if share > 0.5:
        name = model.tokenizer or model.name_or_path
        known = " (it knows only the words of builtin:sentiment)" if name.startswith("builtin:") else ""
        return (
            f"  warning: {share:.0%} of the tokens of data.path={path} are unknown to the tokenizer "
            f"of {name}{known}. "
            "Fix: set model.name_or_path to a model for this data (and model.tokenizer if it is separate)"
        )
    return None


def forward_plan(loss_name: str, model: ModelConfig, needs: Needs):
    """The run's `alignlab.forward.ForwardPlan` from the loss's needs and the `model.*` switches; refuses
    (`ConfigError`) settings that cannot give the loss what it needs, before any model loads."""
    return ForwardPlan.of(
        needs,
        logit_chunk_size=model.logit_chunk_size,
        skip_unused_logits=model.skip_unused_logits,
        padding_free=model.padding_free,
        prefix_sharing=model.prefix_sharing,
        drop_padding_mask=model.drop_padding_mask,
        reference_mode=model.reference_mode,
        loss_name=loss_name,
    )


def check_forward(loss_name: str, model: ModelConfig, needs: Needs) -> None:
    """Refuse `model.*` forward settings that cannot give the loss what it needs (`forward_plan`)."""
    forward_plan(loss_name, model, needs)


def _precompute_reference(
    cfg: AlignConfig, reference, ctx: PrepareContext, collator, plan, batch_size: int, device
) -> None:
    """Replace ctx.train / ctx.eval with copies carrying the reference's per-token log-probs (cached),
    computed through the run's forward `plan`."""
    quantized = cfg.model.lora.load_in_4bit and not cfg.model.reference  # the reference is the 4-bit base
    identity = model_identity(
        cfg.model.reference or cfg.model.name_or_path,
        cfg.model.dtype + ("+nf4" if quantized else ""),
        cfg.seed,
    )
    cache_dir = Path(cfg.data.cache_dir or Path.home() / ".cache" / "alignlab") / "reference"
    score = partial(
        precompute,
        reference,
        collator=collator,
        plan=plan,
        responses=collator.responses,
        identity=identity,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
    )
    ctx.train = score(ctx.train)
    if ctx.eval is not None:
        ctx.eval = score(ctx.eval)


def training_arguments(
    t: TrainerConfig,
    output_dir: Path,
    seed: int,
    has_eval: bool,
    report_to: list[str],
    deepspeed: dict | None = None,
    fsdp: dict | None = None,
):
    """HF `TrainingArguments` from `trainer.*`; `deepspeed` is a DeepSpeed config dict (its "auto"
    values are filled from these arguments by HF Trainer), `fsdp` an FSDP2 `fsdp_config` dict."""
    from transformers import TrainingArguments

    known = {
        k: v
        for k, v in asdict(t).items()
        if k
        not in (
            "eval_steps",
            "save_steps",
            "resume_from_checkpoint",
            "resume_any_config",
            "overwrite_output_dir",
            "extra",
        )
    }
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
            **known,
            eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
            eval_steps=t.eval_steps or None,
            save_strategy="steps" if t.save_steps > 0 else "no",
            save_steps=t.save_steps or 500,
            seed=seed,
            report_to=report_to or "none",
            run_name=output_dir.name,
            remove_unused_columns=False,  # the collator needs prompt_ids / <response>_ids
            label_names=[],
            use_cpu=not _has_accelerator(),
            deepspeed=deepspeed,
            fsdp=True if fsdp is not None else None,
            fsdp_config=fsdp,
            **t.extra,
        )
    except (ValueError, TypeError) as err:  # a value TrainingArguments refuses, e.g. in trainer.extra
        raise ConfigError(
            f"trainer: transformers.TrainingArguments refused the settings: {first_line(err)}"
        ) from None


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


#: the WANDB_DIR alignlab set (the run directory of the last run in this process), not the user's.
_wandb_dir: str | None = None


def _setup_wandb(cfg, raw: DictConfig, output_dir: Path) -> None:
    """Start the W&B run on the main process, with alignlab's resolved config (credentials redacted) under
    `alignlab` and the run's group (`logger.group`, else the sweep's directory for a member of a sweep);
    HF's WandbCallback then logs into it and adds the `TrainingArguments`."""
    os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
    if cfg.logger.entity:
        os.environ.setdefault("WANDB_ENTITY", cfg.logger.entity)
    if cfg.logger.mode:
        os.environ["WANDB_MODE"] = cfg.logger.mode
    if cfg.logger.tags:
        os.environ.setdefault("WANDB_TAGS", ",".join(cfg.logger.tags))
    global _wandb_dir
    if os.environ.get("WANDB_DIR") in (None, _wandb_dir):  # the user's own WANDB_DIR is kept
        _wandb_dir = os.environ["WANDB_DIR"] = str(output_dir)
    if not distributed.is_main_process():
        return
    import wandb

    if wandb.run is not None:  # left open by an earlier run in this process (a stage, a sweep member)
        wandb.finish()
    wandb.init(
        project=os.environ["WANDB_PROJECT"],
        name=output_dir.name,
        group=cfg.logger.group or sweep_dir(),
        dir=os.environ["WANDB_DIR"],  # W&B reads $WANDB_DIR once per process; each run has its own
        config={"alignlab": redact(absolute_paths(OmegaConf.to_container(raw, resolve=True)))},
    )


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def sweep_dir() -> str | None:
    """The sweep's directory when this run is a member of a Hydra sweep (`alignlab train -m`), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().sweep.dir)
    return None


def run_stages(cfg: DictConfig) -> list[Stage]:
    """Train the unfinished stages of `cfg` in order, reusing finished ones; nothing without stages
    (planned by `alignlab.stages.plan`).

    Raises:
        StageError: a stage failed. Its traceback is in ``<directory>/error.log``.
    """
    stages = plan(cfg)
    used = used_stages(cfg)
    for stage in stages:
        if stage.name not in used:
            print(
                f"stage {stage.name}: not used by this run (nothing refers to "
                f"${{{RESOLVER}:{stage.name}}}); skipped"
            )
    stages = [stage for stage in stages if stage.name in used]
    for done, stage in enumerate(stages):
        if stage.finished:
            print(f"stage {stage.name}: reusing {stage.directory}")
            continue
        resuming = (
            " (resuming from its last checkpoint)" if stage.config.trainer.resume_from_checkpoint else ""
        )
        print(f"stage {stage.name}: training in {stage.directory}{resuming}")
        try:
            run(stage.config, output_dir=stage.directory)
        except RunStopped:  # SIGTERM, NaN, a full disk: already one line, with its own exit code
            raise
        except Exception as err:
            stage.directory.mkdir(parents=True, exist_ok=True)
            (stage.directory / ERROR_LOG).write_text(traceback.format_exc())
            finished = ", ".join(s.name for s in stages[:done]) or "none"
            raise StageError(
                f"stage {stage.name!r} failed in {stage.directory}: {type(err).__name__}: {first_line(err)} "
                f"(traceback in {ERROR_LOG} there). Rerunning reuses the finished stages ({finished})"
            ) from err
    return stages


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Train one composed config end to end; returns where everything went and the headline figures.

    The run holds its directory's lock throughout (`alignlab.rundir`); SIGTERM and Ctrl-C stop it at
    the end of a step with a checkpoint (`Interrupted`), and a failed write stops it in one line
    (`StorageError`).
    """
    with contextlib.ExitStack() as stack:
        INTERRUPTS.install()
        stack.callback(INTERRUPTS.uninstall)
        return _run(cfg, output_dir, stack)


def _run(cfg: DictConfig, output_dir: str | Path | None, stack: contextlib.ExitStack) -> RunResult:
    start = time.time()
    typed = to_typed(cfg)
    if typed.stages:  # a multi-stage config: its stages must have been trained (alignlab.stages)
        require_finished(cfg)
    distributed.init_processes()  # under torchrun / the deepspeed launcher: every process runs this
    # one run directory for all processes (Hydra's default is named after each process's clock)
    output_dir = Path(output_dir or typed.output_dir or _hydra_output_dir()).resolve()
    output_dir = Path(distributed.same_on_all(str(output_dir)))
    main = distributed.is_main_process()  # writes the run's files and prints; HF Trainer does the same
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, output_dir, "create the run directory") or err from None

    from transformers import set_seed

    set_seed(typed.seed)
    loss_fn = losses.build(typed.loss)
    needs = loss_fn.needs
    check_combination(typed, needs)  # config vs data vs needs, before anything heavy loads
    distributed.check(typed)
    ours = Identity(new_run_id(), identity_config(redact(OmegaConf.to_container(cfg, resolve=True))))
    claimed = _claim(output_dir, typed, ours, bool(loss_fn.state_dict()), main, stack)
    try:
        return _train(cfg, typed, output_dir, claimed, loss_fn, main, start)
    except OSError as err:  # a write into the run directory: one line, not a traceback
        error = storage_error(err, output_dir, "write", resume=resume_command(output_dir))
        if error is None:
            raise
        raise error from None
    except KeyboardInterrupt:  # the second Ctrl-C (alignlab.rundir.Interrupts)
        raise StoppedAtOnce(
            "stopped at once by a second Ctrl-C; resume from the last complete checkpoint with: "
            f"{resume_command(output_dir)}"
        ) from None


def _claim(
    output_dir: Path, typed: AlignConfig, ours, loss_state: bool, main: bool, stack: contextlib.ExitStack
):
    """Process 0 locks the run directory (for the run's lifetime) and decides what the run may do there
    (`alignlab.rundir.claim`); every process gets the decision, or the same error."""
    decision = error = None
    if main:
        try:
            lock = RunLock(output_dir).acquire()
            stack.callback(lock.release)
            decision = claim(
                output_dir,
                typed.trainer.resume_from_checkpoint,
                ours,
                overwrite=typed.trainer.overwrite_output_dir,
                any_config=typed.trainer.resume_any_config,
                loss_state=loss_state,
            )
        except (UserError, RunStopped) as err:
            error = err
    decision, error = distributed.same_on_all((decision, error))
    if error is not None:
        raise error
    return decision


def _train(
    cfg: DictConfig, typed: AlignConfig, output_dir: Path, claimed, loss_fn, main: bool, start: float
) -> RunResult:
    from alignlab.trainer import AlignTrainer, MetricsFileCallback  # deferred: it imports transformers

    needs = loss_fn.needs
    resume = claimed.resume
    tokenizer = models.load_tokenizer(typed.model)
    with distributed.main_process_first():  # one process fills the tokenized cache, the others read it
        data = build_datasets(typed.data, tokenizer, seed=typed.seed, **needs.data_shape())
    if main:
        print(data.report.summary())
        unknown = vocabulary_warning(data.train, tokenizer, typed.model, typed.data.path)
        if unknown:
            print(unknown)

    policy = models.load_policy(typed.model, tokenizer, typed.seed)
    reference = models.load_reference(typed.model, policy, tokenizer, typed.seed) if needs.reference else None
    teachers = {
        name: models.load_frozen(path, typed.model, tokenizer, typed.seed) for name, path in needs.teachers
    }
    ctx = PrepareContext(
        reference=reference,
        tokenizer=tokenizer,
        train=data.train,
        eval=data.eval,
        device=policy.device,
        seed=typed.seed,
        model=typed.model,
        architecture=policy.config,
        embed_prompts=None
        if reference is None
        else prompt_embedder(reference, tokenizer.pad_token_id, policy.device),
    )
    add_scores(needs, ctx)  # scores of other frozen models the loss declared (MODPO's margins)
    loss_fn.prepare(ctx)
    distributed.check_loss_parameters(typed, loss_fn)

    use_wandb = "wandb" in typed.logger.report_to
    if use_wandb:
        _setup_wandb(typed, cfg, output_dir)
    args = training_arguments(
        typed.trainer,
        output_dir,
        typed.seed,
        data.eval is not None,
        typed.logger.report_to,
        distributed.deepspeed_config(typed.deepspeed),
        distributed.fsdp_config(typed.distributed),
    )
    # on the device; under ZeRO-3 partitioned inference engines (models were loaded whole: the loss's
    # prepare() above may use the reference before any engine exists)
    reference = distributed.prepare_frozen(reference, args)
    teachers = {name: distributed.prepare_frozen(m, args) for name, m in teachers.items()}
    collator = PreferenceCollator(
        tokenizer.pad_token_id, responses=needs.responses, fields=needs.batch_fields
    )
    plan = forward_plan(typed.loss.name, typed.model, needs)  # the forward pass, decided once for the run
    precomputed = needs.reference and typed.model.reference_mode == "precomputed"
    if precomputed:  # score the data once with the reference, then free it
        _precompute_reference(
            typed, reference, ctx, collator, plan, args.per_device_eval_batch_size, args.device
        )
        distributed.release(reference)
        reference = None
        collator.sequences = tuple(reference_column(r) for r in needs.responses)
    if INTERRUPTS.received is not None:  # before anything of the directory changed
        raise interrupted(output_dir, None, None)
    metrics_file = output_dir / "metrics.jsonl"
    if main:  # validated, and the directory is ours: now what an earlier run left may change
        take_over(output_dir, claimed)
        save_run_files(cfg, output_dir)  # first, so that a run stopped early (SIGTERM, NaN, a crash) has them
        (output_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2))
        write_record(output_dir, claimed.identity, "running")
    distributed.barrier()
    trainer = AlignTrainer(
        model=policy,
        args=args,
        train_dataset=ctx.train,
        eval_dataset=ctx.eval,
        data_collator=collator,
        processing_class=tokenizer,
        loss_fn=loss_fn,
        reference=reference,
        precomputed_reference=precomputed,
        teachers=teachers,
        forward_plan=plan,
        identity=claimed.identity.to_dict(),
        reference_sync=typed.model.reference_sync,
        callbacks=[MetricsFileCallback(metrics_file)],
    )
    trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step
    if INTERRUPTS.received is not None:
        if step < trainer.state.max_steps:  # a checkpoint was saved at the end of the step; not finished
            saved = output_dir / f"checkpoint-{step}"
            raise interrupted(output_dir, step, saved if (saved / checkpoints.COMPLETE).exists() else None)
        if main:
            print(
                f"alignlab: {INTERRUPTS.received} after the last step: "
                "finishing the final evaluation and save"
            )
    eval_metrics = trainer.evaluate() if ctx.eval is not None else {}

    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))
    trainer.save_loss_state(model_dir)  # e.g. BCO's δ and UDM classifier, beside the final model
    if (
        main
    ):  # HF's pickled TrainingArguments: no pickles in a model others load; config.yaml has the settings
        (model_dir / "training_args.bin").unlink(missing_ok=True)
    merged_dir = output_dir / "model_merged" if typed.model.lora.merge_on_save else None
    if merged_dir is not None and main:
        models.save_merged(typed.model, tokenizer, typed.seed, model_dir, merged_dir, trainer.args)
    if trainer.is_world_process_zero():
        plot_curves(metrics_file, output_dir / "curves.png", (*STANDARD_CURVES, *loss_fn.curves))
    train_losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]
    result = RunResult(
        output_dir,
        model_dir,
        metrics_file,
        train_losses,
        eval_metrics,
        time.time() - start,
        merged_dir,
        typed.model.lora.enabled,
        divergence_warnings(trainer.state.log_history),
        dict(loss_fn.headline),
    )
    if main:
        (output_dir / "summary.json").write_text(
            json.dumps(
                {
                    "train_losses": train_losses,
                    "eval": eval_metrics,
                    "wall_seconds": result.wall_seconds,
                    "model_dir": str(model_dir),
                    "merged_model_dir": str(merged_dir) if merged_dir else None,
                    "warnings": result.warnings,
                },
                indent=2,
            )
        )
        write_record(output_dir, claimed.identity, "finished", step=step)
        print(summary_text(result))
        if typed.eval.generate:
            end_of_training_eval(typed, output_dir, trainer.args)
        if use_wandb:
            _finish_wandb()
    distributed.barrier()  # the run's files are written before any process returns
    return result


def save_run_files(cfg: DictConfig, output_dir: Path) -> None:
    """`config.yaml` (the resolved config) and `environment.json` (versions, git revision, command
    line), credentials redacted (`report.redact`)."""
    resolved = redact(absolute_paths(OmegaConf.to_container(cfg, resolve=True)))
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    (output_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # Hydra's records of the command line
        path = output_dir / ".hydra" / name
        if path.exists():
            OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.load(path)))), path)


#: settings naming local files or folders; a saved config stores them absolute (`absolute_paths`).
PATH_KEYS = {
    "model": ("name_or_path", "tokenizer", "reference"),
    "data": ("path", "eval_path", "retain", "cache_dir"),
    "deepspeed": ("path",),
}


def absolute_paths(content: dict) -> dict:
    """`content` (a resolved config) with every relative path to an existing file or folder made absolute:
    the `PATH_KEYS` and any string of the loss config (teachers, margin models), so that `alignlab eval
    RUN_DIR` works from any directory. Hub names and builtin sources are left as they are."""

    def fix(value):
        if isinstance(value, str) and value and not value.startswith("builtin:") and Path(value).exists():
            return str(Path(value).resolve())
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    content = dict(content)
    for group, keys in PATH_KEYS.items():
        if isinstance(content.get(group), dict):
            content[group] = {k: fix(v) if k in keys else v for k, v in content[group].items()}
    if isinstance(content.get("loss"), dict):
        content["loss"] = fix(content["loss"])
    return content


def end_of_training_eval(cfg: AlignConfig, output_dir: Path, args=None) -> dict:
    """`alignlab eval` on the finished run, as configured by `eval.*`; prints its headline figures
    (`args`: the run's `TrainingArguments`, whose ZeRO-3 setting the eval's models are loaded outside of)."""
    reward = cfg.eval.reward
    if reward == "auto":
        reward = task_reward(cfg.data.path)  # the builtin task's own (builtin.DATASETS), else none
    with distributed.whole_models(args):  # process 0 alone loads the models
        result = evaluate(
            output_dir,
            reward=reward,
            num_prompts=cfg.eval.num_prompts,
            max_new_tokens=cfg.eval.max_new_tokens,
            seed=cfg.seed,
        )
    if result.get("num_prompts"):
        line = (
            f"  eval: KL(policy||ref) {result['kl_policy_reference']:.3f} on {result['num_prompts']} prompts"
        )
        if "win_rate" in result:
            line += (
                f", reward {result['reward_policy']:.3f} (reference {result['reward_reference']:.3f}), "
                f"win rate {result['win_rate']:.3f}"
            )
        print(line + f"; {result['report']}")
    return result


#: (training key, held-out key, what it is, higher is better, the change that counts as a move).
DIVERGENCE = (
    ("rewards/accuracies", "eval_rewards/accuracies", "accuracy", True, 0.02),
    ("loss", "eval_loss", "loss", False, 0.02),
)


def divergence_warnings(history: list[dict]) -> list[str]:
    """A line for each figure whose held-out value moved the wrong way between the first and the last
    evaluation while its training value moved the right way (e.g. held-out accuracy falls while
    training accuracy rises): the policy fits the training pairs at the expense of unseen ones.

    Args:
        history: HF `TrainerState.log_history`: training records (`loss`, ...) and evaluations
            (`eval_loss`, ...), each with its `step`.
    """
    lines = []
    for train_key, eval_key, name, higher, moved in DIVERGENCE:
        evals = [(r["step"], r[eval_key]) for r in history if eval_key in r]
        trains = [(r["step"], r[train_key]) for r in history if train_key in r and eval_key not in r]
        if len(evals) < 2 or evals[-1][0] <= evals[0][0]:
            continue
        (s0, e0), (s1, e1) = evals[0], evals[-1]
        before, after = [v for s, v in trains if s <= s0], [v for s, v in trains if s <= s1]
        if not before:
            continue
        t0, t1 = before[-1], after[-1]
        better = 1 if higher else -1
        if better * (e1 - e0) < -moved and better * (t1 - t0) > moved:
            lines.append(
                f"held-out {name} went from {e0:.3f} (step {s0}) to {e1:.3f} (step {s1}) while training "
                f"{name} went from {t0:.3f} to {t1:.3f}: the policy is fitting the training pairs at the "
                "expense of unseen ones; consider fewer steps, a larger loss.beta or more data"
            )
    return lines


def summary_text(result: RunResult) -> str:
    lines = ["", "alignlab: run finished in %.0f s" % result.wall_seconds]
    if result.train_losses:
        lines.append(
            f"  train loss        {result.train_losses[0]:.4f} (first log) "
            f"-> {result.train_losses[-1]:.4f} (last)"
        )
    lines += [
        f"  {text.format(result.eval_metrics[key])}"
        for key, text in result.headline.items()
        if key in result.eval_metrics
    ]
    lines.append(f"  {'adapter' if result.adapter else 'model'} + tokenizer {result.model_dir}")
    if result.merged_dir is not None:
        lines.append(f"  merged model      {result.merged_dir}")
    lines += [
        f"  metrics           {result.metrics_file} (curves: {result.output_dir / 'curves.png'})",
        f"  run directory     {result.output_dir}",
    ]
    lines += [f"alignlab: warning: {warning}" for warning in result.warnings]
    return "\n".join(lines)


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError(
            "no output directory: pass output_dir=... when calling alignlab.train.run outside the CLI"
        )
    return HydraConfig.get().runtime.output_dir
