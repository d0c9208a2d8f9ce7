"""One concatenated forward pass over every response of a batch, to per-token log-probs, run by a plan.

The plan (`ForwardPlan`) is decided once per run from the loss's `Needs` and the `model.*` switches
(`ForwardPlan.of`), then fitted once to each model it runs (`ForwardPlan.fitted`), before training,
from what that model supports (`ModelFacts`, found on a fixed synthetic batch). Calling a fitted
plan runs one forward; nothing about a model is learnt or cached while training.

Two ways to get the logits, with the same results:
* chunked (default, `model.logit_chunk_size` > 0): the model returns its final hidden states (and
  the logits of one position only); logits are computed a chunk of positions at a time
  (`alignlab.chunked`), so no `(B, T, V)` fp32 tensor is ever materialised, for sequence-level
  losses and token-level ones alike.
* dense (`model.logit_chunk_size=0`, or a model whose logits are not `head(last hidden state)`,
  e.g. with final logit soft-capping: `ModelFacts.logits_from_head`): the model's own `(B, T, V)` logits.

Optional savings, each exact (tests/test_forward_speed.py):
* `skip_unused_logits` (chunked path): the output head (with a 50k vocabulary, costlier per token
  than the whole body of a small model) runs only at the positions a loss reads: those that predict
  a response token (plus, for losses with `Needs.logits_on_prompt`, every non-padding position),
  gathered before the head. Prompt and padding positions get no logits; results are scattered back
  to `(B, T-1)` with zeros there, as the masks already make them.
* `drop_padding_mask`: a right-padded batch runs without its attention mask. Causal attention never
  lets a token see the positions after it, and padding only ever follows a row's real tokens, so
  every real position attends to exactly what the mask allowed: the same outputs there, while the
  padding positions (whose outputs no loss reads) see earlier padding too. Without a mask
  transformers' sdpa takes its `is_causal` path, whose kernels skip the blocks above the diagonal
  (half the attention work at long context) and build no `(B, 1, T, T)` mask. Only for models whose
  real positions do not change without it (`ModelFacts.causal_padding`); others keep the mask.
* `padding_free`: the rows of the concatenated batch are packed, without their padding, into as
  few rows as fit in the batch's length, with `position_ids` restarting at 0 for each sequence and
  no attention mask; transformers then builds a block-diagonal causal mask from the position ids
  (`masking_utils.find_packed_sequence_indices`), so no sequence attends to another. The hidden
  states are unpacked to the padded layout before the head. Only for models that keep packed
  sequences apart (`ModelFacts.packs`); others run padded batches, with a warning when the plan is fitted.
* `prefix_sharing`: one row per example, its prompt once and then each response, all responses
  continuing the prompt's position ids; a 4D attention mask (transformers passes 4D masks through
  unchanged) lets each response attend to the prompt and to itself, never to another response. The
  hidden states of the prompt serve every response when unpacked to the padded layout (the last
  prompt position predicts each response's first token). Exact, with sdpa or eager attention
  (others fall back to `padding_free`); checked when the plan is fitted like `padding_free`.

A batch runs packed or with shared prompts only where that is less work than the padded batch
(`layout_cost`): those rows need a mask, so their attention visits every (query, key) pair, where
the padded batch without its mask visits the causal half; at long context that outweighs the
positions packing saves.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from alignlab.chunked import LazyLogits, label_logps, per_token
from alignlab.distributed import chunkable_head
from alignlab.errors import ConfigError
from alignlab.losses.base import Activations, Needs, SequenceLogps

log = logging.getLogger(__name__)

#: layouts of a batch (`ForwardPlan.layout`): padded rows, packed rows (`padding_free`), one row per
#: example with its prompt once (`prefix_sharing`).
LAYOUTS = ("padded", "packed", "shared_prompts")


@dataclass(frozen=True)
class ModelFacts:
    """What the forward pass needs to know about one model, found once when a plan is fitted to it.

    Why a probe. Both facts are properties of the architecture, but not ones its config states:
    logits may be transformed after the head under many names (Gemma 2's `final_logit_softcapping`,
    Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`, remote code:
    anything), and whether packed sequences stay apart depends on how the modeling code builds its
    mask (OPT uses transformers' `create_causal_mask` but without the position ids, so its packed
    sequences attend to each other; Falcon-H1's Mamba layers ignore them), not on the attention
    implementation alone. So `of` runs the model on a fixed synthetic batch of three short
    examples (never the user's data): padded, comparing its logits with the head applied to its
    final hidden states, and packed, comparing those hidden states with the padded ones. It runs under
    `torch.no_grad`, in eval mode, when the plan is fitted (before training, in the same order on
    every process, so the forwards ZeRO-3 runs collectively stay in step), and never again.
    tests/test_forward_speed.py checks the decisions against the models' behaviour on other batches,
    for several architectures, and tests/test_forward.py that soft-capped logits get dense ones.

    Attributes:
        name: the model's class name, for messages.
        logits_from_head: the model's logits are `head(final hidden state)`: chunked logits are exact
            (None: not checked, the plan has dense logits).
        packs: the plan's layout (packed rows, or shared prompts with their 4D mask) gives the padded
            batch's final hidden states: the model keeps the sequences apart (None: not checked).
        attn_implementation: the model's attention implementation (prefix sharing's 4D mask needs
            sdpa or eager), or None.
        causal_padding: the padded batch run without its attention mask gives the same final hidden
            states at its real positions: the model's attention is causal and nothing else reads the
            mask (None: not checked, the plan keeps the mask).
        hidden_size: the config's `hidden_size` (None: not stated), for `ForwardPlan.pair_weight`.
    """

    name: str
    logits_from_head: bool | None
    packs: bool | None
    attn_implementation: str | None
    causal_padding: bool | None = None
    hidden_size: int | None = None

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, head: nn.Module | None, plan: ForwardPlan) -> ModelFacts:
        """The facts of `model` (possibly wrapped: DDP, DeepSpeed, PEFT) that `plan`'s switches rely on."""
        attn = _attn_implementation(model)
        name = type(model).__name__
        hidden_size = getattr(_config_of(model), "hidden_size", None)
        drops_mask = not plan.padding_mask  # padded batches (any layout falls back to them) run unmasked
        if not plan.chunk_size and plan.layout == "padded" and not drops_mask:
            return cls(name, None, None, attn, None, hidden_size)  # nothing to check
        batch = _probe_batch(plan.responses, _device_of(model))
        ids, mask = batch["ids"], batch["mask"]
        real = mask.bool()
        was_training = model.training
        model.eval()
        try:
            padded = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hidden = padded.hidden_states[-1]
            from_head = packs = causal = None
            tol = 1e-4 if hidden.dtype in (torch.float32, torch.float64) else 5e-2  # half: kernel noise
            if plan.chunk_size and head is not None:  # the same op as in the model: close in any dtype
                from_head = torch.allclose(
                    chunkable_head(head)(hidden)[real].float(),
                    padded.logits[real].float(),
                    atol=1e-4,
                    rtol=1e-3,
                )
            if plan.layout != "padded":  # final hidden states: logits of a random model hide a difference
                packing = _packing(plan.layout, ids, mask, batch["labels"], len(plan.responses))
                packed = model(
                    input_ids=ids.flatten()[packing.index],
                    position_ids=packing.position_ids,
                    attention_mask=packing.mask_for(attn),
                    output_hidden_states=True,
                    use_cache=False,
                )
                unpacked = packing.unpack(packed.hidden_states[-1])
                packs = torch.allclose(unpacked[real].float(), hidden[real].float(), atol=tol, rtol=tol)
            if drops_mask:
                unmasked = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
                causal = torch.allclose(unmasked[real].float(), hidden[real].float(), atol=tol, rtol=tol)
        finally:
            model.train(was_training)
        return cls(name, from_head, packs, attn, causal, hidden_size)


def _probe_batch(responses: tuple[str, ...], device) -> dict[str, torch.Tensor]:
    """Three examples (prompts of 3, 2, 1 tokens, which all responses share) as the forward runs them: the
    rows of every response concatenated (`ids`, `mask`, `labels`), right-padded, uneven enough that
    packing saves rows; ids below 16, in any vocabulary."""
    rows = [
        (prompt, completion)
        for k in range(len(responses))
        for prompt, completion in (([5, 6, 7], [8 + k, 9, 10 + k]), ([7, 5], [11 - k]), ([6], [9 + k]))
    ]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        ids[i, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
    return {"ids": ids.to(device), "mask": (ids != 0).long().to(device), "labels": labels.to(device)}


def _packing(
    layout: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, n_responses: int
) -> Packing | None:
    """The `Packing` of a concatenated batch in `layout` (`LAYOUTS`), None for padded rows."""
    if layout == "shared_prompts":
        return Packing.shared_prompts(
            attention_mask, input_ids=input_ids, labels=labels, n_responses=n_responses
        )
    return Packing.of(attention_mask) if layout == "packed" else None


def _device_of(model: nn.Module) -> torch.device:
    """Where the model runs (that of the policy's parameters, for a LoRA reference view)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(_modules_of(model).parameters()).device


@dataclass(frozen=True)
class ForwardPlan:
    """How the forward pass runs, decided once per run (`of`) and fitted once to each model (`fitted`).

    Attributes:
        responses: the response names to run, in order (`Needs.responses`).
        full_logits: give each `SequenceLogps` its `(B, T-1, V)` logits (lazy when chunked).
        logits_on_prompt: the full logits are read at prompt positions too (`Needs.logits_on_prompt`),
            not only at response positions.
        activations: collect these activations of the model (`Needs.activations`, for the live
            reference only) into `SequenceLogps.activations`, in the padded layout, aligned with the
            log-probs.
        chunk_size: positions per logits chunk; 0 for dense logits.
        skip_unused_logits: evaluate the head only at the positions the loss reads (chunked path).
        layout: one of `LAYOUTS` (module docstring); `shared_prompts` wins over `packed`.
        padding_mask: give the model the attention mask of a padded batch; False (`drop_padding_mask`):
            right-padded batches run without it (module docstring).
        padding_free: `padding_free` was asked for too (the layout prefix sharing falls back to).
        pair_weight: the cost of one (query, key) pair of attention in units of one position's
            matmuls, `1 / (6 · hidden_size)` of the fitted model (a layer's matmuls are about 12·h²
            weights, 24·h² FLOPs per position; its attention 4·h FLOPs per pair); 0 before fitting.
            Each batch runs in the plan's layout only where that is less work (`layout_cost`) than
            the padded batch: at long context the packed rows' masked attention outweighs what the
            padding saves.
        attn_implementation: the fitted model's (`ModelFacts`), for prefix sharing's 4D mask.
    """

    responses: tuple[str, ...] = ("chosen", "rejected")
    full_logits: bool = False
    logits_on_prompt: bool = False
    activations: Activations | None = None
    chunk_size: int = 0
    skip_unused_logits: bool = True
    layout: str = "padded"
    padding_mask: bool = True
    padding_free: bool = False
    pair_weight: float = 0.0
    attn_implementation: str | None = None

    @classmethod
    def of(
        cls,
        needs: Needs,
        *,
        logit_chunk_size: int = 0,
        skip_unused_logits: bool = True,
        padding_free: bool = False,
        prefix_sharing: bool = False,
        drop_padding_mask: bool = False,
        reference_mode: str = "live",
        loss_name: str = "",
    ) -> ForwardPlan:
        """The run's plan from the loss's needs and the `model.*` switches, or a one-line `ConfigError`
        for settings that cannot give the loss what it needs (before any model loads).

        Every other combination of the switches (`logit_chunk_size`, `skip_unused_logits`,
        `padding_free`, `prefix_sharing`, `drop_padding_mask`, `reference_mode`) gives every loss the
        same losses and gradients (tests/losses/test_invariance.py)."""
        if reference_mode == "precomputed":
            if not needs.reference:
                raise ConfigError(
                    f"loss {loss_name!r} is reference-free: model.reference_mode=precomputed "
                    "has no reference to precompute; remove it"
                )
            if needs.full_logits or needs.activations is not None:
                what = "full-vocabulary logits" if needs.full_logits else "activations"
                raise ConfigError(
                    f"loss {loss_name!r} needs the reference model's {what} at every step, which precomputed "
                    "reference log-probs do not keep; set model.reference_mode=live"
                )
        if logit_chunk_size < 0:
            raise ConfigError(f"model.logit_chunk_size must be >= 0, got {logit_chunk_size}")
        shares = prefix_sharing and len(needs.responses) > 1  # one response: no prompt to share
        layout = "shared_prompts" if shares else "packed" if padding_free else "padded"
        return cls(
            needs.responses,
            needs.full_logits,
            needs.logits_on_prompt,
            needs.activations,
            logit_chunk_size,
            skip_unused_logits,
            layout,
            not drop_padding_mask,
            padding_free,
        )

    def fitted(
        self, model: nn.Module | None, head: nn.Module | None = None, *, reference: bool = False
    ) -> ForwardPlan | None:
        """This plan for one model (None for none), decided once from its `ModelFacts`: dense logits for a
        model whose logits are not the head's, padded batches for one that does not keep packed
        sequences apart (each with a warning); the activations for the live `reference` only.

        Args:
            model: the model as it will be called.
            head: its output projection; by default `model.get_output_embeddings()`.
            reference: the model is the live reference (it collects `activations`).
        """
        if model is None:
            return None
        if head is None and hasattr(model, "get_output_embeddings"):
            head = model.get_output_embeddings()
        plan = self if head is not None else replace(self, chunk_size=0)  # no head to chunk
        attn = _attn_implementation(model)
        if plan.layout == "shared_prompts" and not _takes_4d_mask(attn):
            fallback = "packed" if plan.padding_free else "padded"
            log.warning(
                "%s: model.prefix_sharing needs a 4D attention mask, which attn_implementation %r does "
                "not take (sdpa and eager do); using %s batches",
                type(model).__name__,
                attn,
                fallback,
            )
            plan = replace(plan, layout=fallback)
        facts = ModelFacts.of(model, head, plan)
        chunk, layout = plan.chunk_size, plan.layout
        if chunk and not facts.logits_from_head:
            log.warning("%s: logits are not head(last hidden state); using dense logits", facts.name)
            chunk = 0
        if layout != "padded" and not facts.packs:
            log.warning(
                "%s: packed sequences attend to each other (the model ignores packed position_ids); "
                "using padded batches",
                facts.name,
            )
            layout = "padded"
        padding_mask = self.padding_mask or not facts.causal_padding
        if facts.causal_padding is False:
            log.warning(
                "%s: its outputs at real positions change without the attention mask (not causal-only "
                "attention); keeping the padding mask",
                facts.name,
            )
        return replace(
            self,
            chunk_size=chunk,
            layout=layout,
            padding_mask=padding_mask,
            pair_weight=1 / (6 * facts.hidden_size) if facts.hidden_size else 0.0,
            attn_implementation=facts.attn_implementation,
            activations=self.activations if reference else None,
        )

    def __call__(
        self, model: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]
    ) -> dict[str, SequenceLogps]:
        """Run `model` once on all `responses` of `batch` stacked along the batch dimension.

        Args:
            model: a causal LM (possibly wrapped by DDP / DeepSpeed / PEFT: it is only called), the one
                this plan was `fitted` to.
            head: its output projection (`get_output_embeddings()` of the unwrapped model).
            batch: the collator's output: `{r}_input_ids`, `{r}_attention_mask`, `{r}_labels` per r,
                all padded to one length.

        Returns:
            response name -> `SequenceLogps` with `(B, T-1)` tensors (position t predicts token t+1).
        """
        responses = self.responses
        head = chunkable_head(head)
        input_ids = torch.cat([batch[f"{r}_input_ids"] for r in responses])
        attention_mask = torch.cat([batch[f"{r}_attention_mask"] for r in responses])
        full_labels = torch.cat([batch[f"{r}_labels"] for r in responses])
        labels = full_labels[:, 1:]
        mask = labels != -100
        input_mask = attention_mask[:, 1:].bool()  # positions that predict a real token
        n = len(responses)
        packing = _packing(self.layout, input_ids, attention_mask, full_labels, n)
        if packing is not None and not self._pays(packing, attention_mask):
            packing = None  # the padded batch is no more work
        chunked = bool(self.chunk_size) and head is not None
        out, acts = self._run(model, input_ids, attention_mask, packing, chunked)
        logits = LazyLogits(out[:, :-1], head, self.chunk_size) if chunked else out[:, :-1]
        if self.skip_unused_logits and chunked:
            logits = logits.select(mask | input_mask if self.full_logits and self.logits_on_prompt else mask)
        # one pass of the head gives both the label log-probs and (detached) each position's mean logit
        both = per_token(_logps_and_mean_logit, logits, extras=(labels,))
        token_logps = both[..., 0] * mask
        mean_logit = (both[..., 1].detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        parts = zip(
            token_logps.chunk(n),
            mask.chunk(n),
            mean_logit.chunk(n),
            input_mask.chunk(n),
            logits.split(n) if isinstance(logits, LazyLogits) else logits.chunk(n),
        )
        result = {
            name: SequenceLogps(
                token_logps=r_logps,
                mask=r_mask,
                mean_logit=r_mean,
                input_mask=r_input,
                logits=r_logits if self.full_logits else None,
            )
            for name, (r_logps, r_mask, r_mean, r_input, r_logits) in zip(responses, parts)
        }
        if acts is not None:
            for i, name in enumerate(responses):
                result[name].activations = {kind: [t.chunk(n)[i] for t in ts] for kind, ts in acts.items()}
        return result

    def _pays(self, packing: Packing, attention_mask: torch.Tensor) -> bool:
        """`packing` is less work than the padded batch (`layout_cost`), whose attention is causal
        when it runs without a mask (`padding_mask` off, or no padding at all)."""
        rows, width = attention_mask.shape
        unmasked = packing.real.all() or not self.padding_mask
        padded = layout_cost(rows, width, self.pair_weight, causal=bool(unmasked))
        return packing.saves and layout_cost(*packing.index.shape, self.pair_weight, False) < padded

    def _run(self, model, input_ids, attention_mask, packing: Packing | None, hidden: bool):
        """(outputs, activations), both in the padded layout: the model's `(B, T, V)` logits, or
        (`hidden`) its `(B, T, H)` final hidden states; the activations (`Activations`) or None.
        `packing` (None: the padded batch) is the layout the model runs the batch in."""
        activations = self.activations
        kwargs = {"use_cache": False}
        if hidden:
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        if activations is not None and activations.hidden_states:
            kwargs["output_hidden_states"] = True
        if packing is None:
            drop = not self.padding_mask and _is_right_padded(attention_mask.bool())
            inputs = {"input_ids": input_ids, "attention_mask": None if drop else attention_mask}
            unpack = _same
        else:
            inputs = {
                "input_ids": input_ids.flatten()[packing.index],
                "position_ids": packing.position_ids,
                "attention_mask": packing.mask_for(self.attn_implementation),
            }
            unpack = packing.unpack
        captured: dict[str, list[torch.Tensor]] = {}
        with _capturing(model, activations, captured):
            out = model(**inputs, **kwargs)
        acts = None
        if activations is not None:  # in the padded layout, position t: the one that predicts token t+1
            acts = {kind: [unpack(t)[:, :-1] for t in tensors] for kind, tensors in captured.items()}
            if activations.hidden_states:
                acts["hidden_states"] = [unpack(h)[:, :-1] for h in out.hidden_states[1:]]
        return unpack(out.hidden_states[-1] if hidden else out.logits), acts


@dataclass(frozen=True)
class ModelPlans:
    """The run's `ForwardPlan` fitted once to each model a training step runs."""

    policy: ForwardPlan
    reference: ForwardPlan | None = None
    teachers: dict[str, ForwardPlan] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        plan: ForwardPlan,
        policy: nn.Module,
        reference: nn.Module | None = None,
        teachers: dict[str, nn.Module] | None = None,
        policy_head: nn.Module | None = None,
    ) -> ModelPlans:
        """`plan` fitted to each model (`ForwardPlan.fitted`); `policy_head` that of the unwrapped policy."""
        return cls(
            plan.fitted(policy, policy_head),
            plan.fitted(reference, reference=True),
            {name: plan.fitted(m) for name, m in (teachers or {}).items()},
        )


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


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

    hooks = [
        module.register_forward_hook(partial(keep, kind))
        for name, module in _modules_of(model).named_modules()
        for kind, pattern in patterns
        if pattern.search(name)
    ]
    if not hooks:
        raise ValueError(
            f"{type(model).__name__}: no module name matches the activations the loss reads "
            f"({', '.join(p for _, p in activations.modules)})"
        )
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _modules_of(model: nn.Module) -> nn.Module:
    """The module tree a (wrapped) model runs: a LoRA reference view (`AdapterDisabled`) runs its policy's."""
    policy = getattr(model, "policy", None)
    return policy if isinstance(policy, nn.Module) else model


def _is_right_padded(real: torch.Tensor) -> bool:
    """Every row of the bool mask `real` is True then False."""
    return torch.equal(real, torch.arange(real.shape[1], device=real.device) < real.sum(-1, keepdim=True))


def _right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask as bool, refused unless every row is 1s then 0s (packing assumes it)."""
    real = attention_mask.bool()
    if not _is_right_padded(real):
        raise ValueError(
            "model.padding_free / model.prefix_sharing need right-padded batches (1s then 0s in every "
            "attention mask row); set them to false for this collator"
        )
    return real


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
        kind = _shared_prompt_mask_kind(attn_implementation)
        q, kv = self.owner.unsqueeze(-1), self.owner.unsqueeze(-2)
        prompt = (kv == -1) & self.shares.unsqueeze(-1)
        causal = self.position_ids.unsqueeze(-2) <= self.position_ids.unsqueeze(-1)
        allowed = (((q == kv) | prompt) & causal).unsqueeze(1)
        if kind == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )

    @classmethod
    def shared_prompts(
        cls, attention_mask: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, n_responses: int
    ) -> Packing:
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
                index[i, start : start + n] = k * t + torch.arange(first, lengths[k])
                positions[i, start : start + n] = torch.arange(first, lengths[k])
                owner[i, start : start + n] = k
                shares_prompt[i, start : start + n] = shares
                if shares:
                    source[k, :p] = i * width + torch.arange(p)
                source[k, first : lengths[k]] = i * width + start + torch.arange(n)
            positions[i, used:] = torch.arange(width - used)
        device = attention_mask.device
        return cls(
            index.to(device),
            positions.to(device),
            source.to(device),
            real,
            b * width < rows * t,
            owner.to(device),
            shares_prompt.to(device),
        )

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
                index[r, start : start + n] = i * t + torch.arange(n)
                positions[r, start : start + n] = torch.arange(n)
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


def _config_of(model: nn.Module):
    """The transformers config of a (possibly wrapped: DDP, DeepSpeed, PEFT) model, or None."""
    for _ in range(4):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config
        model = getattr(model, "module", None)
        if model is None:
            return None
    return None


def _attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation of a (possibly wrapped: DDP, DeepSpeed, PEFT) transformers model."""
    config = _config_of(model)
    return None if config is None else config._attn_implementation


def layout_cost(rows: int, width: int, pair_weight: float, causal: bool) -> float:
    """The forward's work on `rows` rows of `width` positions, in units of one position's matmuls: each
    position costs 1, and each (query, key) pair of attention `pair_weight`; a kernel given a mask
    visits every pair, a causal one (no mask) only those with the key at or before the query."""
    pairs = width * (width + 1) / 2 if causal else width * width
    return rows * (width + pair_weight * pairs)


def _takes_4d_mask(attn_implementation: str | None) -> bool:
    return attn_implementation in ("sdpa", "eager")


def _shared_prompt_mask_kind(attn_implementation: str | None) -> str:
    """The attention implementation, refused unless it takes prefix sharing's 4D mask (sdpa, eager)."""
    if not _takes_4d_mask(attn_implementation):
        raise ConfigError(
            f"model.prefix_sharing needs a 4D attention mask, which attn_implementation "
            f"{attn_implementation!r} does not take; set model.attn_implementation=sdpa "
            "(or eager) or model.prefix_sharing=false"
        )
    return attn_implementation


def concatenated_forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    responses: tuple[str, ...],
    full_logits: bool = False,
    chunk_size: int = 0,
) -> dict[str, SequenceLogps]:
    """A one-off plan (`chunk_size`, padded batches) for an unwrapped model, run once (see `ForwardPlan`)."""
    plan = ForwardPlan(responses, full_logits, chunk_size=chunk_size).fitted(model)
    return plan(model, model.get_output_embeddings(), batch)
