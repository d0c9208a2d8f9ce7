"""`alignlab train`: compose → validate → data → models → HF Trainer → save → summary."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab import checkpoints, distributed, losses
from alignlab.config import AlignConfig, TrainerConfig
from alignlab.errors import ConfigError, user_error_behind
from alignlab.losses.base import Needs, PrepareContext



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


def to_typed(cfg: DictConfig) -> AlignConfig:
    """Validate a composed config: every dataclass's `__post_init__` runs, the loss's included."""
    try:
        typed: AlignConfig = OmegaConf.to_object(cfg)
    except ValueError as err:  # a __post_init__ check, which names the field
        cause = user_error_behind(err)  # raised by a resolver, e.g. ${stage:NAME}
        if cause is not None:
            raise cause from None
        raise ConfigError(str(err).splitlines()[0]) from None
    return typed


def check_combination(cfg: AlignConfig, needs: Needs) -> None:
    """Refuse a config whose loss, model and data do not fit together, before any model loads."""
    from alignlab.data import check_data_needs

    if cfg.model.reference and not needs.reference:
        raise ConfigError(
            f"loss {cfg.loss.name!r} is reference-free, but model.reference={cfg.model.reference!r} is set; "
            "remove model.reference (it would never be used) or pick a loss that uses a reference"
        )
    if cfg.model.reference_mode == "precomputed":
        if not needs.reference:
            raise ConfigError(f"loss {cfg.loss.name!r} is reference-free: model.reference_mode=precomputed has no "
                              "reference to precompute; remove it")
        if needs.full_logits:
            raise ConfigError(
                f"loss {cfg.loss.name!r} needs the reference model's full-vocabulary logits at every step, which "
                "precomputed reference log-probs do not keep; set model.reference_mode=live")
    for name, path in needs.teachers:
        if not path or "${" in path:
            raise ConfigError(f"loss {cfg.loss.name!r} needs its {name!r} teacher: set it in the loss config "
                              f"(e.g. loss.{name}_teacher=<model dir>) or run the recipe that trains it")
    check_data_needs(cfg.data, needs.responses, needs.fields)
    from alignlab.models import check_lora

    check_lora(cfg.model, _has_accelerator())


def _precompute_reference(cfg: AlignConfig, reference, ctx: PrepareContext, collator, batch_size: int, device) -> None:
    """Replace ctx.train / ctx.eval with copies carrying the reference's per-token log-probs (cached)."""
    from alignlab.forward import Forward
    from alignlab.reference import model_identity, precompute

    quantized = cfg.model.lora.load_in_4bit and not cfg.model.reference  # the reference is the 4-bit base
    identity = model_identity(cfg.model.reference or cfg.model.name_or_path,
                              cfg.model.dtype + ("+nf4" if quantized else ""), cfg.seed)
    cache_dir = Path(cfg.data.cache_dir or Path.home() / ".cache" / "alignlab") / "reference"
    forward = Forward(cfg.model.logit_chunk_size, cfg.model.skip_unused_logits, cfg.model.padding_free,
                      cfg.model.prefix_sharing)
    score = partial(precompute, reference, collator=collator, forward=forward,
                    responses=collator.responses, identity=identity, batch_size=batch_size, device=device,
                    cache_dir=cache_dir)
    ctx.train = score(ctx.train)
    if ctx.eval is not None:
        ctx.eval = score(ctx.eval)


