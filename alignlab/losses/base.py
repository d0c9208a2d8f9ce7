"""The loss contract: what a loss declares it needs, what it receives, and what it returns.

A loss never sees a model or a batch dict. The trainer reads `Loss.needs`, computes exactly that
(reference pass or not, full-vocabulary logits or not, which responses), packs it into one
`LossInputs`, and gets back per-example losses plus detached metrics. The trainer turns the
per-example losses into the back-propagated scalar in one place (`alignlab.trainer.reduce_loss`),
so no loss can make the objective depend on batch size, gradient accumulation or world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Needs:
    """What a loss asks of the trainer and the data pipeline.

    Attributes:
        reference: run a frozen reference model on every response (DPO family). Reference-free
            losses (ASFT, TPO, SimPO) set False and no reference model is ever loaded.
        full_logits: keep full-vocabulary logits `(B, T, V)` for every response (TDPO, SparsePO,
            AlignDistil). Sequence-level losses leave it False and only get per-token log-probs.
        logits_on_prompt: the full logits are read at prompt positions too (`SequenceLogps.input_mask`,
            e.g. NPO+KL's retain KL). Otherwise they are computed at response positions only
            (`model.skip_unused_logits`) and read as zeros elsewhere.
        responses: the responses each example carries; the data pipeline serves exactly these.
            Each name is a column of the data rows, sharing the row's prompt: ("chosen", "rejected")
            for pairs, ("gold", "chosen", "rejected") for TPO triples, ("completion",) for
            unpaired feedback (paired data is unpaired into one row per response). The name
            "retain" is special: it is the completion of a row drawn from `data.retain`, with that
            row's own prompt (NPO's retain set). A response listed in `own_prompts` has a prompt of
            its own in the same row instead.
        fields: extra per-example scalar columns of the data, passed through to the loss as `(B,)`
            tensors, e.g. ("label",) for unpaired feedback (True = desirable).
        prepared_fields: per-example columns the loss adds itself in `Loss.prepare` (e.g. BCO's
            density-ratio weights); collated like `fields`, but not looked for in the data.
        teachers: extra frozen models run on every response like the reference, as
            (name, path) pairs (AlignDistil's DPO and reverse-DPO teachers). Loaded through the
            reference's loading path; their outputs arrive in `LossInputs.teachers[name]`.
        activations: internal activations of the reference model the loss reads (SparsePO's
            masks), supplied by the forward pass in `SequenceLogps.activations` of the reference.
        scores: per-response scores of other frozen models (`Score`: MODPO's margin rewards),
            computed once before training and served as per-example fields.
        mismatched: (new response, source response) pairs: each example gets, as response `new`
            (which must be listed in `responses`), the `source` completion of *another* example,
            after the example's own prompt (KTO's mismatched pairs (x_i, y_j), j ≠ i, for its KL
            estimate). Built by the data pipeline from the tokenized rows (`alignlab.data.mismatched`),
            collated and run like any response.
        own_prompts: responses (listed in `responses`) that each come with a prompt of their own, read
            from the row's ``<response>_prompt`` column (JPO's ``chosen_prompt`` and
            ``rejected_prompt``: preferences between responses to different instructions) and served
            as ``<response>_prompt_ids``; a row that lacks one, or has an empty one, is a bad row. When
            every response has its own prompt, the row's ``prompt`` (held-out samples, mismatched
            pairing) is the first response's.
    """

    reference: bool = True
    full_logits: bool = False
    logits_on_prompt: bool = False
    responses: tuple[str, ...] = ("chosen", "rejected")
    fields: tuple[str, ...] = ()
    prepared_fields: tuple[str, ...] = ()
    teachers: tuple[tuple[str, str], ...] = ()
    activations: Activations | None = None
    scores: tuple[Score, ...] = ()
    mismatched: tuple[tuple[str, str], ...] = ()
    own_prompts: tuple[str, ...] = ()

    def data_shape(self) -> dict[str, tuple]:
        """What the data pipeline serves (`alignlab.data.check_data_needs` / `build_datasets` keyword
        arguments): a need of the data's shape is added here and in the pipeline, not at each call site."""
        return {
            "responses": self.responses,
            "fields": self.fields,
            "mismatched": self.mismatched,
            "own_prompts": self.own_prompts,
        }

    @property
    def score_fields(self) -> tuple[str, ...]:
        """The per-example fields `scores` fill: `<score>_<response>` for each response."""
        return tuple(f"{score.name}_{response}" for score in self.scores for response in self.responses)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Every per-example field a batch carries to the loss: data, prepared and scored fields."""
        return (*self.fields, *self.prepared_fields, *self.score_fields)


@dataclass(frozen=True)
class Score:
    """A frozen model's score of every response, declared by a loss (`Needs.scores`): the pipeline
    (`alignlab.scorers`) computes it once before training, on the train and eval rows, and serves it
    as the per-example fields `<name>_<response>` (`(B,)` tensors in `LossInputs.fields`). A loss
    never loads a model itself.

    Attributes:
        name: prefix of the fields, e.g. ``"margin1"``.
        kind: ``"log_ratio"``: S_model(y) − S_ref(y), the response's log-probability summed over its
            tokens under the causal LM `model` minus under the run's reference (a DPO model's implicit
            reward divided by its β); ``"reward_model"``: the score of a sequence-classification model
            on prompt + response.
        model: the model's folder or hub id.
        option: the config key that names the model (e.g. ``"loss.margins[0].model"``), for errors.
    """

    name: str
    kind: str
    model: str
    option: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f"Score.kind must be one of {', '.join(SCORE_KINDS)}; got {self.kind!r}")


#: the kinds of `Score` the pipeline computes.
SCORE_KINDS = ("log_ratio", "reward_model")


@dataclass(frozen=True)
class Activations:
    """Internal activations of the reference model, declared by a loss (`Needs.activations`).

    The forward pass supplies them in the layout of the log-probs: per response, un-packed, position
    t holding the activation at the position that *predicts* token t+1 (the position whose logits
    give `token_logps[:, t]`), whatever `model.padding_free` / `model.prefix_sharing` did.

    Attributes:
        hidden_states: every layer's hidden states as the model returns them with
            `output_hidden_states=True`, minus the embedding output (`hidden_states[1:]`: L tensors
            `(B, T, H)`; in HF Llama and GPT-2 the last is taken after the final norm), under the key
            ``"hidden_states"``.
        modules: (kind, regular expression on module names) pairs: the output of every module whose
            name matches, averaged over its last (hidden) dimension, `(B, T)` each, listed under its kind.
    """

    hidden_states: bool = False
    modules: tuple[tuple[str, str], ...] = ()


@dataclass
class SequenceLogps:
    """Per-token log-probabilities of one set of responses under one model.

    Attributes:
        token_logps: `(B, T)` log p(y_t | x, y_<t), zero where `mask` is False. Always fp32.
        mask: `(B, T)` bool, True on response tokens (prompt and padding are False).
        logits: `(B, T, V)` logits aligned with `token_logps`, only when `Needs.full_logits`: a
            dense tensor, or `alignlab.chunked.LazyLogits` computed a chunk of positions at a time.
            Use `alignlab.chunked.per_token` / `token_kl` to work with either.
        mean_logit: `(B,)` mean logit over response tokens and vocabulary, detached; for metrics.
        input_mask: `(B, T)` bool, True at every position that predicts a token of the sequence
            (prompt or response): `attention_mask[:, 1:]`. For sequence-wide terms such as NPO's
            retain KL; it does not depend on how much padding the batch has.
        activations: the reference's activations a loss declared in `Needs.activations`, by kind
            (``"hidden_states"`` or a module kind), each a list of `(B, T, …)` tensors aligned with
            `token_logps`; None otherwise.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    input_mask: torch.Tensor | None = None
    activations: dict[str, list[torch.Tensor]] | None = None

    @property
    def logps(self) -> torch.Tensor:
        """`(B,)` summed log-probability of each response: the spec's logπ(y|x)."""
        return self.token_logps.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """`(B,)` number of response tokens |y|."""
        return self.mask.sum(-1)

    @property
    def mean_logps(self) -> torch.Tensor:
        """`(B,)` length-averaged log-probability logπ(y|x)/|y|."""
        return self.logps / self.lengths.clamp(min=1)


