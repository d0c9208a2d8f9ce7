"""Typed configuration: the dataclass schemas Hydra composes into (registered by `alignlab.compose`).

`configs/` holds the building blocks (groups model, data, trainer, deepspeed, distributed, logger; the
loss group comes from the loss registry's dataclasses) and `recipes/` holds complete experiments selected with
`+recipe=NAME`. Every YAML is merged into these schemas, so an unknown key, a wrong type or an
unknown option fails at compose time with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from alignlab.errors import ConfigError, user_error_behind

BAD_ROW_POLICIES = ("error", "skip")
PROMPT_TRUNCATION = ("error", "keep_end", "keep_start")
FORMATS = ("auto", "explicit", "conversational", "hh", "columns")
REFERENCE_MODES = ("live", "precomputed")
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: other spellings of `DTYPES` that users bring (TrainingArguments' bf16/fp16, torch's half, ...).
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "torch.bfloat16": "bfloat16",
    "torch.float16": "float16",
    "torch.float32": "float32",
}


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (`model.lora.*`, peft); the names follow TRL's and peft's.

    With an adapter the reference is the policy with its adapters disabled, never a second copy
    (unless `model.reference` names a separate model). The final `model/` holds the adapter.
    """

    #: train LoRA adapters instead of every weight.
    enabled: bool = False
    #: adapter rank.
    r: int = 16
    #: scaling numerator: the update is (alpha / r) · B A.
    alpha: float = 32.0
    #: dropout on the adapter's input (the base model's own dropout follows model.disable_dropout).
    dropout: float = 0.05
    #: modules to adapt: "all-linear" (every linear layer but the output head), or a list of module
    #: names such as [q_proj, v_proj], or a regex (peft's `target_modules`).
    target_modules: Any = "all-linear"
    #: also write `model_merged/`: the adapter merged into the base weights, a plain transformers model.
    merge_on_save: bool = False
    #: QLoRA: load the base model in 4-bit NF4 (bitsandbytes; needs a CUDA GPU).
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise ValueError(
                "model.lora.target_modules must be all-linear, a module name regex, or a list of "
                f"module names such as [q_proj,v_proj]; got {targets!r}"
            )
        if not self.enabled and (self.merge_on_save or self.load_in_4bit):
            option = "merge_on_save" if self.merge_on_save else "load_in_4bit"
            raise ValueError(f"model.lora.{option}=true needs an adapter: set model.lora.enabled=true")


@dataclass
class ReferenceSyncConfig:
    """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv:2404.09656), for any loss with a
    reference: after every `every`-th optimizer step θ_ref ← α·θ + (1 − α)·θ_ref, parameter by
    parameter; α = 1 is the paper's hard update (a copy of the policy). TRL's `sync_ref_model`,
    `ref_model_mixup_alpha`, `ref_model_sync_steps`, with TRL's defaults. docs/losses.md, "TR-DPO".
    """

    #: update the reference during training (TRL's sync_ref_model).
    enabled: bool = False
    #: α ∈ (0, 1], the policy's weight in the mix (TRL's ref_model_mixup_alpha; 1: hard update).
    alpha: float = 0.6
    #: τ ≥ 1, optimizer steps between updates (TRL's ref_model_sync_steps).
    every: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(
                f"model.reference_sync.alpha must be in (0, 1] (1: the hard update), got {self.alpha}"
            )
        if self.every < 1:
            raise ValueError(f"model.reference_sync.every must be >= 1 optimizer steps, got {self.every}")


