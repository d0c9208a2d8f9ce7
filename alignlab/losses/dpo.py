"""DPO — Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.

Variants (spec/losses.md §1):
  * ``sigmoid``: −log σ(β·h), with h = ρ(y_w) − ρ(y_l) and ρ = logπθ − logπref (summed over tokens).
  * cDPO (``sigmoid`` with ``label_smoothing`` = ε > 0): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    (Mitchell 2023, "A note on DPO with noisy preferences"); its minimum is at σ(β·h) = 1 − ε.
  * ``ipo``: (h − 1/(2β))², Azar et al. 2023, arXiv:2310.12036, eq. 17, β playing the role of τ.
    The paper and the official DPO repo use summed log-probs (default); TRL and LLaMA-Factory
    divide each log-prob by its response length: set ``ipo_length_normalize=true`` for that form.
  * ``hinge``: max(0, 1 − β·h), SLiC (Zhao et al. 2023) normalised by the reference; β acts as 1/margin.

TRL 1.16's DPO variants (``DPOTrainer`` ``loss_type``; each defined by its paper as DPO with another loss
of the same log-ratios, hence options here; docs/losses.md, "DPO variants"):
  * ``sigmoid_norm``: −log σ(β·(ρ(y_w)/|y_w| − ρ(y_l)/|y_l|)), length-normalised DPO.
  * ``exo_pair``: EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16 (K = 2): KL(q‖p) with q = σ(±β·h) and
    p = (1 − ε, ε), ε = ``exo_epsilon`` (the paper's 1e-3; TRL's ``label_smoothing``).
  * ``nca_pair``: NCA, Chen et al. 2024, arXiv:2402.05369: −log σ(βρ_w) − ½log σ(−βρ_w) − ½log σ(−βρ_l).
  * ``sppo_hard``: SPPO with hard labels, Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P ∈ {0, 1}:
    (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².
  * ``apo_zero`` / ``apo_down``: D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7 / 8:
    (1 − σ(βρ_w)) + σ(βρ_l)  /  σ(βρ_w) + (1 − σ(β(ρ_w − ρ_l))).
  * ``aot`` / ``aot_unpaired``: AOT, Melnyk et al. 2024, arXiv:2406.05882 (as TRL computes it): the
    cDPO loss of δ_k = (k-th smallest of the batch's policy margins S(y_w) − S(y_l)) − (k-th smallest of the
    reference margins), or, unpaired, (k-th smallest ρ_w) − (k-th smallest ρ_l); the k-th loss is reported
    on the example of rank k. It couples the examples of a batch (`Loss.per_batch_state`).
  * ``discopop``: Chan et al. 2024, arXiv:2406.08414, eq. 5 (log-ratio modulated loss): with z = β·h and
    w = σ(z/τ), (1 − w)·(−log σ(z)) + w·e^{−z}, τ = ``discopop_tau`` (0.05).
DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228, the DPOP loss; "eq. 3" as other implementations
cite it, not checked against the PDF: docs/losses.md): ``dpop``,
−log σ(β·(h − λ·max(0, −ρ(y_w)))), λ = ``dpop_lambda`` (the paper's 50): the penalty max(0, log πref(y_w) −
log πθ(y_w)) is inside β and the sigmoid, and is non-zero only while the chosen response is less likely than
under the reference.
f-DPO (Wang et al. 2023, arXiv:2309.16240): ``f_divergence`` replaces each log-ratio ρ by f'(π/πref) of
another f-divergence in the forms built on h (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, discopop):
reverse_kl ρ (DPO), forward_kl 1 − e^{−ρ}, js_divergence log 2 + log σ(ρ), alpha_divergence
(e^{(a−1)ρ} − 1)/(a − 1), a = ``f_alpha_divergence_coef`` (TRL's parameterisation).
LD-DPO (Liu et al. 2024, arXiv:2409.06411): ``ld_alpha`` = α < 1 weighs the tokens of the longer response
beyond the shorter one's length by α in every log-prob, policy and reference (1: DPO).
WPO (Zhou et al. 2024, arXiv:2406.11827, the weighted objective, eq. 2 as TRL cites it): ``wpo=true``
multiplies each pair's loss by w(y_w)·w(y_l), w(y) = exp((1/|y|) Σ_t [log πθ(y_t|·) − log Σ_v πθ(v|·)²])
under the policy, without gradient (TRL's ``use_weighting``); it reads the full-vocabulary logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.chunked import per_token
from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, log_ratios, preference_metrics, register

LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "sigmoid_norm",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "aot",
    "aot_unpaired",
    "dpop",
)
#: forms that pair the batch's sorted log-ratios by rank (an example's loss depends on its batch)
AOT = ("aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: the forms built on h = ρ(y_w) − ρ(y_l), where f-DPO's log Z(x) cancels (TRL accepts the same ones)
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "discopop")
#: forms that average each response's score over its tokens
NORMALIZED = ("sigmoid_norm",)


@dataclass
class DPOConfig:
    name: str = "dpo"
    #: strength of the implicit KL anchor to the reference; larger stays closer (spec default 0.1).
    beta: float = 0.1
    #: one of sigmoid | ipo | hinge.
    loss_type: str = "sigmoid"
    #: cDPO's ε, the assumed probability that a label is flipped; sigmoid only. 0 gives plain DPO.
    label_smoothing: float = 0.0
    #: IPO only: length-average the log-probs (TRL's form) instead of summing them (paper, default).
    ipo_length_normalize: bool = False
    #: f-DPO's divergence: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence.
    f_divergence: str = "reverse_kl"
    #: the α-divergence's coefficient a (TRL's f_alpha_divergence_coef, 0.5).
    f_alpha_divergence_coef: float = 0.5
    #: EXO's ε, the target probability of the rejected response (the paper's 1e-3).
    exo_epsilon: float = 1e-3
    #: DiscoPOP's τ, the temperature of its mixing weight (the paper's 0.05).
    discopop_tau: float = 0.05
    #: DPOP's λ ≥ 0, the weight of its penalty max(0, log πref(y_w) − log πθ(y_w)) (the paper's 50).
    dpop_lambda: float = 50.0
    #: LD-DPO's α ∈ [0, 1], the weight of the tokens past the shorter response's length (1: DPO).
    ld_alpha: float = 1.0
    #: WPO's off-policy weights w(y_w)·w(y_l) on each pair's loss (TRL's use_weighting; full logits).
    wpo: bool = False

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"loss.label_smoothing (cDPO's ε) must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.label_smoothing and self.loss_type not in ("sigmoid", *AOT):
            raise ValueError(
                "loss.label_smoothing is cDPO: it applies to loss_type=sigmoid only (and AOT's), "
                f"not {self.loss_type!r}; "
                "set loss.label_smoothing=0 (for noisy labels with other forms see the rdpo loss)"
            )
        if self.ipo_length_normalize and self.loss_type != "ipo":
            raise ValueError("loss.ipo_length_normalize applies to loss_type=ipo only")
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(
                f"loss.f_divergence must be one of {', '.join(F_DIVERGENCES)}; got {self.f_divergence!r}"
            )
        if self.f_divergence != "reverse_kl" and self.loss_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"loss.f_divergence={self.f_divergence} applies to loss_type "
                f"{', '.join(F_DIVERGENCE_TYPES)} (where log Z(x) cancels), "
                f"not {self.loss_type!r}"
            )
        if self.f_alpha_divergence_coef == 1.0 and self.f_divergence == "alpha_divergence":
            raise ValueError("loss.f_alpha_divergence_coef=1 is reverse KL: set loss.f_divergence=reverse_kl")
        if not 0.0 < self.exo_epsilon < 1.0:
            raise ValueError(f"loss.exo_epsilon must be in (0, 1), got {self.exo_epsilon}")
        if self.discopop_tau <= 0:
            raise ValueError(f"loss.discopop_tau must be > 0, got {self.discopop_tau}")
        if self.dpop_lambda < 0:
            raise ValueError(f"loss.dpop_lambda (DPOP's λ) must be >= 0, got {self.dpop_lambda}")
        if not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"loss.ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.loss_type in AOT and (self.ld_alpha != 1.0 or self.wpo):
            raise ValueError(
                f"loss.loss_type={self.loss_type} sorts the batch: loss.ld_alpha and loss.wpo "
                "do not apply (TRL refuses them too)"
            )
        if self.ld_alpha != 1.0 and self.ipo_length_normalize:
            raise ValueError("loss.ld_alpha weighs summed log-probs: set loss.ipo_length_normalize=false")


def ld_log_ratios(batch: LossInputs, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's ρ(y_w), ρ(y_l): tokens past the shorter response's length count α, policy and reference."""
    shared = torch.minimum(batch.policy["chosen"].lengths, batch.policy["rejected"].lengths)
    out = []
    for name in ("chosen", "rejected"):
        pol, ref = batch.policy[name], batch.reference[name]
        position = pol.mask.long().cumsum(-1)  # 1, 2, ... on response tokens
        weight = torch.where(position <= shared[:, None], 1.0, alpha).to(pol.token_logps.dtype) * pol.mask
        out.append((weight * (pol.token_logps - ref.token_logps)).sum(-1))
    return out[0], out[1]


