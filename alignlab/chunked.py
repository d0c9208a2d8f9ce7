"""Full-vocabulary terms without `(B, T, V)` fp32 tensors: logits computed a chunk of positions at a time.

A causal LM's logits are `head(hidden)`. Instead of materialising them for the whole batch (the
largest tensors of a step when V is 32k–150k), `LazyLogits` keeps the final hidden states `(B, T, H)`
and the output head, and `per_token` evaluates any per-position function of one or several models'
logits chunk by chunk. Each chunk runs under activation checkpointing, so the forward keeps only the
chunk's result and the backward recomputes that chunk's logits: peak memory holds one chunk of
logits per model instead of all of them, and the result is the same as the dense computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LazyLogits:
    """Logits `head(hidden)`, evaluated a chunk of positions at a time.

    Attributes:
        hidden: `(B, T, H)` final hidden states; position t predicts token t+1.
        head: the output projection (the model's `get_output_embeddings()`).
        chunk_size: positions per chunk.
    """

    hidden: torch.Tensor
    head: nn.Module
    chunk_size: int

    @property
    def shape(self) -> torch.Size:
        weight = self.head.weight
        vocab = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3: partitioned
        return torch.Size((*self.hidden.shape[:2], vocab))

    def dense(self) -> torch.Tensor:
        """All logits at once, fp32 (for tests and small cases)."""
        return self.head(self.hidden).float()


Logits = torch.Tensor | LazyLogits


def per_token(fn: Callable[..., torch.Tensor], *sources: Logits, extras: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`fn(*logits, *extras)` evaluated over positions, `(B, T)`.

    Args:
        fn: maps fp32 logits `(B, t, V)` of each source, then each extra `(B, t, …)`, all at the
            same positions, to a `(B, t)` tensor.
        *sources: dense `(B, T, V)` logit tensors, or `LazyLogits` (then computed chunk by chunk
            under activation checkpointing). All sources must be of one kind.
        extras: per-position tensors `(B, T, …)` sliced along with the chunks (e.g. labels).
    """
    if not any(isinstance(s, LazyLogits) for s in sources):
        return fn(*(s if s.dtype == torch.float64 else s.float() for s in sources), *extras)
    if not all(isinstance(s, LazyLogits) for s in sources):
        raise TypeError("per_token: mix of dense and lazy logits; build all sources the same way")
    length, chunk = sources[0].hidden.shape[1], sources[0].chunk_size
    heads = [s.head for s in sources]

    def on_chunk(*tensors: torch.Tensor) -> torch.Tensor:
        hidden, rest = tensors[: len(heads)], tensors[len(heads):]
        return fn(*(head(h).float() for head, h in zip(heads, hidden)), *rest)

    out = []
    for start in range(0, length, chunk):
        parts = [t[:, start:start + chunk] for t in (*(s.hidden for s in sources), *extras)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            out.append(checkpoint(on_chunk, *parts, use_reentrant=False))
        else:
            out.append(on_chunk(*parts))
    return torch.cat(out, dim=1)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t) = logit[label] − logsumexp(logits), `(B, t)` (never softmax().log()).

    Labels of -100 (masked) read position 0; the caller masks the result.
    """
    return logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per position from log-probabilities, summed over the vocabulary: `(…, V) -> (…)`."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_kl(first: Logits, second: Logits) -> torch.Tensor:
    """Per-position KL(π_first ‖ π_second) over the full vocabulary, `(B, T)`, via log_softmax."""
    return per_token(lambda a, b: kl(a.log_softmax(-1), b.log_softmax(-1)), first, second)