@dataclass
class ModelConfig:
    #: a Hugging Face causal LM: hub name, local directory, or `builtin:tiny` (the embedded default).
    name_or_path: str = MISSING
    #: tokenizer to use; defaults to `name_or_path`.
    tokenizer: Optional[str] = None
    #: a separate reference model; defaults to a frozen copy of the initial policy.
    reference: Optional[str] = None
    #: live (run the reference every step) | precomputed (score the data once before training, cache
    #: the log-probs on disk, free the reference; not for losses that need its full logits).
    reference_mode: str = "live"
    #: float32 | bfloat16 | float16 | auto (also bf16, fp16, fp32). Log-probs are always computed in fp32.
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    #: off unless you trust the model repository's code.
    trust_remote_code: bool = False
    #: passed to from_pretrained, e.g. sdpa or eager; None lets transformers choose.
    attn_implementation: Optional[str] = None
    #: the chat template for conversational data, replacing the tokenizer's own: a name from
    #: `alignlab.models.CHAT_TEMPLATES` (e.g. `plain`, `chatml`), a path to a Jinja file, or the Jinja
    #: text itself (anything containing `{{` or `{%`).
    chat_template: Optional[str] = None
    #: zero the dropout probabilities of the policy, as TRL does for DPO (the reference is in eval mode).
    disable_dropout: bool = True
    #: compute logits this many positions at a time, never materialising (B, T, V) fp32 logits
    #: (docs/performance.md); 0 uses the model's own dense logits.
    logit_chunk_size: int = 128
    #: run the output head only at the positions the loss reads (response tokens; prompts too for
    #: `Needs.logits_on_prompt`), not on prompt and padding: exact, and the head dominates small models
    #: with large vocabularies (docs/architecture.md, "Forward pass"). Chunked logits only.
    skip_unused_logits: bool = True
    #: run right-padded batches without their attention mask: causal attention keeps every real token
    #: from the padding after it, so the outputs the losses read are the same, and sdpa takes its causal
    #: path (half the attention work at long context, no (B, 1, T, T) mask). Checked once per model,
    #: which keeps the mask if its real positions change without it. docs/architecture.md, "Forward pass".
    drop_padding_mask: bool = True
    #: pack each batch's sequences without padding (position ids restart per sequence, block-diagonal
    #: causal attention built by transformers), in the batches where that is less work than the padded
    #: batch (`forward.layout_cost`: at long context the packed rows' masked attention outweighs the
    #: padding); exact, checked once per model, which falls back to padding if it ignores packed
    #: position ids. The layout of losses with one response; docs/performance.md for the measurements.
    padding_free: bool = True
    #: run each example's prompt once for all its responses (one row: prompt, then every response,
    #: each attending to the prompt and itself via a 4D mask), in the batches where that is less work
    #: than the padded batch, as for padding_free; exact, sdpa or eager attention (others fall back to
    #: padding_free), checked once per model; takes precedence over padding_free for losses with two
    #: or more responses.
    prefix_sharing: bool = True
    #: LoRA / QLoRA adapters (peft): `model.lora.enabled=true`.
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: TR-DPO: update the reference from the policy during training (`model.reference_sync.enabled=true`).
    reference_sync: ReferenceSyncConfig = field(default_factory=ReferenceSyncConfig)

    def __post_init__(self) -> None:
        _one_of("model.reference_mode", self.reference_mode, REFERENCE_MODES)
        self.dtype = DTYPE_ALIASES.get(str(self.dtype).lower(), self.dtype)
        _one_of("model.dtype", self.dtype, DTYPES)
        if self.logit_chunk_size < 0:
            raise ValueError(f"model.logit_chunk_size must be >= 0, got {self.logit_chunk_size}")