def training_arguments(t: TrainerConfig, output_dir: Path, seed: int, has_eval: bool, report_to: list[str],
                       deepspeed: dict | None = None):
    """HF `TrainingArguments` from `trainer.*`; `deepspeed` is a DeepSpeed config dict (its "auto"
    values are filled from these arguments by HF Trainer)."""
    from transformers import TrainingArguments

    known = {k: v for k, v in asdict(t).items() if k not in (
        "eval_steps", "save_steps", "resume_from_checkpoint", "resume_any_config", "overwrite_output_dir", "extra")}
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
        **t.extra,
    )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _setup_wandb(cfg, output_dir: Path) -> None:
    os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
    if cfg.logger.entity:
        os.environ.setdefault("WANDB_ENTITY", cfg.logger.entity)
    if cfg.logger.mode:
        os.environ["WANDB_MODE"] = cfg.logger.mode
    if cfg.logger.tags:
        os.environ.setdefault("WANDB_TAGS", ",".join(cfg.logger.tags))
    os.environ.setdefault("WANDB_DIR", str(output_dir))


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Train one composed config end to end; returns where everything went and the headline figures.

    The run holds its directory's lock throughout (`alignlab.rundir`); SIGTERM and Ctrl-C stop it at
    the end of a step with a checkpoint (`Interrupted`), and a failed write stops it in one line
    (`StorageError`).
    """
    from alignlab.rundir import INTERRUPTS

    with contextlib.ExitStack() as stack:
        INTERRUPTS.install()
        stack.callback(INTERRUPTS.uninstall)
        return _run(cfg, output_dir, stack)


def _run(cfg: DictConfig, output_dir: str | Path | None, stack: contextlib.ExitStack) -> RunResult:
    from alignlab.report import redact
    from alignlab.rundir import Identity, identity_config, new_run_id, resume_command, storage_error

    start = time.time()
    typed = to_typed(cfg)
    if typed.stages:  # a multi-stage config: its stages must have been trained (alignlab.stages)
        from alignlab.stages import require_finished

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
        from alignlab.errors import StoppedAtOnce

        raise StoppedAtOnce("stopped at once by a second Ctrl-C; resume from the last complete checkpoint with: "
                            f"{resume_command(output_dir)}") from None


def _claim(output_dir: Path, typed: AlignConfig, ours, loss_state: bool, main: bool, stack: contextlib.ExitStack):
    """Process 0 locks the run directory (for the run's lifetime) and decides what the run may do there
    (`alignlab.rundir.claim`); every process gets the decision, or the same error."""
    from alignlab.errors import RunStopped, UserError
    from alignlab.rundir import RunLock, claim

    decision = error = None
    if main:
        try:
            lock = RunLock(output_dir).acquire()
            stack.callback(lock.release)
            decision = claim(output_dir, typed.trainer.resume_from_checkpoint, ours,
                             overwrite=typed.trainer.overwrite_output_dir, any_config=typed.trainer.resume_any_config,
                             loss_state=loss_state)
        except (UserError, RunStopped) as err:
            error = err
    decision, error = distributed.same_on_all((decision, error))
    if error is not None:
        raise error
    return decision


def _train(cfg: DictConfig, typed: AlignConfig, output_dir: Path, claimed, loss_fn, main: bool,
           start: float) -> RunResult:
    from alignlab.data import PreferenceCollator, build_datasets
    from alignlab.models import load_frozen, load_policy, load_reference, load_tokenizer, save_merged
    from alignlab.reference import column as reference_column
    from alignlab.report import plot_curves
    from alignlab.rundir import INTERRUPTS, interrupted, take_over, write_record
    from alignlab.trainer import AlignTrainer, MetricsFileCallback

    needs = loss_fn.needs
    resume = claimed.resume
    tokenizer = load_tokenizer(typed.model)
    with distributed.main_process_first():  # one process fills the tokenized cache, the others read it
        data = build_datasets(typed.data, tokenizer, responses=needs.responses, seed=typed.seed, fields=needs.fields)
    if main:
        print(data.report.summary())

    policy = load_policy(typed.model, tokenizer, typed.seed)
    reference = load_reference(typed.model, policy, tokenizer, typed.seed) if needs.reference else None
    teachers = {name: load_frozen(path, typed.model, tokenizer, typed.seed) for name, path in needs.teachers}
    ctx = PrepareContext(reference=reference, tokenizer=tokenizer, train=data.train, eval=data.eval,
                         device=policy.device, seed=typed.seed, model=typed.model)
    loss_fn.prepare(ctx)
    distributed.check_loss_parameters(typed, loss_fn)

    if "wandb" in typed.logger.report_to:
        _setup_wandb(typed, output_dir)
    args = training_arguments(typed.trainer, output_dir, typed.seed, data.eval is not None, typed.logger.report_to,
                              distributed.deepspeed_config(typed.deepspeed))
    # on the device; under ZeRO-3 partitioned inference engines (models were loaded whole: the loss's
    # prepare() above may use the reference before any engine exists)
    reference = distributed.prepare_frozen(reference, args)
    teachers = {name: distributed.prepare_frozen(m, args) for name, m in teachers.items()}
    collator = PreferenceCollator(tokenizer.pad_token_id, responses=needs.responses,
                                  fields=(*needs.fields, *needs.prepared_fields))
    precomputed = needs.reference and typed.model.reference_mode == "precomputed"
    if precomputed:  # score the data once with the reference, then free it
        _precompute_reference(typed, reference, ctx, collator, args.per_device_eval_batch_size, args.device)
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
        logit_chunk_size=typed.model.logit_chunk_size,
        skip_unused_logits=typed.model.skip_unused_logits,
        padding_free=typed.model.padding_free,
        prefix_sharing=typed.model.prefix_sharing,
        identity=claimed.identity.to_dict(),
        callbacks=[MetricsFileCallback(metrics_file)],
    )
    trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step
    if INTERRUPTS.received is not None:
        if step < trainer.state.max_steps:  # a checkpoint was saved at the end of the step; not finished
            saved = output_dir / f"checkpoint-{step}"
            raise interrupted(output_dir, step, saved if (saved / checkpoints.COMPLETE).exists() else None)
        if main:
            print(f"alignlab: {INTERRUPTS.received} after the last step: finishing the final evaluation and save")
    eval_metrics = trainer.evaluate() if ctx.eval is not None else {}

    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))
    trainer.save_loss_state(model_dir)  # e.g. BCO's δ and UDM classifier, beside the final model
    if main:  # HF's pickled TrainingArguments: no pickles in a model others load; config.yaml has the settings
        (model_dir / "training_args.bin").unlink(missing_ok=True)
    merged_dir = output_dir / "model_merged" if typed.model.lora.merge_on_save else None
    if merged_dir is not None and main:
        save_merged(typed.model, tokenizer, typed.seed, model_dir, merged_dir)
    if trainer.is_world_process_zero():
        plot_curves(metrics_file, output_dir / "curves.png")
    train_losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]
    result = RunResult(output_dir, model_dir, metrics_file, train_losses, eval_metrics, time.time() - start,
                       merged_dir, typed.model.lora.enabled)
    if main:
        (output_dir / "summary.json").write_text(json.dumps(
            {"train_losses": train_losses, "eval": eval_metrics, "wall_seconds": result.wall_seconds,
             "model_dir": str(model_dir), "merged_model_dir": str(merged_dir) if merged_dir else None}, indent=2))
        write_record(output_dir, claimed.identity, "finished", step=step)
        print(summary_text(result))
        if typed.eval.generate:
            end_of_training_eval(typed, output_dir)
    distributed.barrier()  # the run's files are written before any process returns
    return result


def save_run_files(cfg: DictConfig, output_dir: Path) -> None:
    """`config.yaml` (the resolved config) and `environment.json` (versions, git revision, command
    line), credentials redacted (`report.redact`)."""
    from alignlab.report import environment, redact

    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    (output_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # Hydra's records of the command line
        path = output_dir / ".hydra" / name
        if path.exists():
            OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.load(path)))), path)


def end_of_training_eval(cfg: AlignConfig, output_dir: Path) -> dict:
    """`alignlab eval` on the finished run, as configured by `eval.*`; prints its headline figures."""
    from alignlab.evaluate import evaluate

    reward = cfg.eval.reward
    if reward == "auto":
        reward = "alignlab.builtin:sentiment_reward" if cfg.data.path == "builtin:sentiment" else None
    with distributed.outside_zero3():  # process 0 alone loads the models
        result = evaluate(output_dir, reward=reward, num_prompts=cfg.eval.num_prompts,
                          max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed)
    if result.get("num_prompts"):
        line = f"  eval: KL(policy||ref) {result['kl_policy_reference']:.3f} on {result['num_prompts']} prompts"
        if "win_rate" in result:
            line += (f", reward {result['reward_policy']:.3f} (reference {result['reward_reference']:.3f}), "
                     f"win rate {result['win_rate']:.3f}")
        print(line + f"; {output_dir / 'eval' / 'report.md'}")
    return result


#: eval figures worth a line in the end-of-run summary, when the loss logs them.
HEADLINE = {
    "eval_rewards/accuracies": "held-out accuracy {:.3f} (chance 0.5)",
    "eval_rewards/margins": "held-out margin   {:.3f}",
    "eval_delta": "reward shift δ    {:.4f}",
    "eval_forget/logps": "forget log-lik.   {:.3f}",
    "eval_retain/nll": "retain NLL        {:.3f}",
}


def summary_text(result: RunResult) -> str:
    lines = ["", "alignlab: run finished in %.0f s" % result.wall_seconds]
    if result.train_losses:
        lines.append(f"  train loss        {result.train_losses[0]:.4f} (first log) -> {result.train_losses[-1]:.4f} (last)")
    lines += [f"  {text.format(result.eval_metrics[key])}" for key, text in HEADLINE.items()
              if key in result.eval_metrics]
    lines.append(f"  {'adapter' if result.adapter else 'model'} + tokenizer {result.model_dir}")
    if result.merged_dir is not None:
        lines.append(f"  merged model      {result.merged_dir}")
    lines += [f"  metrics           {result.metrics_file} (curves: {result.output_dir / 'curves.png'})",
              f"  run directory     {result.output_dir}"]
    return "\n".join(lines)


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("no output directory: pass output_dir=... when calling alignlab.train.run outside the CLI")
    return HydraConfig.get().runtime.output_dir