@dataclass
class LossInputs:
    """Everything a loss may read, keyed by response name (see `Needs.responses`).

    Attributes:
        policy: response name -> `SequenceLogps` of the trained model (with gradient).
        reference: response name -> `SequenceLogps` of the frozen reference (no gradient), or None
            when the loss declared `Needs(reference=False)`.
        fields: extra per-example tensors named in `Needs.fields`, each `(B,)`.
        training: True during training steps, False in evaluation (stateful losses such as BCO
            update running statistics only in training).
        teachers: teacher name -> response name -> `SequenceLogps` (no gradient), for
            `Needs.teachers`.
        step: the token counts of the whole optimizer step (`StepTokens`), which batch-wide token
            means divide by so that k micro-batches or N processes give the objective of one batch;
            None outside training steps (the means are then over this batch).
    """

    policy: dict[str, SequenceLogps]
    reference: dict[str, SequenceLogps] | None = None
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    training: bool = True
    teachers: dict[str, dict[str, SequenceLogps]] = field(default_factory=dict)
    step: StepTokens | None = None

    def token_mean_share(self, values: torch.Tensor, name: str, positions: bool = False) -> torch.Tensor:
        """Per-example shares `(B,)` of a mean over every token of the optimizer step's batch.

        `values` `(B,)` holds each example's sum over its tokens of response `name` (or over its
        `input_mask` positions, with `positions`). The trainer averages per-example losses over
        each micro-batch, divides by the micro-batches of the step and averages over processes, so
        an example of a micro-batch of b counts `1 / (b · micro_batches)`; its share
        `values · b · micro_batches / N`, N the step's token count, makes the objective
        `Σ values / N` over the whole step, however it is split. Without `step`: this batch's mean.
        """
        seq = self.policy[name]
        mask = seq.input_mask if positions else seq.mask
        if self.step is None:
            return values * mask.shape[0] / mask.sum().clamp(min=1)
        total = (self.step.positions if positions else self.step.tokens)[name]
        return values * (mask.shape[0] * self.step.micro_batches / max(total, 1))


