"""Loading the policy (with LoRA adapters when configured), its tokenizer and (only when a loss needs
one) the frozen reference: a separate model, a copy of the initial policy, or, with an adapter, the
policy itself with its adapters disabled."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from alignlab.builtin import build_model, build_tokenizer
from alignlab.config import LoraConfig, ModelConfig
from alignlab.distributed import whole_models
from alignlab.errors import ConfigError, UserError, first_line

BUILTIN_PREFIX = "builtin:"
#: the embedded model; `builtin:tiny@DIR` is the same model with the weights saved in DIR (e.g. its
#: SFT stage).
TINY = f"{BUILTIN_PREFIX}tiny"
#: `model.dtype` (`alignlab.config.DTYPES`, aliases already resolved) -> the torch dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelError(UserError):
    """A model or tokenizer that cannot be used as configured; the message says how to fix it."""


def _source(name: str) -> str:
    """Resolve a relative local path against the working directory; leave hub names alone."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _bare_bpe(folder: Path) -> bool:
    """A folder holding only a byte-level BPE vocabulary (vocab.json + merges.txt), which AutoTokenizer
    cannot place without a tokenizer config."""
    return (
        (folder / "vocab.json").is_file()
        and (folder / "merges.txt").is_file()
        and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "config.json"))
    )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token guaranteed (models such as Llama ship none)."""
    name = cfg.tokenizer or cfg.name_or_path
    if name.partition("@")[0] == TINY:  # builtin:tiny, or builtin:tiny@DIR (its weights trained in DIR)
        tokenizer = build_tokenizer()
    else:
        from transformers import AutoTokenizer, GPT2Tokenizer

        source = _source(name)
        # a bare byte-level BPE folder (vocab.json + merges.txt, no tokenizer config), e.g. GPT-2's files
        loader = GPT2Tokenizer if _bare_bpe(Path(source)) else AutoTokenizer
        try:
            tokenizer = loader.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except OSError as err:
            raise ModelError(
                f"cannot load tokenizer {name!r}: it is neither a local folder nor reachable on the hub "
                f"({first_line(err)}). "
                "Set model.name_or_path (or model.tokenizer) to a folder with tokenizer files."
            ) from None
        except (ValueError, ImportError) as err:
            raise ModelError(
                f"cannot load tokenizer {name!r}: {first_line(err)}. Fix: point model.tokenizer at a "
                "folder with tokenizer.json (or tokenizer_config.json + its vocabulary files)"
            ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(
                f"tokenizer {name!r} has neither a pad nor an EOS token; "
                "use a tokenizer that defines an EOS token"
            )
        # Padding positions are masked out of every loss and attention, so reusing EOS is safe; labels
        # come from the masks, never from comparing ids with pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template:
        tokenizer.chat_template = chat_template(cfg.chat_template)
    return tokenizer


#: named chat templates for `model.chat_template=NAME` (tokenizers without one, or to replace it).
CHAT_TEMPLATES = {
    # "role: content" lines; the prompt ends with "assistant: " (the README's stories260k example)
    "plain": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}",
    # ChatML as Qwen and TRL's setup_chat_format write it; its markers are plain text to a tokenizer
    # that lacks them as special tokens
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}


def chat_template(value: str) -> str:
    """The Jinja text of `model.chat_template`: a name of `CHAT_TEMPLATES`, a Jinja file, a tokenizer
    folder (its chat_template.jinja or tokenizer_config.json's template), or the Jinja text itself.

    Raises:
        ModelError: none of these.
    """
    if "{{" in value or "{%" in value:
        return value
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    path = Path(value).expanduser()
    if path.is_dir():
        import json

        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        config = path / "tokenizer_config.json"
        template = (
            json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        )
        if isinstance(template, str) and template:
            return template
        raise ModelError(
            f"model.chat_template={value!r}: the folder holds no chat template (chat_template.jinja, or "
            "chat_template in tokenizer_config.json). Fix: name a file, a folder with one, or a template "
            f"name ({', '.join(CHAT_TEMPLATES)})"
        )
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if "{{" in text or "{%" in text:
            return text
        raise ModelError(
            f"model.chat_template={value!r}: the file holds no Jinja ({{{{ }}}} or {{% %}}). Fix: point "
            "it at a chat template file"
        )
    raise ModelError(
        f"model.chat_template={value!r} is not a template name ({', '.join(CHAT_TEMPLATES)}), an existing "
        f"file or folder (relative paths start at {Path.cwd()}), or Jinja text (with {{{{ or {{%). Fix: "
        "correct it"
    )


#: files that make a folder a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def check_model_folder(name: str, key: str = "model.name_or_path") -> None:
    """Refuse, before anything loads, a local model path that holds no model: missing, a file, a
    tokenizer-only folder, or a folder without config.json or safetensors weights. Hub names pass.

    Raises:
        ModelError: naming `key`, what the folder holds and the fix.
    """
    if name.startswith(BUILTIN_PREFIX):
        return
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith(("/", "./", "../", "~")):
            raise ModelError(
                f"{key}={name!r} does not exist (relative paths start at {Path.cwd()}). Fix: point it at "
                "a model folder (config.json + *.safetensors) or a hub name"
            )
        return  # a hub name
    if not path.is_dir():
        raise ModelError(
            f"{key}={name!r} is a file. Fix: point it at the model's folder (config.json + *.safetensors)"
        )
    if (path / "adapter_config.json").is_file():  # a peft adapter: transformers loads its base with it
        return
    if not (path / "config.json").is_file():
        found = [f for f in TOKENIZER_FILES if (path / f).is_file()]
        what = f"holds only a tokenizer ({', '.join(found)})" if found else "holds no config.json"
        use = (
            f", and model.tokenizer={name} to use this tokenizer"
            if found and key == "model.name_or_path"
            else ""
        )
        raise ModelError(
            f"{key}={name!r} is not a model folder: it {what}. Fix: set {key} to a folder with config.json "
            f"and *.safetensors weights{use}"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{key}={name!r} holds no *.safetensors weights (alignlab never loads pickled .bin weights). "
            "Fix: convert them once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)"
        )


def load_policy(cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """The trainable causal LM, by hub name, local path, or `builtin:tiny`; a peft `PeftModel` with
    fresh LoRA adapters when `model.lora.enabled` (QLoRA: on a 4-bit base)."""
    model = _load_causal_lm(cfg, tokenizer, seed)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def _load_causal_lm(cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """The causal LM of `cfg` without adapters: dtype, dropout, pad token and checkpointing settled."""
    source = cfg.name_or_path
    if source.startswith(BUILTIN_PREFIX):
        base, _, source = source.partition("@")  # builtin:tiny@DIR: the tiny model's weights saved in DIR
        if base != TINY:
            raise ModelError(
                f"unknown builtin model {cfg.name_or_path!r}; the only one is 'builtin:tiny' "
                "(or 'builtin:tiny@DIR', its weights saved in DIR)"
            )
    if not source:
        model = build_model(len(tokenizer), seed)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.lora.load_in_4bit:
            kwargs["quantization_config"] = _nf4_config(cfg)
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(_source(source), use_safetensors=True, **kwargs)
        except OSError as err:
            raise ModelError(
                f"cannot load model {cfg.name_or_path!r}: {first_line(err)}. "
                "Set model.name_or_path to a local folder "
                "with config.json and *.safetensors, or a hub name on a machine with network access."
            ) from None
        except (
            ValueError,
            ImportError,
        ) as err:  # e.g. an unknown attention implementation, flash-attn absent
            setting = (
                f"model.attn_implementation={cfg.attn_implementation}"
                if cfg.attn_implementation
                else "the model"
            )
            raise ModelError(
                f"cannot load model {cfg.name_or_path!r} ({setting}): {first_line(err)} Fix: use "
                "model.attn_implementation=sdpa or eager (flash_attention_2 needs a GPU and the flash-attn "
                "package), or leave it unset"
            ) from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but model {cfg.name_or_path!r} "
            f"embeds only {rows}: they do "
            "not belong together. Fix: set model.tokenizer to the model's own tokenizer (or leave it unset)"
        )
    if cfg.dtype not in ("auto", "float32") and not cfg.lora.load_in_4bit:
        model.to(DTYPES[cfg.dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_reference(cfg: ModelConfig, policy: nn.Module, tokenizer, seed: int) -> nn.Module:
    """A frozen reference: `model.reference` if set; else, with LoRA, the policy with its adapters
    disabled (`AdapterDisabled`, no second copy); else a copy of the initial policy."""
    if cfg.reference:
        return load_frozen(cfg.reference, cfg, tokenizer, seed)
    if cfg.lora.enabled:
        return AdapterDisabled(policy)
    return freeze(copy.deepcopy(policy))


def load_frozen(name_or_path: str, cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """Any extra frozen model (reference, teacher, margin reward model) through the policy's loading
    path: same dtype, attention implementation, pad-token handling and trust settings; no adapter."""
    frozen = _load_causal_lm(
        replace(cfg, name_or_path=name_or_path, gradient_checkpointing=False, lora=LoraConfig()),
        tokenizer,
        seed,
    )
    return freeze(frozen)


# -- LoRA / QLoRA ---------------------------------------------------------------------------------


def add_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap `model` in a peft `PeftModel` with fresh LoRA adapters (B = 0: it starts as the base)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = cfg.lora
    if lora.load_in_4bit:  # fp32 norms and head, input grads for checkpointing (the QLoRA recipe)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules!r}: {str(err).splitlines()[0]}"
        ) from None


def _nf4_config(cfg: ModelConfig):
    """bitsandbytes 4-bit NF4 with double quantisation; computes in model.dtype (bf16 for float32/auto)."""
    from transformers import BitsAndBytesConfig

    compute = DTYPES[cfg.dtype] if cfg.dtype in ("bfloat16", "float16") else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def check_lora(cfg: ModelConfig, has_gpu: bool) -> None:
    """Refuse what cannot run here (QLoRA without a CUDA GPU or bitsandbytes), before anything loads."""
    if not cfg.lora.load_in_4bit:
        return
    if not has_gpu:
        raise ConfigError(
            "model.lora.load_in_4bit=true (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit kernels) and "
            "this machine has none; set model.lora.load_in_4bit=false to train LoRA on the "
            "full-precision base"
        )
    if cfg.name_or_path.startswith(BUILTIN_PREFIX):
        raise ConfigError(
            f"model.lora.load_in_4bit=true quantises weights loaded with from_pretrained; "
            f"{cfg.name_or_path!r} is built in memory: set model.name_or_path to a real model"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.lora.load_in_4bit=true (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from None


class AdapterDisabled(nn.Module):
    """The reference as a view of a LoRA policy: its forward runs the policy with adapters disabled.

    No second copy of the weights exists: the view registers nothing (no parameters, no submodules),
    so moving, freezing or counting it never touches the policy. It runs the policy in eval mode and
    without gradient, whatever the policy's own mode. Its `get_output_embeddings()` is the base head
    (the adapter's base layer if LoRA targets the head), so chunked logits computed later, outside
    the forward, are the base model's too.

    Args:
        policy: a peft `PeftModel` (the unwrapped policy; DeepSpeed / DDP wrap the same module).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: see the class docstring
        self.eval()

    @property
    def config(self):
        return self.policy.config

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def get_output_embeddings(self) -> nn.Module:
        head = self.policy.get_output_embeddings()
        return head.get_base_layer() if hasattr(head, "get_base_layer") else head

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def save_merged(cfg: ModelConfig, tokenizer, seed: int, adapter_dir: Path, out_dir: Path, args=None) -> None:
    """Write `out_dir`: the adapter of `adapter_dir` merged into a freshly loaded full-precision base.

    The base is reloaded (unquantised even after QLoRA, as peft recommends for merging) rather than
    merged in place, so the trained model, possibly partitioned by ZeRO-3 (`args`: the run's
    `TrainingArguments`), is left untouched. The result loads with plain
    `AutoModelForCausalLM.from_pretrained`.
    """
    from peft import PeftModel  # deferred: heavy

    with whole_models(args):
        base = _load_causal_lm(replace(cfg, gradient_checkpointing=False, lora=LoraConfig()), tokenizer, seed)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