@dataclass
class DataConfig:
    #: a local .json/.jsonl/.csv/.tsv (.gz too) or .parquet file or a folder of them, a `save_to_disk`
    #: folder, `builtin:sentiment`, or a Hugging Face dataset name (hub, or the local cache offline).
    path: str = MISSING
    #: the hub dataset's configuration name.
    name: Optional[str] = None
    #: the split of a hub dataset or a saved DatasetDict.
    split: str = "train"
    #: auto | explicit | conversational | hh | columns (see docs/data.md).
    format: str = "auto"
    #: canonical field -> source column, e.g. {prompt: instruction, response_a: output_1,
    #: response_b: output_2, preference: preference} for AlpacaEval.
    columns: Dict[str, str] = field(default_factory=dict)
    #: the retain set of unlearning losses (NPO+RT, NPO+KL): a source like `path`, read with the
    #: same format and columns; each example pairs a row of `path` with a retain row.
    retain: Optional[str] = None
    #: swap chosen and rejected in every pair (e.g. to train AlignDistil's reverse-DPO teacher).
    swap_pairs: bool = False
    #: a separate held-out source (`eval_path`, read with `eval_split` or `split`), or only `eval_split`:
    #: another split of `path` (a DatasetDict folder or a hub dataset); otherwise `eval_size` rows are
    #: held out of `path`.
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None
    #: held-out fraction (< 1) or number of rows (>= 1).
    eval_size: float = 0.1
    #: use only the first N rows of the source (None: all).
    limit: Optional[int] = None
    #: prompt + response tokens, and prompt tokens (TRL's DPOConfig defaults; the embedded default's
    #: configs/data/sentiment.yaml sets 48 and 16 for the toy task).
    max_length: int = 1024
    max_prompt_length: int = 512
    #: a prompt longer than max_prompt_length: error (a bad row), keep_end or keep_start.
    prompt_truncation: str = "error"
    #: a malformed row: error (stop, naming the row) or skip (filter, count and report).
    on_bad_row: str = "error"
    num_proc: int = 1
    #: where tokenized datasets are cached by fingerprint; default ~/.cache/alignlab.
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, FORMATS)
        _one_of("data.on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        _one_of("data.prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATION)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than data.max_length "
                f"({self.max_length}) to leave room for the response"
            )
        if self.eval_size < 0 or (self.eval_size >= 1 and self.eval_size != int(self.eval_size)):
            raise ValueError(
                f"data.eval_size must be a fraction below 1 or a whole number of rows, got {self.eval_size}"
            )
        for name in ("max_prompt_length", "num_proc"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainerConfig:
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    #: > 0 overrides num_train_epochs.
    max_steps: int = -1
    #: transformers' default since torch 2.8: one fused kernel per parameter group; on the 2-core CPU
    #: its AdamW step over W2's 38.4M parameters takes 0.2-0.9 s against 1.7-6.5 s for the unfused
    #: `adamw_torch` (docs/performance.md).
    optim: str = "adamw_torch_fused"
    lr_scheduler_type: str = "linear"
    #: linear warmup: a number of steps (>= 1) or a fraction of all steps (< 1).
    warmup_steps: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    #: evaluate on the held-out split every N steps (0: only at the end).
    eval_steps: int = 0
    #: checkpoint every N steps (0: no intermediate checkpoints).
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    #: a checkpoint folder, or `latest` for the newest verified checkpoint of this run's config in the
    #: run directory (a fresh start when there is none yet).
    resume_from_checkpoint: Optional[str] = None
    #: resume a checkpoint written under another config (seed, loss, ...: see alignlab.rundir).
    resume_any_config: bool = False
    #: start afresh in a run directory that holds another (or a finished) run, replacing it.
    overwrite_output_dir: bool = False
    bf16: bool = False
    fp16: bool = False
    dataloader_num_workers: int = 0
    #: any other transformers.TrainingArguments field, passed through as is.
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "learning_rate",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "eval_steps",
            "save_steps",
            "dataloader_num_workers",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ValueError(
                f"trainer.max_steps={self.max_steps} with trainer.num_train_epochs="
                f"{self.num_train_epochs} trains zero steps. Fix: set trainer.max_steps > 0, or "
                "trainer.max_steps=-1 and "
                "trainer.num_train_epochs > 0"
            )
        for name in sorted(self.extra):
            if name in {f.name for f in fields(self)}:
                raise ValueError(
                    f"trainer.extra.{name}: {name} is a trainer setting of its own; set trainer.{name} "
                    "instead"
                )
            if name in TRAINING_ARGUMENTS_SET_BY_ALIGNLAB:
                raise ValueError(
                    f"trainer.extra.{name}: alignlab sets TrainingArguments.{name} itself "
                    f"({TRAINING_ARGUMENTS_SET_BY_ALIGNLAB[name]}); remove trainer.extra.{name}"
                )


#: TrainingArguments that alignlab.train.training_arguments derives, and from what.
TRAINING_ARGUMENTS_SET_BY_ALIGNLAB = {
    "output_dir": "the run directory",
    "eval_strategy": "trainer.eval_steps",
    "save_strategy": "trainer.save_steps",
    "seed": "seed",
    "report_to": "logger=",
    "run_name": "the run directory",
    "remove_unused_columns": "always false",
    "label_names": "always empty",
    "use_cpu": "whether a GPU is present",
    "deepspeed": "deepspeed=",
    "fsdp": "distributed=fsdp2",
    "fsdp_config": "distributed=fsdp2",
}


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO through HF Trainer (`deepspeed=zero1|zero2|zero3|zero3_offload`; docs/distributed.md).

    "auto" values are filled by HF Trainer from `trainer.*` (batch sizes, gradient accumulation and
    clipping, bf16/fp16). Everything DeepSpeed-specific lives in `alignlab.distributed`.
    """

    #: a DeepSpeed JSON config file (e.g. your cluster's); replaces `config` when set.
    path: Optional[str] = None
    #: the DeepSpeed config itself; empty (the `none` option) trains without DeepSpeed.
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether the run uses DeepSpeed."""
        return bool(self.path or self.config)


@dataclass
class DistributedConfig:
    """The sharding engine besides DeepSpeed: `distributed=none|fsdp2` (docs/distributed.md).

    `fsdp2`: PyTorch FSDP2 (`fully_shard`) through HF Trainer / accelerate: parameters, gradients and
    optimizer states sharded across processes. Not together with `deepspeed=zeroN` (one engine a run).
    """

    #: HF `TrainingArguments.fsdp_config` (accelerate's FSDP plugin settings, version 2); empty (the
    #: `none` option) trains without FSDP.
    fsdp_config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        version = self.fsdp_config.get("version", 2)
        if self.fsdp_config and str(version) != "2":
            raise ValueError(
                f"distributed.fsdp_config.version={version}: only FSDP2 is supported (transformers "
                "deprecates FSDP1); remove the setting or set it to 2"
            )

    @property
    def fsdp(self) -> bool:
        """Whether the run shards with FSDP2."""
        return bool(self.fsdp_config)


@dataclass
class LoggerConfig:
    #: none | wandb | tensorboard, as HF Trainer's report_to; console and metrics.jsonl always run.
    report_to: List[str] = field(default_factory=list)
    project: str = "alignlab"
    entity: Optional[str] = None
    #: W&B run mode: online | offline | disabled; None keeps $WANDB_MODE.
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    #: W&B run group; None groups the members of a sweep (`alignlab train -m`) by the sweep's directory.
    group: Optional[str] = None


@dataclass
class EvalConfig:
    """`alignlab eval` at the end of training (alignlab/evaluate.py), written to <run>/eval/."""

    #: sample from the policy and the reference on held-out prompts after training (KL, reward, lengths).
    generate: bool = True
    #: "module:function" scoring (prompts, completions) -> floats; "auto": the reward a builtin task
    #: registers (builtin:sentiment: alignlab.builtin:sentiment_reward), else none; null: no reward.
    reward: Optional[str] = "auto"
    num_prompts: int = 8
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"eval.num_prompts and eval.max_new_tokens must be >= 1, got {self.num_prompts} and "
                f"{self.max_new_tokens}; set eval.generate=false to skip sampling"
            )
        if self.reward not in (None, "auto") and ":" not in self.reward:
            raise ValueError(
                f"eval.reward must be module:function, 'auto' or null, got {self.reward!r} "
                "(e.g. eval.reward=alignlab.bench.sentiment:vader_reward)"
            )


