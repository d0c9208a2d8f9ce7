"""One concatenated forward pass over every response of a batch, to per-token log-probs."""

from __future__ import annotations

import torch
from torch import nn

from alignlab.losses.base import SequenceLogps


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `labels` under `logits`, in fp32.

    Args:
        logits: `(N, T, V)` next-token logits, already shifted so `logits[:, t]` predicts `labels[:, t]`.
        labels: `(N, T)` target ids, -100 where masked (prompt, padding).

    Returns:
        `(token_logps, mask)`: `(N, T)` fp32 log p(label_t), 0 where masked, and the `(N, T)` bool mask.
    """
    mask = labels != -100
    logits = logits.float()
    # log_softmax(x)[y] = x[y] - logsumexp(x): never softmax().log(), which is -inf on underflow.
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask, mask


def concatenated_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], responses: tuple[str, ...], full_logits: bool = False
) -> dict[str, SequenceLogps]:
    """Run `model` once on all `responses` of `batch` stacked along the batch dimension.

    The collator pads every response of a batch to one length, so stacking is a plain `cat`.

    Args:
        model: a causal LM returning `.logits` of shape `(N, T, V)`.
        batch: the collator's output: `{r}_input_ids`, `{r}_attention_mask`, `{r}_labels` for each r.
        responses: the response names to run, in order.
        full_logits: keep the fp32 `(B, T-1, V)` logits in each `SequenceLogps` (token-level losses).

    Returns:
        response name -> `SequenceLogps` with `(B, T-1)` tensors (position t predicts token t+1).
    """
    input_ids = torch.cat([batch[f"{r}_input_ids"] for r in responses])
    attention_mask = torch.cat([batch[f"{r}_attention_mask"] for r in responses])
    labels = torch.cat([batch[f"{r}_labels"] for r in responses])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps, mask = token_logps(logits, labels[:, 1:])
    with torch.no_grad():
        counts = mask.sum(-1).clamp(min=1) * logits.shape[-1]
        mean_logit = (logits.float().sum(-1) * mask).sum(-1) / counts
    n = len(responses)
    parts = zip(logps.chunk(n), mask.chunk(n), mean_logit.chunk(n), logits.chunk(n),
                attention_mask[:, :-1].bool().chunk(n))
    return {
        name: SequenceLogps(token_logps=r_logps, mask=r_mask, mean_logit=r_mean, input_mask=r_input,
                            logits=r_logits.float() if full_logits else None)
        for name, (r_logps, r_mask, r_mean, r_logits, r_input) in zip(responses, parts)
    }