def wpo_weight(seq) -> torch.Tensor:
    """WPO's w(y) = exp(token mean of log π(y_t) − log Σ_v π(v)²), `(B,)`, without gradient."""
    with torch.no_grad():
        log_sum_sq = per_token(lambda z: torch.logsumexp(2 * z.log_softmax(-1), -1), seq.logits)
        aligned = ((seq.token_logps - log_sum_sq) * seq.mask).sum(-1)
        return torch.exp(aligned / seq.lengths.clamp(min=1))


def f_scores(ratio: torch.Tensor, divergence: str, coef: float) -> torch.Tensor:
    """f'(π/πref) of f-DPO's divergence, from the log-ratio ρ (TRL's forms)."""
    if divergence == "forward_kl":
        return -torch.expm1(-ratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if divergence == "alpha_divergence":
        return torch.expm1((coef - 1) * ratio) / (coef - 1)
    return ratio


@register("dpo", DPOConfig)
class DPO(Loss):
    """Direct Preference Optimization and its sigmoid/cDPO, IPO and hinge forms (module docstring)."""

    summary = (
        "DPO with cDPO, IPO, hinge, length-normalised, EXO, NCA, SPPO-hard, APO, DiscoPOP, AOT, DPOP forms; "
        "f-DPO divergences; LD-DPO; WPO weights"
    )
    paper = "Rafailov et al. 2023, arXiv:2305.18290"
    options = {"loss_type": LOSS_TYPES, "f_divergence": F_DIVERGENCES}
    numeric_options = {
        "f_alpha_divergence_coef": {"f_divergence": "alpha_divergence", "f_alpha_divergence_coef": 0.25},
        "exo_epsilon": {"loss_type": "exo_pair", "exo_epsilon": 0.01},
        "discopop_tau": {"loss_type": "discopop", "discopop_tau": 0.5},
        "dpop_lambda": {"loss_type": "dpop", "dpop_lambda": 25.0},
    }

    def __init__(self, cfg: DPOConfig) -> None:
        super().__init__(cfg)
        self.needs = Needs(reference=True, full_logits=cfg.wpo)
        if cfg.loss_type in AOT:
            self.per_batch_state = (
                "AOT pairs the sorted log-ratios of the batch by rank: an example's loss "
                "depends on the other examples of its micro-batch (as in TRL, which sorts "
                "each micro-batch), so k micro-batches of b differ from one batch of k·b"
            )

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg, beta = self.cfg, self.cfg.beta
        if cfg.ld_alpha != 1.0:
            chosen_ratio, rejected_ratio = ld_log_ratios(batch, cfg.ld_alpha)
        else:
            chosen_ratio, rejected_ratio = log_ratios(batch)
        chosen_score = f_scores(chosen_ratio, cfg.f_divergence, cfg.f_alpha_divergence_coef)
        rejected_score = f_scores(rejected_ratio, cfg.f_divergence, cfg.f_alpha_divergence_coef)
        chosen_len = batch.policy["chosen"].lengths.clamp(min=1)
        rejected_len = batch.policy["rejected"].lengths.clamp(min=1)
        if cfg.loss_type in NORMALIZED or cfg.ipo_length_normalize:  # f'(ρ)/|y| (TRL); ρ/|y| under reverse KL
            chosen_score, rejected_score = chosen_score / chosen_len, rejected_score / rejected_len
        if cfg.ipo_length_normalize:  # IPO's rewards on the token-averaged log-ratios, as before
            chosen_ratio, rejected_ratio = chosen_ratio / chosen_len, rejected_ratio / rejected_len
        h = chosen_score - rejected_score
        kind = cfg.loss_type
        if kind in ("sigmoid", "sigmoid_norm"):
            eps = cfg.label_smoothing
            losses = (1 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)
        elif kind == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            losses = torch.relu(1 - beta * h)
        elif kind == "exo_pair":  # KL((σ(βh), σ(−βh)) ‖ (1 − ε, ε))
            eps = cfg.exo_epsilon
            losses = torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log1p(-eps)) + torch.sigmoid(
                -beta * h
            ) * (F.logsigmoid(-beta * h) - math.log(eps))
        elif kind == "nca_pair":
            losses = (
                F.softplus(-beta * chosen_ratio)
                + 0.5 * F.softplus(beta * chosen_ratio)
                + 0.5 * F.softplus(beta * rejected_ratio)
            )
        elif kind == "sppo_hard":
            losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        elif kind == "apo_zero":
            losses = torch.sigmoid(-beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
        elif kind == "apo_down":
            losses = torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(-beta * h)
        elif kind in AOT:
            if kind == "aot":  # policy margins against reference margins
                pol = batch.policy["chosen"].logps - batch.policy["rejected"].logps
                ref = batch.reference["chosen"].logps - batch.reference["rejected"].logps
            else:
                pol, ref = chosen_ratio, rejected_ratio
            pol_sorted, order = torch.sort(pol)
            delta = beta * (pol_sorted - torch.sort(ref).values)
            eps = cfg.label_smoothing
            ranked = (1 - eps) * F.softplus(-delta) + eps * F.softplus(delta)
            losses = torch.empty_like(ranked).scatter(0, order, ranked)  # the k-th on the example of rank k
        elif kind == "dpop":  # Pal et al. 2024 (DPOP): the penalty inside β and the sigmoid
            penalty = torch.relu(-chosen_ratio)
            losses = F.softplus(-beta * (h - cfg.dpop_lambda * penalty))
        else:  # discopop
            z = beta * h
            mix = torch.sigmoid(z / cfg.discopop_tau)
            losses = (1 - mix) * F.softplus(-z) + mix * torch.exp(-z)
        metrics = preference_metrics(batch, beta * chosen_ratio, beta * rejected_ratio)
        if kind == "dpop":
            metrics["dpop/penalty"] = penalty.detach().mean()
        if cfg.wpo:
            weights = wpo_weight(batch.policy["chosen"]) * wpo_weight(batch.policy["rejected"])
            losses = losses * weights
            metrics["wpo/weight"] = weights.mean()
        return LossOutput(losses, metrics)