@dataclass(frozen=True)
class StepTokens:
    """Token counts of one optimizer step (every micro-batch of the accumulation, every process).

    Attributes:
        tokens: response name -> its response tokens (`SequenceLogps.mask`) in the step.
        positions: response name -> its `input_mask` positions in the step.
        micro_batches: micro-batches averaged in the step: accumulation steps × processes.
    """

    tokens: dict[str, int]
    positions: dict[str, int]
    micro_batches: int


@dataclass
class LossOutput:
    """Per-example losses `(B,)` and scalar metrics (detached) to log."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PrepareContext:
    """What `Loss.prepare` may use before training starts (after data and models are loaded).

    A loss may replace `train` / `eval` with datasets that carry extra columns it declared in
    `Needs.prepared_fields` (e.g. BCO's density-ratio weights). `reference` is there for user code a
    loss calls (BCO's `embedding=module:function`); a loss itself never runs a model.
    """

    reference: nn.Module | None
    tokenizer: object
    train: object
    eval: object | None
    device: torch.device
    seed: int
    #: the run's `ModelConfig`: extra models a loss loads (e.g. MODPO's margin models) use its settings.
    model: object = None
    #: the policy's transformers config (`hidden_size`, `num_hidden_layers`), for losses that size
    #: parameters of their own (SparsePO's mask heads).
    architecture: object = None
    #: prompts (lists of token ids) -> `(N, H)` embeddings: the reference's last hidden state
    #: mean-pooled over each prompt's tokens (`alignlab.scorers.prompt_embedder`), supplied by the
    #: pipeline when there is a reference (BCO's UDM classifier), so that a loss never runs a model.
    embed_prompts: Callable[[list[list[int]]], torch.Tensor] | None = None


#: the end-of-run summary's lines for a pairwise loss: eval metric key -> line format.
PAIRWISE_HEADLINE = {
    "eval_rewards/accuracies": "held-out accuracy {:.3f} (chance 0.5)",
    "eval_rewards/margins": "held-out margin   {:.3f}",
}
#: the curves every loss gets when it logs them (train and eval_): `alignlab.report.plot_curves`.
STANDARD_CURVES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


class Loss(nn.Module):
    """Base class of every registered loss.

    A subclass declares what it is in class attributes (`summary`, `paper`, `options`, `headline`,
    `curves`, `needs`), takes its config dataclass in `__init__`, and implements `forward`. When what
    it needs depends on the config, its `__init__` sets `self.needs`. State a loss owns (running
    means, fitted classifiers, learned heads) lives in its buffers and parameters: the trainer saves
    it in every checkpoint and restores it on resume.
    """

    #: what the trainer and the data pipeline compute for it; a subclass whose needs depend on its
    #: config sets `self.needs` in `__init__`.
    needs: Needs = Needs()
    #: one-line description for `alignlab list` and the docs.
    summary: ClassVar[str] = ""
    #: the paper, "Authors Year, arXiv:ID" (`alignlab list`).
    paper: ClassVar[str] = ""
    #: string options with a fixed set of values (config field -> the values), e.g.
    #: ``{"loss_type": ("sigmoid", "ipo", "hinge")}``; `alignlab list` and the registry-generated
    #: tests enumerate them (boolean options are enumerated without being declared).
    options: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: numeric options (int / float config fields) as the registry-generated tests run them, each at a
    #: value other than its default (`losses.numeric_cases`): option -> the config of its case (the value
    #: and any option it applies under, e.g. ``{"loss_type": "exo_pair", "exo_epsilon": 0.01}``), or a
    #: string, the reason no batch's losses can show it. Undeclared: half the default (0.1 for 0), alone.
    numeric_options: ClassVar[dict[str, dict[str, object] | str]] = {}
    #: the eval figures worth a line in the end-of-run summary: eval metric key -> line format.
    headline: ClassVar[dict[str, str]] = PAIRWISE_HEADLINE
    #: metrics of its own to plot in `curves.png` besides `STANDARD_CURVES`, when it logs them.
    curves: ClassVar[tuple[str, ...]] = ()
    #: non-empty (the reason) when the loss's state is updated with every forward batch by definition,
    #: so that k micro-batches of b differ from one batch of k·b (BCO's running reward mean δ). Every
    #: other loss gives the same step however the batch is split (tests/losses/test_invariance_steps.py).
    per_batch_state: ClassVar[str] = ""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    def prepare(self, ctx: PrepareContext) -> None:
        """Optional one-off work before training (fit a classifier, add columns). Default: nothing."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups for the loss's own trainable parameters (e.g. mask heads). Default: none."""
        return []

    def forward(self, batch: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def batch_token_mean_nll(batch: LossInputs, name: str) -> torch.Tensor:
    """Per-example shares `(B,)` of the token-mean NLL of response `name` over the whole batch.

    Some official codes add one cross-entropy averaged over *all* response tokens of the batch
    (HF `outputs.loss`; TPO's gold NLL, NPO's retain NLL). Written per example (`token_mean_share`),
    it goes through the one batch-mean reduction like every other term, and its denominator is the
    token count of the optimizer step, so gradient accumulation and data parallelism give exactly
    the objective of one large batch (HF Trainer's `num_items_in_batch` does the same for SFT).
    """
    return batch.token_mean_share(-batch.policy[name].logps, name)


#: how a loss's NLL term averages over tokens (`nll_shares`): one token mean over the optimizer step's
#: batch (the official codes' `outputs.loss`), or each response's own token mean.
NLL_REDUCTIONS = ("batch_token_mean", "sequence_mean")


def nll_shares(batch: LossInputs, name: str, reduction: str) -> torch.Tensor:
    """Per-example shares `(B,)` of the NLL of response `name` (TPO's gold, CPO's and ORPO's chosen),
    reduced as `reduction` (one of `NLL_REDUCTIONS`)."""
    if reduction == "batch_token_mean":
        return batch_token_mean_nll(batch, name)
    return -batch.policy[name].mean_logps


def shaped_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape r_α(s) = (1 − e^{−α·s})/α of a log-prob s (Gupta et al. 2025, §3); s
    itself at α = 0 (SimPO, CPO)."""
    if alpha == 0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def preference_metrics(
    batch: LossInputs, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The standard pairwise metrics (spec, "Shared conventions"), computed from detached values.

    Args:
        batch: the loss inputs (for log-probs and logits of the policy).
        chosen_rewards: `(B,)` implicit rewards of the chosen responses.
        rejected_rewards: `(B,)` implicit rewards of the rejected responses.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    chosen, rejected = batch.policy["chosen"], batch.policy["rejected"]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # strict: a tie counts as wrong, as in TRL and the DPO repo
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.logps.detach().mean(),
        "logps/rejected": rejected.logps.detach().mean(),
    }
    if chosen.mean_logit is not None and rejected.mean_logit is not None:
        metrics["logits/chosen"] = chosen.mean_logit.mean()
        metrics["logits/rejected"] = rejected.mean_logit.mean()
    return metrics


def unpaired_metrics(
    completion: SequenceLogps, rewards: torch.Tensor, desirable: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The metrics of unpaired feedback (BCO, KTO; as TRL): `rewards/chosen|rejected` and
    `logps/chosen|rejected`, means over the desirable / undesirable examples of the batch (a kind
    absent from the batch is left out), and `rewards/margins` when both are there.

    Args:
        completion: the policy's `SequenceLogps` of the completions.
        rewards: `(B,)` implicit rewards.
        desirable: `(B,)` bool labels.
    """
    metrics = {}
    for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if sel.any():  # a batch may hold only one kind
            metrics[f"rewards/{name}"] = rewards.detach()[sel].mean()
            metrics[f"logps/{name}"] = completion.logps.detach()[sel].mean()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


@dataclass(frozen=True)
class Entry:
    """A registered loss: its name (`loss=<name>`), config dataclass and `Loss` class."""

    name: str
    config: type
    loss: type[Loss]


#: name -> `Entry` of every registered loss (filled by `register` as `alignlab.losses` imports them).
REGISTRY: dict[str, Entry] = {}


def register(name: str, config: type):
    """Class decorator: register `cls` under `name` with its config dataclass `config`.

    The config dataclass must have a `name: str` field defaulting to `name`; it becomes the Hydra
    option `loss=<name>`. It lives here, beside the contract, so that a loss file imports nothing of
    alignlab but this module and `alignlab.chunked`.
    """

    def wrap(cls: type[Loss]) -> type[Loss]:
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        if getattr(config, "name", None) != name:
            raise ValueError(f"{config.__name__}.name must default to {name!r}")
        if not cls.paper:
            raise ValueError(f"loss {name!r} declares no paper (Loss.paper)")
        REGISTRY[name] = Entry(name, config, cls)
        cls.registry_name = name
        return cls

    return wrap


def log_ratios(batch: LossInputs, length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ(y_w), ρ(y_l): policy minus reference log-probs of chosen and rejected, `(B,)` each (summed
    over tokens; averaged over them with `length_normalize`)."""
    pick = "mean_logps" if length_normalize else "logps"
    ref = batch.reference
    chosen = getattr(batch.policy["chosen"], pick) - getattr(ref["chosen"], pick)
    rejected = getattr(batch.policy["rejected"], pick) - getattr(ref["rejected"], pick)
    return chosen, rejected
