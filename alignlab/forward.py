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
* `prefix_sharing`: one row per example, its prompt once and then each response, all responses
  continuing the prompt's position ids; a 4D attention mask (transformers passes 4D masks through
  unchanged) lets each response attend to the prompt and to itself, never to another response. The
  hidden states of the prompt serve every response when unpacked to the padded layout (the last
  prompt position predicts each response's first token). Exact, with sdpa or eager attention; checked
  once per model like `padding_free`.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from alignlab.chunked import LazyLogits, label_logps, per_token
from alignlab.distributed import chunkable_head
from alignlab.losses.base import Activations, SequenceLogps

log = logging.getLogger(__name__)


class Forward:
    """Runs models on collated batches; remembers whether a model supports chunked logits / packing.

    Args:
        chunk_size: positions per logits chunk; 0 for dense logits.
        skip_unused_logits: evaluate the head only at the positions the loss reads (chunked path).
        padding_free: pack the sequences of a batch without padding (module docstring).
        prefix_sharing: run each example's shared prompt once for all its responses (module docstring);
            takes precedence over `padding_free`.
    """

    def __init__(self, chunk_size: int, skip_unused_logits: bool = True, padding_free: bool = False,
                 prefix_sharing: bool = False) -> None:
        self.chunk_size = chunk_size
        self.skip_unused_logits = skip_unused_logits
        self.padding_free = padding_free
        self.prefix_sharing = prefix_sharing
        self._checked: dict[int, bool] = {}
        self._packing_checked: dict[int, bool] = {}

    def __call__(
        self, model: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor],
        responses: tuple[str, ...], full_logits: bool = False, logits_on_prompt: bool = False,
        activations: Activations | None = None,
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
            activations: collect these activations of `model` (`Needs.activations`) into
                `SequenceLogps.activations`, in the padded layout, aligned with the log-probs.

        Returns:
            response name -> `SequenceLogps` with `(B, T-1)` tensors (position t predicts token t+1).
        """
        head = chunkable_head(head)
        input_ids = torch.cat([batch[f"{r}_input_ids"] for r in responses])
        attention_mask = torch.cat([batch[f"{r}_attention_mask"] for r in responses])
        labels = torch.cat([batch[f"{r}_labels"] for r in responses])[:, 1:]
        mask = labels != -100
        input_mask = attention_mask[:, 1:].bool()  # positions that predict a real token
        n = len(responses)
        layout = None
        if self.prefix_sharing:
            full_labels = torch.cat([batch[f"{r}_labels"] for r in responses])
            layout = partial(Packing.shared_prompts, input_ids=input_ids, labels=full_labels, n_responses=n)
        elif self.padding_free:
            layout = Packing.of
        logits, acts = self._logits(model, head, input_ids, attention_mask, layout, activations)
        if self.skip_unused_logits and isinstance(logits, LazyLogits):
            logits = logits.select(mask | input_mask if full_logits and logits_on_prompt else mask)
        # one pass of the head gives both the label log-probs and (detached) each position's mean logit
        both = per_token(_logps_and_mean_logit, logits, extras=(labels,))
        token_logps = both[..., 0] * mask
        mean_logit = (both[..., 1].detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        parts = zip(token_logps.chunk(n), mask.chunk(n), mean_logit.chunk(n), input_mask.chunk(n),
                    logits.split(n) if isinstance(logits, LazyLogits) else logits.chunk(n))
        out = {
            name: SequenceLogps(token_logps=r_logps, mask=r_mask, mean_logit=r_mean, input_mask=r_input,
                                logits=r_logits if full_logits else None)
            for name, (r_logps, r_mask, r_mean, r_input, r_logits) in zip(responses, parts)
        }
        if acts is not None:
            for i, name in enumerate(responses):
                out[name].activations = {kind: [t.chunk(n)[i] for t in ts] for kind, ts in acts.items()}
        return out

    def _logits(self, model, head, input_ids, attention_mask, layout, activations=None):
        """(logits, activations): dense `(B, T-1, V)` logits or `LazyLogits`, and the collected activations."""
        if not self.chunk_size or head is None or self._checked.get(id(model)) is False:
            logits, acts = self._run(model, input_ids, attention_mask, layout, False, activations)
            return logits[:, :-1], acts
        (hidden, last_logits, last_hidden), acts = self._run(model, input_ids, attention_mask, layout, True,
                                                             activations)
        if id(model) not in self._checked:
            # The chunked path assumes logits == head(last hidden state). Check it once on the one
            # position the model did compute; models with soft-capping or scaling fall back to dense.
            with torch.no_grad():
                ok = torch.allclose(head(last_hidden).float(), last_logits.float(), atol=1e-4, rtol=1e-3)
            self._checked[id(model)] = ok
            if not ok:
                log.warning("%s: logits are not head(last hidden state); using dense logits", type(model).__name__)
                return self._logits(model, head, input_ids, attention_mask, layout, activations)
        return LazyLogits(hidden[:, :-1], head, self.chunk_size), acts

    def _run(self, model, input_ids, attention_mask, layout, hidden: bool, activations=None):
        """(outputs, activations). The outputs: the model's `(B, T, V)` logits, or (`hidden`) its
        `(B, T, H)` final hidden states plus the logits and hidden state of the one position it computed
        logits for (to check the head). The activations (`Activations`, or None) in the padded layout.

        `layout(attention_mask)` gives the `Packing` to run the batch in; None runs the padded batch.
        """
        kwargs = {"use_cache": False}
        if hidden:
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        if activations is not None and activations.hidden_states:
            kwargs["output_hidden_states"] = True

        def call(**inputs):
            captured: dict[str, list[torch.Tensor]] = {}
            with _capturing(model, activations, captured):
                return model(**inputs, **kwargs), captured

        checked = self._packing_checked.get(id(model))
        packing = layout(attention_mask) if layout is not None and checked is not False else None
        if packing is not None and checked and not packing.saves:
            packing = None  # no padding to drop (checked models only: see below)
        if packing is None:
            return self._outputs(*call(input_ids=input_ids, attention_mask=attention_mask), hidden, activations)
        result = self._outputs(*call(input_ids=input_ids.flatten()[packing.index], position_ids=packing.position_ids,
                                     attention_mask=packing.mask_for(_attn_implementation(model))),
                               hidden, activations, unpack=packing.unpack)
        if checked is None:
            # Packing relies on the model building its attention mask from position_ids: check it once,
            # on the first batch whatever its padding, so that every process runs the same forwards
            # (ZeRO-3 gathers parameters collectively in each one). The padded run keeps its graph, so a
            # failed check returns it without a third forward.
            padded = self._outputs(*call(input_ids=input_ids, attention_mask=attention_mask), hidden, activations)
            got, want = (result[0][0], padded[0][0]) if hidden else (result[0], padded[0])
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
    def _outputs(out, captured, hidden: bool, activations, unpack=lambda x: x):
        acts = None
        if activations is not None:  # in the padded layout, position t: the one that predicts token t+1
            acts = {kind: [unpack(t)[:, :-1] for t in tensors] for kind, tensors in captured.items()}
            if activations.hidden_states:
                acts["hidden_states"] = [unpack(h)[:, :-1] for h in out.hidden_states[1:]]
        if not hidden:
            return unpack(out.logits), acts
        return (unpack(out.hidden_states[-1]), out.logits[:, -1:], out.hidden_states[-1][:, -1:]), acts


@contextmanager
def _capturing(model: nn.Module, activations: Activations | None, into: dict[str, list[torch.Tensor]]):
    """While active, the output of each module of `model` matching `activations.modules` is averaged
    over its last dimension and appended to `into[kind]` (detached). No hooks stay on the model."""
    if activations is None or not activations.modules:
        yield
        return
    patterns = [(kind, re.compile(pattern)) for kind, pattern in activations.modules]

    def keep(kind, module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(tensor) and tensor.dim() == 3:
            into.setdefault(kind, []).append(tensor.detach().mean(-1))

    hooks = [module.register_forward_hook(partial(keep, kind))
             for name, module in _modules_of(model).named_modules()
             for kind, pattern in patterns if pattern.search(name)]
    if not hooks:
        raise ValueError(f"{type(model).__name__}: no module name matches the activations the loss reads "
                         f"({', '.join(p for _, p in activations.modules)})")
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _modules_of(model: nn.Module) -> nn.Module:
    """The module tree a (wrapped) model runs: a LoRA reference view (`AdapterDisabled`) runs its policy's."""
    policy = getattr(model, "policy", None)
    return policy if isinstance(policy, nn.Module) else model


def _right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask as bool, refused unless every row is 1s then 0s (packing assumes it)."""
    real = attention_mask.bool()
    if not torch.equal(real, torch.arange(real.shape[1], device=real.device) < real.sum(-1, keepdim=True)):
        raise ValueError("model.padding_free / model.prefix_sharing need right-padded batches (1s then 0s in every "
                         "attention mask row); set them to false for this collator")
    return real


def _attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation of a (possibly wrapped: DDP, DeepSpeed, PEFT) transformers model."""
    for _ in range(4):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config._attn_implementation
        model = getattr(model, "module", None)
        if model is None:
            return None
    return None


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
        owner: `(R, L)` for layouts that need their own attention mask (`shared_prompts`): the
            sequence each slot belongs to (its row in the batch), -1 for the row's shared prompt, -2
            for the tail; None for plain packing (transformers builds the mask from the position ids).
        shares: `(R, L)` bool, the slot's sequence attends to the row's shared prompt.
    """

    index: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    real: torch.Tensor
    saves: bool
    owner: torch.Tensor | None = None
    shares: torch.Tensor | None = None

    def mask_for(self, attn_implementation: str | None) -> torch.Tensor | None:
        """The 4D attention mask `(R, 1, L, L)` to give the model, or None (plain packing).

        A slot attends to the earlier slots of its own sequence and, for a response that shares the
        row's prompt, to that prompt. sdpa takes it as bool (True: attend); eager adds it, so there it
        is additive fp32 (0 or the fp32 minimum), which bf16/fp16 scores are promoted to.
        """
        if self.owner is None:
            return None
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"model.prefix_sharing needs a 4D attention mask, which attn_implementation "
                             f"{attn_implementation!r} does not take; set model.attn_implementation=sdpa (or eager) "
                             "or model.prefix_sharing=false")
        q, kv = self.owner.unsqueeze(-1), self.owner.unsqueeze(-2)
        prompt = (kv == -1) & self.shares.unsqueeze(-1)
        causal = self.position_ids.unsqueeze(-2) <= self.position_ids.unsqueeze(-1)
        allowed = (((q == kv) | prompt) & causal).unsqueeze(1)
        if attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    @classmethod
    def shared_prompts(cls, attention_mask: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                       n_responses: int) -> Packing:
        """One row per example: its prompt once, then each of its responses (prefix sharing).

        Rows `r·B + i` of the concatenated batch are response r of example i; a prompt is the
        positions before the first label. The responses whose prompt is the same ids as the first
        response's share one copy of it: they continue its position ids and attend to it, never to
        each other. A response with a prompt of its own (NPO's retain) is a whole sequence in the row.
        """
        real = _right_padded(attention_mask)
        rows, t = real.shape
        b = rows // n_responses
        lengths = real.sum(-1).tolist()
        labelled = labels != -100
        prompts = torch.where(labelled.any(-1), labelled.int().argmax(-1), real.sum(-1)).tolist()
        plan = []  # per example: [(batch row, slot where its own tokens start, first own token, shares)]
        for i in range(b):
            p = prompts[i]
            start, members = p, []
            for r in range(n_responses):
                k = r * b + i
                shares = prompts[k] == p and torch.equal(input_ids[k, :p], input_ids[i, :p])
                first = p if shares else 0
                members.append((k, start, first, shares))
                start += lengths[k] - first
            plan.append((p, start, members))
        width = max(used for _, used, _ in plan)
        index = torch.zeros(b, width, dtype=torch.long)
        positions = torch.zeros(b, width, dtype=torch.long)
        owner = torch.full((b, width), -2, dtype=torch.long)
        shares_prompt = torch.zeros(b, width, dtype=torch.bool)
        source = torch.zeros(rows, t, dtype=torch.long)
        for i, (p, used, members) in enumerate(plan):
            index[i, :p] = i * t + torch.arange(p)
            positions[i, :p] = torch.arange(p)
            owner[i, :p] = -1
            for k, start, first, shares in members:
                n = lengths[k] - first
                index[i, start:start + n] = k * t + torch.arange(first, lengths[k])
                positions[i, start:start + n] = torch.arange(first, lengths[k])
                owner[i, start:start + n] = k
                shares_prompt[i, start:start + n] = shares
                if shares:
                    source[k, :p] = i * width + torch.arange(p)
                source[k, first:lengths[k]] = i * width + start + torch.arange(n)
            positions[i, used:] = torch.arange(width - used)
        device = attention_mask.device
        return cls(index.to(device), positions.to(device), source.to(device), real, b * width < rows * t,
                   owner.to(device), shares_prompt.to(device))

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The packing of a right-padded batch."""
        real = _right_padded(attention_mask)
        b, t = real.shape
        lengths = real.sum(-1).tolist()
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
