"""Loading the policy, its tokenizer and (only when a loss needs one) the frozen reference."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from alignlab.config import ModelConfig
from alignlab.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelError(UserError):
    """A model or tokenizer that cannot be used as configured; the message says how to fix it."""


def _source(name: str) -> str:
    """Resolve a relative local path against the working directory; leave hub names alone."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token guaranteed (models such as Llama ship none)."""
    name = cfg.tokenizer or cfg.name_or_path
    if name == f"{BUILTIN_PREFIX}tiny":
        from alignlab.builtin import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(_source(name), trust_remote_code=cfg.trust_remote_code)
        except OSError as err:
            raise ModelError(
                f"cannot load tokenizer {name!r}: it is neither a local folder nor reachable on the hub ({err}). "
                "Set model.name_or_path (or model.tokenizer) to a folder with tokenizer files."
            ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(
                f"tokenizer {name!r} has neither a pad nor an EOS token; use a tokenizer that defines an EOS token"
            )
        # Padding positions are masked out of every loss and attention, so reusing EOS is safe; labels
        # come from the masks, never from comparing ids with pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    return tokenizer


def load_policy(cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """The trainable causal LM, by hub name, local path, or `builtin:tiny`."""
    if cfg.name_or_path.startswith(BUILTIN_PREFIX):
        if cfg.name_or_path != f"{BUILTIN_PREFIX}tiny":
            raise ModelError(f"unknown builtin model {cfg.name_or_path!r}; the only one is 'builtin:tiny'")
        from alignlab.builtin import build_model

        model = build_model(len(tokenizer), seed)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(_source(cfg.name_or_path), use_safetensors=True, **kwargs)
        except OSError as err:
            raise ModelError(
                f"cannot load model {cfg.name_or_path!r}: {err}. Set model.name_or_path to a local folder "
                "with config.json and *.safetensors, or a hub name on a machine with network access."
            ) from None
    if cfg.dtype not in ("auto", "float32"):
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
    """A frozen reference: `model.reference` if set, else a copy of the initial policy."""
    if cfg.reference:
        return load_frozen(cfg.reference, cfg, tokenizer, seed)
    return freeze(copy.deepcopy(policy))


def load_frozen(name_or_path: str, cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """Any extra frozen model (reference, teacher, margin reward model) through the policy's loading
    path: same dtype, attention implementation, pad-token handling and trust settings."""
    frozen = load_policy(ModelConfig(**{**vars(cfg), "name_or_path": name_or_path, "gradient_checkpointing": False}),
                         tokenizer, seed)
    return freeze(frozen)


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
