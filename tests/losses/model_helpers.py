"""A real model in true float64, and random collated batches, for exactness tests through the forward pass."""

from __future__ import annotations

from functools import partial

import torch

from alignlab import builtin
from alignlab.data.collate import PreferenceCollator


def _rms_norm_fp64(norm, hidden: torch.Tensor) -> torch.Tensor:
    return norm.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def tiny_fp64(seed: int):
    """builtin:tiny (a 2-layer Llama) in float64 throughout.

    HF's `LlamaRMSNorm` computes in float32 whatever the model's dtype, so a `.double()` model still
    rounds to ~1e-7 there, and two exact paths that sum in another order (e.g. a shared prompt's
    gradient from two responses) differ at that level. Here the norms keep float64, so exact paths
    agree to ~1e-12 and a real departure cannot hide below the tolerance.
    """
    model = builtin.build_model(len(builtin.build_tokenizer()), seed=seed).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = partial(_rms_norm_fp64, module)
    return model


def random_rows(
    responses: tuple[str, ...],
    vocab: int,
    b: int = 4,
    seed: int = 0,
    own_prompt: tuple[str, ...] = (),
    fields: dict | None = None,
) -> list[dict]:
    """Tokenized rows of uneven lengths (prompt 2-5 tokens, responses 1-6), ids in [6, vocab)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(6, vocab, (n,), generator=gen).tolist()

    rows = []
    for i in range(b):
        row = {"prompt_ids": ids(2, 5), **{f"{r}_ids": ids(1, 6) for r in responses}}
        row.update({f"{r}_prompt_ids": ids(2, 5) for r in own_prompt})
        row.update({k: v(i) for k, v in (fields or {}).items()})
        rows.append(row)
    return rows


def collate(
    rows: list[dict], responses: tuple[str, ...], fields: tuple[str, ...] = (), pad_to: int | None = None
):
    """The collator's batch, optionally padded with extra pad columns to width `pad_to`."""
    batch = PreferenceCollator(pad_token_id=0, responses=responses, fields=fields)(rows)
    return pad_columns(batch, pad_to - batch[f"{responses[0]}_input_ids"].shape[1]) if pad_to else batch


def pad_columns(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """`batch` with `extra` more pad columns at the end of every sequence tensor."""
    out = dict(batch)
    for key, value in batch.items():
        if key.endswith(("_input_ids", "_attention_mask", "_labels")):
            fill = -100 if key.endswith("_labels") else 0
            out[key] = torch.cat([value, value.new_full((value.shape[0], extra), fill)], 1)
    return out
