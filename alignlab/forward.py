"""One concatenated forward pass over every response of a batch, to per-token log-probs.

Two ways to get the logits, with the same results:
* chunked (default, `model.logit_chunk_size` > 0): the model returns its final hidden states (and
  the logits of one position only); logits are computed a chunk of positions at a time
  (`alignlab.chunked`), so no `(B, T, V)` fp32 tensor is ever materialised, for sequence-level
  losses and token-level ones alike.
* dense (`model.logit_chunk_size=0`, or a model whose logits are not `head(last hidden state)`,
  e.g. with final logit soft-capping): the model's own `(B, T, V)` logits.

Two optional savings, each exact (tests/test_forward_speed.py):
* `skip_unused_logits` (chunked path): the output head (with a 50k vocabulary, costlier per token
  than the whole body of a small model) runs only at the positions a loss reads: those that predict
  a response token (plus, for losses with `Needs.logits_on_prompt`, every non-padding position),
  gathered before the head. Prompt and padding positions get no logits; results are scattered back
  to `(B, T-1)` with zeros there, as the masks already make them.
* `padding_free`: the rows of the concatenated batch are packed, without their padding, into as
  few rows as fit in the batch's length, with `position_ids` restarting at 0 for each sequence and
  no attention mask; transformers then builds a block-diagonal causal mask from the position ids
  (`masking_utils.find_packed_sequence_indices`), so no sequence attends to another. The hidden
  states are unpacked to the padded layout before the head. Checked once per model against the
  padded forward: a model that ignores packed position ids falls back to padding, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from alignlab.chunked import LazyLogits, label_logps, per_token
from alignlab.distributed import chunkable_head
from alignlab.losses.base import SequenceLogps

log = logging.getLogger(__name__)


class Forward:
    """Runs models on collated batches; remembers whether a model supports chunked logits / packing.

    Args:
        chunk_size: positions per logits chunk; 0 for dense logits.
        skip_unused_logits: evaluate the head only at the positions the loss reads (chunked path).
        padding_free: pack the sequences of a batch without padding (module docstring).
    """

    def __init__(self, chunk_size: int, skip_unused_logits: bool = True, padding_free: bool = False) -> None:
        self.chunk_size = chunk_size
        self.skip_unused_logits = skip_unused_logits
        self.padding_free = padding_free
        self._checked: dict[int, bool] = {}
        self._packing_checked: dict[int, bool] = {}

    def __call__(
        self, model: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor],
        responses: tuple[str, ...], full_logits: bool = False, logits_on_prompt: bool = False,
    ) -> dict[str, SequenceLogps]:
        """Run `model` once on all `responses` of `batch` stacked along the batch dimension.

        Args:
            model: a causal LM (possibly wrapped by DDP / DeepSpeed / PEFT: it is only called).
            head: its output projection (`get_output_embeddings()` of the unwrapped model).
            batch: the collator's output: `{r}_input_ids`, `{r}_attention_mask`, `{r}_labels` per r,
                all padded to one length.
            responses: the response names to run, in order.
            full_logits: give each `SequenceLogps` its `(B, T-1, V)` logits (lazy when chunked).
            logits_on_prompt: the full logits are read at prompt positions too (`Needs.logits_on_prompt`),
                not only at response positions.

        Returns:
            response name -> `SequenceLogps` with `(B, T-1)` tensors (position t predicts token t+1).
        """
        head = chunkable_head(head)
        input_ids = torch.cat([batch[f"{r}_input_ids"] for r in responses])
        attention_mask = torch.cat([batch[f"{r}_attention_mask"] for r in responses])
        labels = torch.cat([batch[f"{r}_labels"] for r in responses])[:, 1:]
        mask = labels != -100
        input_mask = attention_mask[:, :-1].bool()
        logits = self._logits(model, head, input_ids, attention_mask)
        if self.skip_unused_logits and isinstance(logits, LazyLogits):
            logits = logits.select(mask | input_mask if full_logits and logits_on_prompt else mask)
        # one pass of the head gives both the label log-probs and (detached) each position's mean logit
        both = per_token(_logps_and_mean_logit, logits, extras=(labels,))
        token_logps = both[..., 0] * mask
        mean_logit = (both[..., 1].detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        n = len(responses)
        parts = zip(token_logps.chunk(n), mask.chunk(n), mean_logit.chunk(n), input_mask.chunk(n),
                    logits.split(n) if isinstance(logits, LazyLogits) else logits.chunk(n))
        return {
            name: SequenceLogps(token_logps=r_logps, mask=r_mask, mean_logit=r_mean, input_mask=r_input,
                                logits=r_logits if full_logits else None)
            for name, (r_logps, r_mask, r_mean, r_input, r_logits) in zip(responses, parts)
        }

    def _logits(self, model, head, input_ids, attention_mask):
        if not self.chunk_size or head is None or self._checked.get(id(model)) is False:
            return self._run(model, input_ids, attention_mask, hidden=False)[:, :-1]
        hidden, last_logits, last_hidden = self._run(model, input_ids, attention_mask, hidden=True)
        if id(model) not in self._checked:
            # The chunked path assumes logits == head(last hidden state). Check it once on the one
            # position the model did compute; models with soft-capping or scaling fall back to dense.
            with torch.no_grad():
                ok = torch.allclose(head(last_hidden).float(), last_logits.float(), atol=1e-4, rtol=1e-3)
            self._checked[id(model)] = ok
            if not ok:
                log.warning("%s: logits are not head(last hidden state); using dense logits", type(model).__name__)
                return self._logits(model, head, input_ids, attention_mask)
        return LazyLogits(hidden[:, :-1], head, self.chunk_size)

    def _run(self, model, input_ids, attention_mask, hidden: bool):
        """The model's `(B, T, V)` logits, or (`hidden`) its `(B, T, H)` final hidden states plus the
        logits and hidden state of the one position it computed logits for (to check the head)."""
        kwargs = {"use_cache": False}
        if hidden:
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        checked = self._packing_checked.get(id(model))
        packing = Packing.of(attention_mask) if self.padding_free and checked is not False else None
        if packing is not None and checked and not packing.saves:
            packing = None  # no padding to drop (checked models only: see below)
        if packing is None:
            return self._outputs(model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), hidden)
        out = model(input_ids=input_ids.flatten()[packing.index], position_ids=packing.position_ids,
                    attention_mask=None, **kwargs)
        result = self._outputs(out, hidden, unpack=packing.unpack)
        if checked is None:
            # Packing relies on the model building its attention mask from position_ids: check it once,
            # on the first batch whatever its padding, so that every process runs the same forwards
            # (ZeRO-3 gathers parameters collectively in each one). The padded run keeps its graph, so a
            # failed check returns it without a third forward.
            padded = self._outputs(model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), hidden)
            got, want = (result[0], padded[0]) if hidden else (result, padded)
            real = attention_mask.bool()
            tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 5e-2  # half precision: kernel noise
            ok = bool(torch.allclose(got[real].detach().float(), want[real].detach().float(), atol=tol, rtol=10 * tol))
            self._packing_checked[id(model)] = ok
            if not ok:
                log.warning("%s: packed sequences attend to each other (the model ignores packed position_ids); "
                            "using padded batches", type(model).__name__)
                return padded
        return result

    @staticmethod
    def _outputs(out, hidden: bool, unpack=lambda x: x):
        if not hidden:
            return unpack(out.logits)
        return unpack(out.hidden_states[-1]), out.logits[:, -1:], out.hidden_states[-1][:, -1:]


def _logps_and_mean_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(…, 2)`: log p(label) and the mean logit over the vocabulary (no gradient) at each position."""
    return torch.stack([label_logps(logits, labels), logits.detach().mean(-1)], -1)


