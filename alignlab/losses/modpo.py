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
implicit and reward-model margins are computed once, before training (`MODPO.prepare`), and stored
as per-example columns ``margin<k>_chosen`` / ``margin<k>_rejected``: the same values, one forward
pass per example instead of one per epoch.

Metrics, as the official `get_batch_metrics`: ``rewards/chosen|rejected`` = h(y_w), h(y_l),
``rewards/margins``, ``rewards/accuracies`` (official: ``accuracy``, train only), and
``logps/chosen|rejected|margins`` of the policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from alignlab.losses import register
from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, PrepareContext, preference_metrics
from alignlab.losses.dpo import log_ratios

LOSS_TYPES = ("sigmoid", "hinge")
MARGIN_KINDS = ("column", "length", "implicit", "reward_model")
#: margins scored by a model once before training, stored as columns `margin<k>_<response>`.
PRECOMPUTED = ("implicit", "reward_model")
PAIR = ("chosen", "rejected")
#: pairs per forward pass when scoring margins in `prepare`.
SCORING_BATCH = 16
#: logits positions per chunk when scoring (no `(B, T, V)` fp32 logits; see alignlab.chunked).
SCORING_CHUNK = 128


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
            raise ValueError(f"{where}.column names the data fields <column>_chosen/<column>_rejected of a "
                             f"kind=column margin, and only of one; got kind={self.kind}, "
                             f"column={self.column!r}")
        if wants_model != bool(self.model):
            raise ValueError(f"{where}.model is the model of a kind=implicit or kind=reward_model margin, "
                             f"and only of one; got kind={self.kind}, model={self.model!r}")
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
            raise ValueError(f"loss.weights[0] (w₀, the weight of the pairs trained on) must be > 0, got "
                             f"{self.weights[0] if self.weights else 'no weights'}")
        self.margins = [m if isinstance(m, MarginConfig) else MarginConfig(**m) for m in self.margins]
        if len(self.margins) != len(self.weights) - 1:
            raise ValueError(f"loss.margins must hold one margin per weight after w₀: {len(self.weights)} "
                             f"loss.weights need {len(self.weights) - 1} loss.margins, got "
                             f"{len(self.margins)}")
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

    summary = "multi-objective DPO: pairs of one objective, margin rewards of the others (Zhou et al. 2024)"

    @property
    def needs(self) -> Needs:
        def fields(kinds: tuple[str, ...]) -> tuple[str, ...]:
            margins = enumerate(self.cfg.margins, start=1)
            return tuple(margin_field(k, margin, response) for k, margin in margins if margin.kind in kinds
                         for response in PAIR)

        return Needs(reference=True, fields=fields(("column",)), prepared_fields=fields(PRECOMPUTED))

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

    # -- margins scored once, before training ---------------------------------------------------------
    def prepare(self, ctx: PrepareContext) -> None:
        """Score every implicit / reward-model margin on the train and eval pairs; add them as columns."""
        from alignlab.models import ModelError

        for k, margin in enumerate(self.cfg.margins, start=1):
            if margin.kind not in PRECOMPUTED:
                continue
            try:
                scorer = implicit_scorer if margin.kind == "implicit" else reward_model_scorer
                score = scorer(margin, ctx)
            except ModelError as err:
                raise ModelError(f"loss.margins[{k - 1}].model: {err}") from None
            for split in ("train", "eval"):
                dataset = getattr(ctx, split)
                if dataset is None:
                    continue
                scores = {response: [] for response in PAIR}
                for rows in _batches(dataset):
                    for response, values in score(rows).items():
                        scores[response] += values
                for response in PAIR:
                    dataset = dataset.add_column(margin_field(k, margin, response), scores[response])
                setattr(ctx, split, dataset)
            print(f"modpo: margin {k} ({margin.kind} {margin.model}) scored on the train and eval pairs")


def _batches(dataset) -> Iterator[list[dict]]:
    """The pairs of a tokenized dataset, `SCORING_BATCH` rows at a time."""
    columns = dataset.select_columns(["prompt_ids", *(f"{r}_ids" for r in PAIR)])
    for chunk in columns.iter(batch_size=SCORING_BATCH):
        yield [dict(zip(chunk, values)) for values in zip(*chunk.values())]


def implicit_scorer(margin: MarginConfig, ctx: PrepareContext):
    """A function of a batch of rows giving r = β_k·(S_model(y) − S_ref(y)) for chosen and rejected."""
    from alignlab.data import PreferenceCollator
    from alignlab.forward import concatenated_forward
    from alignlab.models import load_frozen

    model = load_frozen(margin.model, ctx.model, ctx.tokenizer, ctx.seed).to(ctx.device)
    collate = PreferenceCollator(ctx.tokenizer.pad_token_id, responses=PAIR)

    @torch.no_grad()
    def score(rows: list[dict]) -> dict[str, list[float]]:
        batch = {key: value.to(ctx.device) for key, value in collate(rows).items()}
        ours = concatenated_forward(model, batch, PAIR, chunk_size=SCORING_CHUNK)
        ref = concatenated_forward(ctx.reference, batch, PAIR, chunk_size=SCORING_CHUNK)
        return {r: (margin.beta * (ours[r].logps - ref[r].logps)).tolist() for r in PAIR}

    return score


def reward_model_scorer(margin: MarginConfig, ctx: PrepareContext):
    """A function of a batch of rows giving the reward model's score of prompt + response."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignlab.models import DTYPES, ModelError, freeze

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            margin.model, num_labels=1, dtype=DTYPES[ctx.model.dtype], trust_remote_code=ctx.model.trust_remote_code,
            use_safetensors=True)
    except OSError as err:
        raise ModelError(f"cannot load the sequence-classification reward model {margin.model!r}: "
                         f"{err}") from None
    model = freeze(model).to(ctx.device)
    try:  # the reward model's own tokenizer; the policy's when its folder has none
        tokenizer = AutoTokenizer.from_pretrained(margin.model)
    except (OSError, ValueError):
        tokenizer = ctx.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    same_tokens = tokenizer.get_vocab() == ctx.tokenizer.get_vocab()
    eos = ctx.tokenizer.eos_token_id

    @torch.no_grad()
    def score(rows: list[dict]) -> dict[str, list[float]]:
        out = {}
        for r in PAIR:
            ids = [row["prompt_ids"] + _without_eos(row[f"{r}_ids"], eos) for row in rows]
            if same_tokens:  # the policy's own ids: nothing lost to decoding
                encoded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            else:
                encoded = tokenizer([ctx.tokenizer.decode(x) for x in ids], return_tensors="pt", padding=True)
            out[r] = model(**encoded.to(ctx.device)).logits[:, 0].float().tolist()
        return out

    return score


def _without_eos(ids: list[int], eos: int) -> list[int]:
    """A response's ids without the EOS the pipeline appended (the reward model's tokenizer adds its own)."""
    return ids[:-1] if ids and ids[-1] == eos else ids