@dataclass
class AlignConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    #: evaluation at the end of training.
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 42
    #: the run directory; defaults to Hydra's output directory (runs/<loss>/<time>).
    output_dir: Optional[str] = None
    #: earlier stages of a multi-stage recipe, in order: name -> overrides of this config for that
    #: stage, e.g. {margin: [loss=dpo, data.path=...]}. `alignlab train` trains each (once: see
    #: `stages_dir`) before this run; `${stage:NAME}` is its output directory (alignlab.stages).
    stages: Dict[str, List[str]] = field(default_factory=dict)
    #: where stages run, each in <stages_dir>/<name>-<hash of its config>, so an identical stage is
    #: trained once and reused by later runs and by every member of a sweep.
    stages_dir: str = "runs/stages"

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


#: the free-form dictionaries of the schema: `KEY.NAME=value` and `KEY={...}` add names to them as
#: documented, without Hydra's `+` (Hydra closes every dictionary of a composed config otherwise).
OPEN_DICTS = ("data.columns", "trainer.extra", "deepspeed.config", "distributed.fsdp_config", "stages")


def schema():
    """`AlignConfig` as the root schema, with the `OPEN_DICTS` open to new keys."""
    node = OmegaConf.structured(AlignConfig)
    for key in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    return node


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


#: `${embedded:TOY,REAL}`: TOY on the embedded default, REAL for any other model (`embedded_value`).
EMBEDDED_RESOLVER = "embedded"