@dataclass
class Packing:
    """Right-padded rows `(B, T)` packed without padding into `(R, L)` rows, `R ≤ B`, `L ≤ T`.

    Sequences go, longest first, into the first row with room (first-fit decreasing, capacity T, the
    batch's own length, so attention never spans more than T positions). Each keeps its position ids
    0 … len-1; a packed row's unused tail is one more sequence of its own (positions 0, 1, …).

    Attributes:
        index: `(R, L)` flat index into the `(B·T)` positions of the padded batch for each packed slot
            (the tail reads position 0; its outputs are never used).
        position_ids: `(R, L)` position of each slot within its sequence.
        source: `(B, T)` flat index into the `(R·L)` packed slots for each padded position (padding
            reads slot 0; the caller ignores padding positions, and unpacked padding is zero).
        real: `(B, T)` bool, the non-padding positions.
        saves: the packing has fewer rows than the batch.
    """

    index: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    real: torch.Tensor
    saves: bool

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The packing of a right-padded batch."""
        real = attention_mask.bool()
        b, t = real.shape
        lengths = real.sum(-1).tolist()
        if not torch.equal(real, torch.arange(t, device=real.device) < real.sum(-1, keepdim=True)):
            raise ValueError("padding_free needs right-padded batches (1s then 0s in every attention mask row); "
                             "set model.padding_free=false for this collator")
        rows: list[list[int]] = []  # the batch rows each packed row holds
        room: list[int] = []
        for i in sorted(range(b), key=lambda i: -lengths[i]):
            slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if slot is None:
                rows.append([])
                room.append(t)
                slot = len(rows) - 1
            rows[slot].append(i)
            room[slot] -= lengths[i]
        width = max(t - free for free in room)
        index = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        source = torch.zeros(b, t, dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                n = lengths[i]
                index[r, start:start + n] = i * t + torch.arange(n)
                positions[r, start:start + n] = torch.arange(n)
                source[i, :n] = r * width + start + torch.arange(n)
                start += n
            positions[r, start:] = torch.arange(width - start)
        device = attention_mask.device
        return cls(index.to(device), positions.to(device), source.to(device), real, len(rows) < b)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """`(R, L, …)` -> `(B, T, …)`, zeros at padding positions."""
        out = values.flatten(0, 1)[self.source]
        mask = self.real.view(*self.real.shape, *([1] * (out.dim() - 2)))
        return out * mask.to(out.dtype)


def concatenated_forward(model: nn.Module, batch: dict[str, torch.Tensor], responses: tuple[str, ...],
                         full_logits: bool = False, chunk_size: int = 0) -> dict[str, SequenceLogps]:
    """One-off `Forward(chunk_size)` on an unwrapped model (see `Forward.__call__`)."""
    return Forward(chunk_size)(model, model.get_output_embeddings(), batch, responses, full_logits)
