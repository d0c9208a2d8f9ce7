"""One concatenated forward pass over every response of a batch, to per-token log-probs.

Two ways to get the logits, with the same results:
* chunked (default, `model.logit_chunk_size` > 0): the model returns its final hidden states (and
  the logits of one position only); logits are computed a chunk of positions at a time
  (`alignlab.chunked`), so no `(B, T, V)` fp32 tensor is ever materialised, for sequence-level
  losses and token-level ones alike.
* dense (`model.logit_chunk_size=0`, or a model whose logits are not `head(last hidden state)`,
  e.g. with final logit soft-capping): the model's own `(B, T, V)` logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignlab.chunked import LazyLogits, label_logps, per_token
from alignlab.distributed import chunkable_head
from alignlab.losses.base import SequenceLogps

log = logging.getLogger(__name__)


class Forward:
    """Runs models on collated batches; remembers whether a model supports chunked logits.

    Args:
        chunk_size: positions per logits chunk; 0 for dense logits.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._checked: dict[int, bool] = {}

    def __call__(
        self, model: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor],
        responses: tuple[str, ...], full_logits: bool = False,
    ) -> dict[str, SequenceLogps]:
        """Run `model` once on all `responses` of `batch` stacked along the batch dimension.

        Args:
            model: a causal LM (possibly wrapped by DDP / DeepSpeed / PEFT: it is only called).
            head: its output projection (`get_output_embeddings()` of the unwrapped model).
            batch: the collator's output: `{r}_input_ids`, `{r}_attention_mask`, `{r}_labels` per r,
                all padded to one length.
            responses: the response names to run, in order.
            full_logits: give each `SequenceLogps` its `(B, T-1, V)` logits (lazy when chunked).

        Returns:
            response name -> `SequenceLogps` with `(B, T-1)` tensors (position t predicts token t+1).
        """
        head = chunkable_head(head)
        input_ids = torch.cat([batch[f"{r}_input_ids"] for r in responses])
        attention_mask = torch.cat([batch[f"{r}_attention_mask"] for r in responses])
        labels = torch.cat([batch[f"{r}_labels"] for r in responses])[:, 1:]
        logits = self._logits(model, head, input_ids, attention_mask)
        mask = labels != -100
        token_logps = per_token(label_logps, logits, extras=(labels,)) * mask
        with torch.no_grad():
            per_position = per_token(lambda x: x.mean(-1), logits)
            mean_logit = (per_position * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        n = len(responses)
        parts = zip(token_logps.chunk(n), mask.chunk(n), mean_logit.chunk(n), attention_mask[:, :-1].bool().chunk(n),
                    _split(logits, n))
        return {
            name: SequenceLogps(token_logps=r_logps, mask=r_mask, mean_logit=r_mean, input_mask=r_input,
                                logits=r_logits if full_logits else None)
            for name, (r_logps, r_mask, r_mean, r_input, r_logits) in zip(responses, parts)
        }

    def _logits(self, model, head, input_ids, attention_mask):
        if not self.chunk_size or head is None or self._checked.get(id(model)) is False:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits[:, :-1]
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                     output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if id(model) not in self._checked:
            # The chunked path assumes logits == head(last hidden state). Check it once on the one
            # position the model did compute; models with soft-capping or scaling fall back to dense.
            with torch.no_grad():
                ok = torch.allclose(head(hidden[:, -1:]).float(), out.logits[:, -1:].float(), atol=1e-4, rtol=1e-3)
            self._checked[id(model)] = ok
            if not ok:
                log.warning("%s: logits are not head(last hidden state); using dense logits", type(model).__name__)
                return self._logits(model, head, input_ids, attention_mask)
        return LazyLogits(hidden[:, :-1], head, self.chunk_size)


def _split(logits, n: int):
    if isinstance(logits, LazyLogits):
        return [LazyLogits(h, logits.head, logits.chunk_size) for h in logits.hidden.chunk(n)]
    return logits.chunk(n)


def concatenated_forward(model: nn.Module, batch: dict[str, torch.Tensor], responses: tuple[str, ...],
                         full_logits: bool = False, chunk_size: int = 0) -> dict[str, SequenceLogps]:
    """One-off `Forward(chunk_size)` on an unwrapped model (see `Forward.__call__`)."""
    return Forward(chunk_size)(model, model.get_output_embeddings(), batch, responses, full_logits)