def is_embedded(cfg) -> bool:
    """Whether a composed config trains the embedded model: its `model.name_or_path`, as written (before
    interpolation), is a builtin model (`builtin:tiny`, or `builtin:tiny@DIR`, its weights trained in DIR)."""
    model = cfg.get("model") if cfg is not None else None
    if model is None:
        return False
    raw = OmegaConf.to_container(model, resolve=False).get("name_or_path")
    return isinstance(raw, str) and raw.startswith("builtin:")


def embedded_value(toy: Any, real: Any, _root_) -> Any:
    """`${embedded:TOY,REAL}`: how a setting of the embedded default stays bound to it.

    The toy task trains a 79K-parameter random model in seconds (learning rate 1e-3, 150 steps,
    sequences of 48 tokens); a real model needs real settings (1e-6, epochs, 1024 tokens). A setting
    written `${embedded:TOY,REAL}` is TOY while `model.name_or_path` is a builtin model and REAL as
    soon as it names another one, so `+recipe=dpo model.name_or_path=M data.path=D` trains with the
    real settings. A value given on the command line replaces the expression, whichever the model.
    """
    return toy if is_embedded(_root_) else real


def resource_dir(name: str) -> Path:
    """The `configs` or `recipes` folder: the repo's own in a checkout, else the installed copy."""
    repo = Path(__file__).resolve().parent.parent / name
    if repo.is_dir():
        return repo
    return Path(str(resources.files(f"alignlab.{name}")))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("recipes").glob("*.yaml"))


#: names a TRL user brings (DPOConfig / DPOTrainer and TrainingArguments fields that alignlab keeps
#: elsewhere) -> where they live in alignlab. docs/from_trl.md is the full table.
TRL_NAMES = {
    "beta": "loss.beta",
    "loss_type": "loss.loss_type (DPO: sigmoid|ipo|hinge; other losses are loss=NAME, see alignlab list)",
    "label_smoothing": "loss.label_smoothing",
    "rpo_alpha": "+recipe=rpo (loss.eta)",
    "warmup_ratio": "trainer.warmup_steps (a value below 1 is a fraction of all steps)",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "max_completion_length": "data.max_length (prompt + response)",
    "truncation_mode": "data.prompt_truncation (keep_end|keep_start)",
    "padding_free": "model.padding_free",
    "precompute_ref_log_probs": "model.reference_mode=precomputed",
    "precompute_ref_batch_size": "trainer.per_device_eval_batch_size",
    "disable_dropout": "model.disable_dropout",
    "dataset_num_proc": "data.num_proc",
    "model_init_kwargs": "model.dtype / model.attn_implementation / model.trust_remote_code",
    "trust_remote_code": "model.trust_remote_code",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing (always with use_reentrant=false)",
    "sync_ref_model": "model.reference_sync.enabled",
    "ref_model_mixup_alpha": "model.reference_sync.alpha",
    "ref_model_sync_steps": "model.reference_sync.every",
    "ref_model": "model.reference",
    "ref_model_name_or_path": "model.reference",
    "model_name_or_path": "model.name_or_path",
    "dataset_name": "data.path",
    "dataset_config": "data.name",
    "dataset_train_split": "data.split",
    "dataset_test_split": "data.eval_split",
    "chat_template": "model.chat_template",
    "torch_dtype": "model.dtype",
    "dtype": "model.dtype",
    "use_peft": "model.lora.enabled",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
    "load_in_4bit": "model.lora.load_in_4bit",
    "output_dir": "output_dir (or hydra.run.dir)",
    "seed": "seed",
    "report_to": "logger=wandb",
}


def trl_hint(key: str) -> str:
    """' In alignlab it is X.' when the last part of `key` is a TRL name kept elsewhere, else ''."""
    leaf = key.rpartition(".")[2]
    if leaf in TRL_NAMES and not TRL_NAMES[leaf].startswith(key):
        return (
            f" {leaf} is TRL's (or transformers') name; in alignlab it is {TRL_NAMES[leaf]} "
            "(docs/from_trl.md)."
        )
    return ""


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
