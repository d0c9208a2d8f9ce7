"""Full-vocabulary terms without `(B, T, V)` fp32 tensors: logits computed a chunk of positions at a time.

A causal LM's logits are `head(hidden)`. Instead of materialising them for the whole batch (the
largest tensors of a step when V is 32k–150k), `LazyLogits` keeps the final hidden states `(B, T, H)`
and the output head, and `per_token` evaluates any per-position function of one or several models'
logits chunk by chunk. Each chunk runs under activation checkpointing, so the forward keeps only the
chunk's result and the backward recomputes that chunk's logits: peak memory holds one chunk of
logits per model instead of all of them, and the result is the same as the dense computation.

A `LazyLogits` may also hold the hidden states of selected positions only (`where`, packed): the head
is then evaluated only there (e.g. response tokens, skipping prompt and padding), and `per_token`
scatters its results back to `(B, T)` with zeros elsewhere.
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
        hidden: `(B, T, H)` final hidden states; position t predicts token t+1. With `where`, the
            `(N, H)` hidden states of the selected positions only, in row-major order (`h[where]`).
        head: the output projection (the model's `get_output_embeddings()`).
        chunk_size: positions per chunk (per row: a chunk covers `chunk_size × B` selected positions
            when `where` is set, the same number of logits as without it).
        where: `(B, T)` bool, the positions `hidden` holds; None for all of them.
    """

    hidden: torch.Tensor
    head: nn.Module
    chunk_size: int
    where: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        weight = self.head.weight
        vocab = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3: partitioned
        rows = self.hidden.shape[:2] if self.where is None else self.where.shape
        return torch.Size((*rows, vocab))

    def select(self, where: torch.Tensor) -> LazyLogits:
        """The same logits at the positions `where` `(B, T)` only (the head is evaluated only there)."""
        if self.where is not None:
            raise ValueError("LazyLogits.select: positions are already selected")
        return LazyLogits(self.hidden[where], self.head, self.chunk_size, where)

    def split(self, n: int) -> list[LazyLogits]:
        """`n` equal parts along the batch dimension (one per response of a concatenated batch)."""
        if self.where is None:
            return [LazyLogits(h, self.head, self.chunk_size) for h in self.hidden.chunk(n)]
        wheres = self.where.chunk(n)
        parts = self.hidden.split([int(w.sum()) for w in wheres])
        return [LazyLogits(h, self.head, self.chunk_size, w) for h, w in zip(parts, wheres)]

    def dense(self) -> torch.Tensor:
        """All logits at once, fp32 (for tests and small cases); zeros at positions not selected."""
        logits = _fp32(self.head(self.hidden))
        if self.where is None:
            return logits
        return logits.new_zeros(self.shape).masked_scatter(self.where.unsqueeze(-1), logits)


Logits = torch.Tensor | LazyLogits


def per_token(
    fn: Callable[..., torch.Tensor], *sources: Logits, extras: tuple[torch.Tensor, ...] = ()
) -> torch.Tensor:
    """`fn(*logits, *extras)` evaluated over positions, `(B, T)`.

    Args:
        fn: maps fp32 logits `(B, t, V)` of each source, then each extra `(B, t, …)`, all at the
            same positions, to a `(B, t)` tensor.
        *sources: dense `(B, T, V)` logit tensors, or `LazyLogits` (then computed chunk by chunk
            under activation checkpointing). All sources must be of one kind.
        extras: per-position tensors `(B, T, …)` sliced along with the chunks (e.g. labels).
    """
    if not any(isinstance(s, LazyLogits) for s in sources):
        return fn(*(_fp32(s) for s in sources), *extras)
    if not all(isinstance(s, LazyLogits) for s in sources):
        raise TypeError("per_token: mix of dense and lazy logits; build all sources the same way")
    where = sources[0].where
    if where is not None:
        return _per_selected_token(fn, sources, extras, where)
    if any(s.where is not None for s in sources):
        raise ValueError(
            "per_token: some sources hold selected positions and others all; build them the same way"
        )
    return _chunked(fn, sources, extras, sources[0].chunk_size)


def _per_selected_token(fn, sources, extras, where: torch.Tensor) -> torch.Tensor:
    """`per_token` on sources that hold the positions `where` only: packed, then scattered to `(B, T, …)`."""
    if not all(s.where is not None and (s.where is where or torch.equal(s.where, where)) for s in sources):
        raise ValueError("per_token: the sources hold different positions; select the same positions in each")
    packed = tuple(e[where].unsqueeze(0) for e in extras)  # (1, N, …), in the sources' order
    flat = [LazyLogits(s.hidden.unsqueeze(0), s.head, s.chunk_size) for s in sources]
    values = _chunked(fn, flat, packed, sources[0].chunk_size * where.shape[0])[0]  # (N, …)
    out = values.new_zeros((*where.shape, *values.shape[1:]))
    return out.index_put((where,), values)


def _chunked(fn, sources, extras, chunk: int) -> torch.Tensor:
    length = sources[0].hidden.shape[1]
    heads = [s.head for s in sources]

    def on_chunk(*tensors: torch.Tensor) -> torch.Tensor:
        hidden, rest = tensors[: len(heads)], tensors[len(heads) :]
        return fn(*(_fp32(head(h)) for head, h in zip(heads, hidden)), *rest)

    out = []
    n_chunks = _agreed_chunk_count(heads, -(-length // chunk))
    for start in range(0, n_chunks * chunk, chunk):
        parts = [t[:, start : start + chunk] for t in (*(s.hidden for s in sources), *extras)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            out.append(checkpoint(on_chunk, *parts, use_reentrant=False))
        else:
            out.append(on_chunk(*parts))
    return torch.cat(out, dim=1)


def _agreed_chunk_count(heads: list[nn.Module], n_chunks: int) -> int:
    """The most chunks any process needs, where a head is ZeRO-3-partitioned, else `n_chunks`.

    Each call of a partitioned head gathers its weight collectively (in the forward, and again in the
    checkpointed recomputation), so every process must call it equally often, whatever its own batch's
    length or number of selected positions. The processes with fewer chunks run empty ones.
    """
    if not any(hasattr(getattr(h, "weight", None), "ds_id") for h in heads):
        return n_chunks
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n_chunks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    count = torch.tensor([n_chunks], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least fp32 (fp64 stays fp64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


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
