"""MODPO — Zhou et al. 2024, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct
Preference Optimization", arXiv:2310.03708, §3 (the MODPO loss L_MODPO) (spec/losses.md part 2 §4);
read in the official code ZHZisZZ/modpo @2e2df20, `MODPOTrainer.modpo_loss` and `get_batch_metrics`.

Weights w = (w₀, …, w_K): w₀ belongs to the preference pairs being trained on (objective 0), w_k
(k ≥ 1) to fixed margin rewards r_k of the other objectives. With S(y) the log-probability of a
response summed over its tokens and the SFT model as reference:

    h(y) = (1/w₀)·[β·(S_θ(y) − S_ref(y)) − Σ_{k≥1} w_k·r_k(x, y)]
    L    = −log σ(h(y_w) − h(y_l))              (hinge: max(0, 1 − (h(y_w) − h(y_l))))

At the optimum β·log(π_θ/π_ref) = w₀·r₀ + Σ_k w_k·r_k: the policy optimises the weighted sum of all
objectives although only objective 0 comes as preference pairs here, and sweeping w traces the
Pareto front. With no margins (w = (w₀,)) it is DPO with β/w₀.

Margin rewards (`MarginConfig.kind`), each scoring both (x, y_w) and (x, y_l):

* ``column``: scores in the data, the per-example fields ``<column>_chosen`` / ``<column>_rejected``.
* ``length``: r = −|y|, the number of response tokens (EOS included), from the masks; the paper's
  summarisation example uses it with w = (1, 0.1). The official code counts the tokenizer's ids of
  the response text (with BOS, without EOS): a constant offset, which cancels in h(y_w) − h(y_l).
* ``implicit``: r = β_k·(S_m(y) − S_ref(y)), the implicit reward of a DPO-trained model m against the
  same SFT reference (the official beavertails example: a DPO model of the "safer" pairs).
* ``reward_model``: the score of a sequence-classification reward model on prompt + response (the
  official repository's issue #4): the policy's token ids when the reward model's tokenizer (from
  its folder, else the policy's) has the same vocabulary, else the text decoded and re-tokenized.

The official code runs the margin scorers on every batch under no-grad. They never change, so here
implicit and reward-model margins are declared as `Needs.scores` and computed once by the pipeline
before training (`alignlab.scorers`), as per-example fields ``margin<k>_chosen`` /
``margin<k>_rejected`` (for ``implicit``, S_m(y) − S_ref(y), which the loss multiplies by β_k): the
same values, one forward pass per example instead of one per epoch.

Metrics, as the official `get_batch_metrics`: ``rewards/chosen|rejected`` = h(y_w), h(y_l),
``rewards/margins``, ``rewards/accuracies`` (official: ``accuracy``, train only), and
``logps/chosen|rejected|margins`` of the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from alignlab.losses.base import (
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    Score,
    log_ratios,
    preference_metrics,
    register,
)

LOSS_TYPES = ("sigmoid", "hinge")
MARGIN_KINDS = ("column", "length", "implicit", "reward_model")
#: margins scored by a model once before training (`Needs.scores`), as fields `margin<k>_<response>`.
PRECOMPUTED = {"implicit": "log_ratio", "reward_model": "reward_model"}
PAIR = ("chosen", "rejected")


@dataclass
class MarginConfig:
    """One margin reward r_k of another objective (module docstring).

    Validated by `MODPOConfig`, which knows its position (``loss.margins[i]``).
    """

    #: column | length | implicit | reward_model.
    kind: str = MISSING
    #: column: the data's fields `<column>_chosen` and `<column>_rejected` hold the scores.
    column: Optional[str] = None
    #: implicit: a DPO-trained causal LM (a folder, e.g. `${stage:margin}/model`); reward_model: a
    #: sequence-classification reward model.
    model: Optional[str] = None
    #: implicit: β_k in r = β_k·(S_model − S_ref), the β the margin model was trained with.
    beta: float = 0.1

    def check(self, where: str) -> None:
        """Raise ValueError naming `where` (e.g. ``loss.margins[0]``) for an unusable margin."""
        if self.kind not in MARGIN_KINDS:
            raise ValueError(f"{where}.kind must be one of {', '.join(MARGIN_KINDS)}; got {self.kind!r}")
        wants_column, wants_model = self.kind == "column", self.kind in PRECOMPUTED
        if wants_column != bool(self.column):
            raise ValueError(
                f"{where}.column names the data fields <column>_chosen/<column>_rejected of a "
                f"kind=column margin, and only of one; got kind={self.kind}, "
                f"column={self.column!r}"
            )
        if wants_model != bool(self.model):
            raise ValueError(
                f"{where}.model is the model of a kind=implicit or kind=reward_model margin, "
                f"and only of one; got kind={self.kind}, model={self.model!r}"
            )
        if self.beta <= 0:
            raise ValueError(f"{where}.beta must be > 0, got {self.beta}")


@dataclass
class MODPOConfig:
    name: str = "modpo"
    #: β of the policy's implicit reward (official default 0.1).
    beta: float = 0.1
    #: w₀, w₁, …, w_K: w₀ > 0 weighs the pairs trained on, w_k the k-th margin. E.g. [0.5, 0.5].
    weights: List[float] = field(default_factory=lambda: [1.0])
    #: the margin rewards r_1 … r_K of the other objectives, one per weight after w₀.
    margins: List[MarginConfig] = field(default_factory=list)
    #: sigmoid | hinge.
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not self.weights or not self.weights[0] > 0:
            raise ValueError(
                f"loss.weights[0] (w₀, the weight of the pairs trained on) must be > 0, got "
                f"{self.weights[0] if self.weights else 'no weights'}"
            )
        self.margins = [m if isinstance(m, MarginConfig) else MarginConfig(**m) for m in self.margins]
        if len(self.margins) != len(self.weights) - 1:
            raise ValueError(
                f"loss.margins must hold one margin per weight after w₀: {len(self.weights)} "
                f"loss.weights need {len(self.weights) - 1} loss.margins, got "
                f"{len(self.margins)}"
            )
        for i, margin in enumerate(self.margins):
            margin.check(f"loss.margins[{i}]")
            if margin.column and margin.column in (m.column for m in self.margins[:i]):
                raise ValueError(f"loss.margins[{i}].column={margin.column!r} is used by an earlier margin")


def margin_field(k: int, margin: MarginConfig, response: str) -> str:
    """The per-example field holding r_k of `response` (k counts from 1, as w_k)."""
    return f"{margin.column}_{response}" if margin.kind == "column" else f"margin{k}_{response}"


@register("modpo", MODPOConfig)
class MODPO(Loss):
    """Multi-objective DPO with fixed margin rewards (module docstring)."""

    summary = "multi-objective DPO: pairs of one objective, margin rewards of the others"
    paper = "Zhou et al. 2024, arXiv:2310.03708"
    options = {"loss_type": LOSS_TYPES}

    def __init__(self, cfg: MODPOConfig) -> None:
        super().__init__(cfg)
        margins = list(enumerate(cfg.margins, start=1))
        columns = tuple(margin_field(k, m, r) for k, m in margins if m.kind == "column" for r in PAIR)
        scores = tuple(
            Score(f"margin{k}", PRECOMPUTED[m.kind], m.model, option=f"loss.margins[{k - 1}].model")
            for k, m in margins
            if m.kind in PRECOMPUTED
        )
        self.needs = Needs(reference=True, fields=columns, scores=scores)

    def margin_rewards(self, batch: LossInputs, response: str) -> torch.Tensor:
        """Σ_k w_k·r_k(x, y) of `response`, `(B,)`."""
        logps = batch.policy[response].logps
        total = torch.zeros_like(logps)
        weighted = zip(self.cfg.weights[1:], self.cfg.margins, strict=True)
        for k, (weight, margin) in enumerate(weighted, start=1):
            if margin.kind == "length":
                reward = -batch.policy[response].lengths.to(logps.dtype)
            else:
                reward = batch.fields[margin_field(k, margin, response)].to(logps.dtype)
                if margin.kind == "implicit":  # the field is S_m(y) − S_ref(y)
                    reward = margin.beta * reward
            total = total + weight * reward
        return total

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        chosen_ratio, rejected_ratio = log_ratios(batch)
        chosen = (cfg.beta * chosen_ratio - self.margin_rewards(batch, "chosen")) / cfg.weights[0]
        rejected = (cfg.beta * rejected_ratio - self.margin_rewards(batch, "rejected")) / cfg.weights[0]
        if cfg.loss_type == "sigmoid":
            losses = F.softplus(-(chosen - rejected))
        else:  # hinge
            losses = torch.relu(1 - (chosen - rejected))
        metrics = preference_metrics(batch, chosen, rejected)
        metrics["logps/margins"] = metrics["logps/chosen"] - metrics["logps/rejected"]
        return LossOutput(losses, metrics)
