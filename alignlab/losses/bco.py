"""BCO — Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
arXiv:2404.04656, eqs. 7 (reward shift) and 10 (underlying distribution matching)
(spec/losses.md §4); read in TRL's `BCOTrainer.bco_loss` and its first author's `bco_pair`.

Implicit reward r = β·(logπθ(y|x) − logπref(y|x)) (summed log-probs), reward shift δ = the running
mean of every reward seen in training so far (chosen and rejected pooled), updated with the current
batch *before* the loss is computed and only in training; it starts from count 1e-24, so the first
batch sets it. δ lives in this module's buffers: it is saved in every checkpoint and restored.

* Unpaired (default; thumbs-up/down rows ``{prompt, completion, label}``; paired data is unpaired
  by the pipeline): desirable ``softplus(−(r − δ))``, undesirable ``w(x)·softplus(r − δ)``, averaged
  over all examples of the batch (so the two counts may differ).
* UDM (``udm=true``, eq. 10): w(x) = clamp(p/(1 − p + 1e-8), 0.5, 10) for undesirable examples
  (1 for desirable), p = P(desirable | emb(x)) from a logistic regression (sklearn,
  class_weight="balanced", fitted to convergence) once before training on up to ``prompt_sample_size`` prompt
  embeddings of each class. emb(x) is, by default, the reference model's last hidden state
  mean-pooled over the prompt tokens (``embedding=reference_mean``, supplied by the pipeline as
  ``PrepareContext.embed_prompts``), or any callable named as
  ``module:function`` taking ``(list of prompt id lists, PrepareContext)`` and returning an `(N, H)`
  tensor. The fitted coefficients are buffers too. TRL enables UDM only when given an embedding
  function; the paper's full method uses it.
* Paired (``paired=true``, ``bco_pair``): ``softplus(−(r_w − δ)) + softplus(r_l − δ)`` per pair, δ the
  running mean of the per-batch mean reward. (TRL ≥ 0.29's ``bco_pair`` dropped δ; this keeps it.)

Unpaired BCO averages over 2B items, so its scale is half that of paired BCO (a sum per pair).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alignlab.losses.base import (
    PAIRWISE_HEADLINE,
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    PrepareContext,
    preference_metrics,
    register,
    unpaired_metrics,
)

UDM_WEIGHT = "udm_weight"


@dataclass
class BCOConfig:
    name: str = "bco"
    #: TRL BCOConfig default (the paper's own values could not be confirmed).
    beta: float = 0.1
    #: the paired form (bco_pair) on chosen/rejected pairs instead of unpaired binary feedback.
    paired: bool = False
    #: underlying distribution matching (density-ratio weights on undesirable examples; unpaired only).
    udm: bool = False
    #: prompts per class used to fit the UDM classifier.
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0
    #: reference_mean, or `module:function` (see the module docstring).
    embedding: str = "reference_mean"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.paired and self.udm:
            raise ValueError(
                "loss.udm weights unpaired examples by their prompt and has no effect on pairs that "
                "share one; set loss.udm=false with loss.paired=true"
            )
        if not 0 < self.min_density_ratio <= self.max_density_ratio:
            raise ValueError(
                "need 0 < loss.min_density_ratio <= loss.max_density_ratio, got "
                f"{self.min_density_ratio}, {self.max_density_ratio}"
            )
        if self.prompt_sample_size < 1:
            raise ValueError(f"loss.prompt_sample_size must be >= 1, got {self.prompt_sample_size}")


def _global_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sum tensors over data-parallel processes (identity in a single process)."""
    stacked = torch.stack([v.double() for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
    return list(stacked)


@register("bco", BCOConfig)
class BCO(Loss):
    """Binary classifier optimisation with reward shift and optional UDM (module docstring)."""

    summary = "binary classifier optimisation on thumbs-up/down feedback, reward shift δ, UDM"
    paper = "Jung et al. 2024, arXiv:2404.04656"
    headline = {**PAIRWISE_HEADLINE, "eval_delta": "reward shift δ    {:.4f}"}
    curves = ("delta",)
    #: UDM's options apply with udm=true; on the tests' rows (2 of each label) every density ratio is under
    #: 0.5: a low floor lets a sample of 1 prompt per label show, and a low cap bites
    numeric_options = {
        "prompt_sample_size": {"udm": True, "min_density_ratio": 0.01, "prompt_sample_size": 1},
        "min_density_ratio": {"udm": True, "min_density_ratio": 0.99},
        "max_density_ratio": {"udm": True, "min_density_ratio": 0.01, "max_density_ratio": 0.05},
    }
    per_batch_state = (
        "δ is the running mean of the rewards seen so far, updated with each forward batch before "
        "its loss (TRL's BCOTrainer): with gradient accumulation each micro-batch sees its own δ"
    )

    def __init__(self, cfg: BCOConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_count", torch.full((), 1e-24, dtype=torch.float64))
        self.register_buffer("udm_coef", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("udm_intercept", torch.zeros((), dtype=torch.float64))
        if cfg.paired:
            self.needs = Needs(reference=True)
        else:
            self.needs = Needs(
                reference=True,
                responses=("completion",),
                fields=("label",),
                prepared_fields=(UDM_WEIGHT,) if cfg.udm else (),
            )

    # -- the reward shift -------------------------------------------------------------------------
    def _update_delta(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """Fold a batch's reward sum and count into the running mean (TRL's RunningMoments, mean part)."""
        total, count = _global_sum(total.detach(), count)
        new_count = self.running_count + count
        self.running_mean += (total / count - self.running_mean) * count / new_count
        self.running_count.copy_(new_count)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, batch: LossInputs) -> LossOutput:
        return self._paired(batch) if self.cfg.paired else self._unpaired(batch)

    def _paired(self, batch: LossInputs) -> LossOutput:
        beta = self.cfg.beta
        chosen = beta * (batch.policy["chosen"].logps - batch.reference["chosen"].logps)
        rejected = beta * (batch.policy["rejected"].logps - batch.reference["rejected"].logps)
        if batch.training:  # δ follows the per-batch mean reward: one sample per batch (per process)
            self._update_delta(
                torch.cat([chosen, rejected]).detach().mean(), torch.ones((), dtype=torch.float64)
            )
        delta = self.running_mean.to(chosen.dtype)
        losses = F.softplus(-(chosen - delta)) + F.softplus(rejected - delta)
        metrics = preference_metrics(batch, chosen, rejected)
        metrics["delta"] = delta.detach().clone()
        return LossOutput(losses, metrics)

    def _unpaired(self, batch: LossInputs) -> LossOutput:
        completion = batch.policy["completion"]
        rewards = self.cfg.beta * (completion.logps - batch.reference["completion"].logps)
        desirable = batch.fields["label"].bool()
        if batch.training:
            self._update_delta(
                rewards.detach().sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64)
            )
        delta = self.running_mean.to(rewards.dtype)
        weight = batch.fields[UDM_WEIGHT].to(rewards.dtype) if self.cfg.udm else torch.ones_like(rewards)
        losses = torch.where(desirable, F.softplus(-(rewards - delta)), weight * F.softplus(rewards - delta))
        metrics = {"delta": delta.detach().clone(), **unpaired_metrics(completion, rewards, desirable)}
        return LossOutput(losses, metrics)

    # -- UDM ----------------------------------------------------------------------------------------
    def prepare(self, ctx: PrepareContext) -> None:
        """Fit the density-ratio classifier and add each example's weight as a column."""
        if not self.cfg.udm:
            return
        from sklearn.linear_model import LogisticRegression

        labels = [bool(x) for x in ctx.train["label"]]
        prompts = ctx.train["prompt_ids"]
        gen = torch.Generator().manual_seed(ctx.seed)
        sample = []
        for kind in (True, False):
            idx = [i for i, label in enumerate(labels) if label == kind]
            if not idx:
                raise ValueError(
                    "loss.udm=true needs both desirable and undesirable examples in the training data; "
                    "set loss.udm=false"
                )
            order = torch.randperm(len(idx), generator=gen)[: self.cfg.prompt_sample_size]
            sample += [idx[i] for i in order.tolist()]
        x = self._embed([prompts[i] for i in sample], ctx).double().cpu().numpy()
        y = [int(labels[i]) for i in sample]
        # fitted to convergence (a one-off before training): the weights are the fit's, not 1e-4 from it
        clf = LogisticRegression(class_weight="balanced", tol=1e-12, max_iter=100_000).fit(x, y)
        self.udm_coef = torch.as_tensor(clf.coef_[0], dtype=torch.float64, device=self.running_mean.device)
        self.udm_intercept.fill_(float(clf.intercept_[0]))
        ctx.train = self._with_weights(ctx.train, ctx)
        if ctx.eval is not None:
            ctx.eval = self._with_weights(ctx.eval, ctx)

    def density_ratio_weights(self, embeddings: torch.Tensor) -> torch.Tensor:
        """w = clamp(p / (1 − p + 1e-8), min, max), p = P(desirable | embedding)."""
        logits = embeddings.double().to(self.udm_coef.device) @ self.udm_coef + self.udm_intercept
        p = torch.sigmoid(logits)
        return (p / (1 - p + 1e-8)).clamp(self.cfg.min_density_ratio, self.cfg.max_density_ratio)

    def _with_weights(self, dataset, ctx: PrepareContext):
        unique: dict[tuple[int, ...], int] = {}
        for ids in dataset["prompt_ids"]:
            unique.setdefault(tuple(ids), len(unique))
        weights = self.density_ratio_weights(self._embed([list(k) for k in unique], ctx))
        per_row = [
            1.0 if label else float(weights[unique[tuple(ids)]])
            for ids, label in zip(dataset["prompt_ids"], dataset["label"])
        ]
        return dataset.add_column(UDM_WEIGHT, per_row)

    def _embed(self, prompts: list[list[int]], ctx: PrepareContext) -> torch.Tensor:
        if self.cfg.embedding != "reference_mean":
            module, _, func = self.cfg.embedding.partition(":")
            return getattr(importlib.import_module(module), func)(prompts, ctx)
        if ctx.embed_prompts is None:
            raise ValueError(
                "loss.embedding=reference_mean embeds prompts with the reference model, and this run "
                "has none; name an embedding function as loss.embedding=module:function"
            )
        return ctx.embed_prompts(prompts)
