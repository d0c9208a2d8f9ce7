"""SparsePO — Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse
Token Masks", arXiv:2410.05102, eqs. 6–9 (spec/losses.md part 2 §2); official code huawei-noah/HEBO
`SparsePO/` @ee6112d (`sparse_trainer.py`, `mapo_trainer.py`, `mask_models.py`).

With Δ_t = logπθ(y_t|·) − logπref(y_t|·), a reward mask m^u and a KL mask m^d over response tokens,
U(y) = Σ_t m^u_t·Δ_t and D(y) = Σ_t m^d_t·KL(πref‖πθ)_t (full vocabulary):

    L = −log σ(β·[U(y_w) − U(y_l) − (D(y_l) − D(y_w))]) + λ_u·Σ_y ‖m^u(y)‖₁ + λ_d·Σ_y ‖m^d(y)‖₁

With all masks equal to 1 this is exactly TDPO₁ (no α, no stop-gradient). When one common mask
serves both reward and KL the official code halves λ_u and λ_d; so does this one.

Masks (``mask``), read from the reference model's activations, which the loss declares
(`Needs.activations`) and the forward pass supplies, per response and aligned with the log-probs
under every forward switch (packing, prefix sharing, chunked logits). As in the official code, the
mask of response token y_t is computed from the activations at the position that *predicts* y_t
(`mapo_trainer.py::concatenated_forward`, ``actv[:len_chosen, :-1]``; `pipeline_gpt2.py`,
``mask([x[:, :-1, :] for x in reference_states[1:]], ...)``), the position whose logits give
log π(y_t|·).

* ``activation`` (MaPO, ``pref_optim=mapo``): one mask from the reference model's activations, no
  learned parameters. Each hooked tensor is averaged over its hidden dimension, z-scored over the
  response tokens, min-max rescaled to [0, 1] over the response, and set to 0 outside it; masks are
  averaged within each hook type, then across types. Hooked (Llama-family module names, see
  `ACTIVATION_HOOKS`): MLP activations, attention q/k/v projections and output, each layer's
  residual output, the embedding and the final norm. Departures: the rotary q/k (not modules in HF
  models) and the logits (computed in chunks here) are not hooked; a response whose activations are
  constant (or that has one token) gets mask 1 instead of the official code's NaN (0/0).
* ``learned`` (``pref_optim=sparse``, ``mask_model=simple_all``): heads over the reference model's
  hidden states of every layer as `output_hidden_states` gives them minus the embedding output
  (``hidden_states[1:]``; in HF Llama and GPT-2 the last of them is after the final norm): a shared
  LayerNorm, one Linear(H, 1) + ReLU per layer, their outputs concatenated through Linear(L, 1, no
  bias) + ReLU. Values are ≥ 0 and unbounded above; ReLU's zeros give the sparsity.
  ``independent_masks=false`` (common) uses one head for both masks, true uses two. The heads are
  trained by this loss, with their own weight decay (``mask_weight_decay``, 0.01), and saved in
  checkpoints with the loss state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.chunked import token_kl
from alignlab.losses.base import (
    Activations,
    Loss,
    LossInputs,
    LossOutput,
    Needs,
    PrepareContext,
    preference_metrics,
    register,
)

#: MaPO hook type -> regex on the reference model's module names (Llama family; GPT-2 style names too).
#: "residual" is each decoder layer's output, "final_norm" the model's last norm.
ACTIVATION_HOOKS = {
    "mlp": r"\.mlp\.act(_fn)?$",
    "q": r"\.(q_proj|attn\.q)$",
    "k": r"\.(k_proj|attn\.k)$",
    "v": r"\.(v_proj|attn\.v)$",
    "attn_out": r"\.(o_proj|attn\.c_proj)$",
    "residual": r"layers\.\d+$|\.h\.\d+$",
    "embed": r"embed_tokens$|\.wte$",
    "final_norm": r"model\.norm$|\.ln_f$",
}
MASKS = ("activation", "learned")


@dataclass
class SparsePOConfig:
    name: str = "sparsepo"
    #: README: IMDB/TL;DR 0.8, HH 0.1; config default 0.1.
    beta: float = 0.1
    #: activation (MaPO) | learned.
    mask: str = "learned"
    #: learned masks only: separate reward and KL heads (true) or one common head (false, default).
    independent_masks: bool = False
    #: λ_u, λ_d: L1 sparsity weights (config default 0; HH sparse-common 0.001).
    lambda_u: float = 0.0
    lambda_d: float = 0.0
    #: weight decay of the learned mask heads.
    mask_weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.mask not in MASKS:
            raise ValueError(f"loss.mask must be one of {', '.join(MASKS)}; got {self.mask!r}")
        if self.lambda_u < 0 or self.lambda_d < 0:
            raise ValueError("loss.lambda_u and loss.lambda_d must be >= 0")
        if self.mask == "activation" and (self.independent_masks or self.lambda_u or self.lambda_d):
            raise ValueError(
                "the activation mask (MaPO) is one common mask with no L1 term: "
                "leave loss.independent_masks=false, loss.lambda_u=0, loss.lambda_d=0"
            )


class MaskHead(nn.Module):
    """The learned mask over all L layers' hidden states: LayerNorm → L × (Linear(H,1)+ReLU) →
    Linear(L,1)+ReLU."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.per_layer = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(layers))
        self.mix = nn.Linear(layers, 1, bias=False)

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """`hidden_states`: L tensors `(B, T, H)` -> mask `(B, T)`, ≥ 0."""
        if len(hidden_states) != len(self.per_layer):
            raise ValueError(
                f"sparsepo: the mask head reads {len(self.per_layer)} layers' hidden states, "
                f"the reference gave {len(hidden_states)}"
            )
        dtype = self.norm.weight.dtype
        per_layer = [F.relu(head(self.norm(h.to(dtype)))) for head, h in zip(self.per_layer, hidden_states)]
        return F.relu(self.mix(torch.cat(per_layer, -1))).squeeze(-1)


def activation_mask(activations: dict[str, list[torch.Tensor]], response: torch.Tensor) -> torch.Tensor:
    """MaPO's mask `(B, T)` from hidden-dimension means `(B, T)` of each hooked tensor, by hook type."""
    maps = []
    for tensors in activations.values():
        maps.append(
            torch.stack(
                [_rescale(t if t.dtype == torch.float64 else t.float(), response) for t in tensors]
            ).mean(0)
        )
    return torch.stack(maps).mean(0) * response


def _rescale(values: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """z-score, then min-max to [0, 1], over each row's response tokens; 1 where the range is 0."""
    n = response.sum(-1, keepdim=True).clamp(min=1)
    mean = (values * response).sum(-1, keepdim=True) / n
    std = (((values - mean) ** 2 * response).sum(-1, keepdim=True) / n).sqrt()
    z = torch.where(std > 0, (values - mean) / std.clamp(min=1e-12), torch.zeros_like(values))
    big = torch.finfo(z.dtype).max
    low = torch.where(response, z, big).amin(-1, keepdim=True)
    high = torch.where(response, z, -big).amax(-1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (z - low) / span.clamp(min=1e-12), torch.ones_like(z)) * response


@register("sparsepo", SparsePOConfig)
class SparsePO(Loss):
    """Preference optimisation with sparse token-level reward and KL masks (module docstring)."""

    summary = "token masks on the reward and the KL: activation (MaPO) or learned sparse masks"
    paper = "Christopoulou et al. 2024, arXiv:2410.05102"
    options = {"mask": MASKS}
    numeric_options = {
        "mask_weight_decay": "the mask heads' weight decay: an optimizer setting, no term of the loss"
    }

    def __init__(self, cfg: SparsePOConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleDict()
        #: one mask serves both the reward and the KL: the official code then halves λ_u and λ_d
        self.common = cfg.mask == "activation" or not cfg.independent_masks
        if cfg.mask == "activation":
            activations = Activations(modules=tuple(ACTIVATION_HOOKS.items()))
        else:
            activations = Activations(hidden_states=True)
        self.needs = Needs(reference=True, full_logits=True, activations=activations)

    def prepare(self, ctx: PrepareContext) -> None:
        """Learned masks: build the heads (trained with the policy) for the model's hidden size and depth."""
        if self.cfg.mask == "learned" and not self.heads:
            self.build_heads(ctx.architecture.hidden_size, ctx.architecture.num_hidden_layers)

    def build_heads(self, hidden: int, layers: int) -> None:
        """The learned mask heads over `layers` hidden states of width `hidden`."""
        for name in ("common",) if self.common else ("reward", "kl"):
            self.heads[name] = MaskHead(hidden, layers)

    def param_groups(self) -> list[dict]:
        """The mask heads' optimizer group, with their own weight decay."""
        params = [p for p in self.heads.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.cfg.mask_weight_decay}] if params else []

    # -- the loss -----------------------------------------------------------------------------------
    def _masks(self, batch: LossInputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Reward and KL masks per response, `(B, T-1)` aligned with the token log-probs."""
        reward, kl = {}, {}
        for n in ("chosen", "rejected"):
            acts, response = batch.reference[n].activations, batch.policy[n].mask
            if acts is None:
                raise ValueError("sparsepo: the batch carries no reference activations (Needs.activations)")
            if self.cfg.mask == "activation":
                reward[n] = kl[n] = activation_mask(acts, response)
            elif not self.heads:
                raise ValueError("sparsepo: the learned mask heads were not built; call prepare() first")
            else:
                hidden = acts["hidden_states"]
                reward[n] = self.heads["common" if self.common else "reward"](hidden) * response
                kl[n] = reward[n] if self.common else self.heads["kl"](hidden) * response
        return reward, kl

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        m_u, m_d = self._masks(batch)
        u, d, seq_kl, l1 = {}, {}, {}, 0.0
        scale = 0.5 if self.common else 1.0
        for n in ("chosen", "rejected"):
            policy, reference = batch.policy[n], batch.reference[n]
            delta = policy.token_logps - reference.token_logps
            kl_t = token_kl(reference.logits, policy.logits) * policy.mask
            u[n] = (m_u[n] * delta).sum(-1)
            d[n] = (m_d[n] * kl_t).sum(-1)
            seq_kl[n] = kl_t.sum(-1)
            l1 = l1 + scale * (cfg.lambda_u * m_u[n].abs().sum(-1) + cfg.lambda_d * m_d[n].abs().sum(-1))
        logits = u["chosen"] - u["rejected"] - (d["rejected"] - d["chosen"])
        losses = F.softplus(-cfg.beta * logits) + l1
        metrics = preference_metrics(
            batch, cfg.beta * (u["chosen"] - d["chosen"]), cfg.beta * (u["rejected"] - d["rejected"])
        )
        for n in ("chosen", "rejected"):
            tokens = batch.policy[n].mask
            metrics[f"SeqKL/{n}"] = seq_kl[n].detach().mean()
            metrics[f"MaskKL/{n}"] = d[n].detach().mean()
            metrics[f"Weights/{n}_sparsity"] = (
                ((m_u[n] == 0) & tokens).sum().float().detach() / tokens.sum().clamp(min=1) * 100
            )
            metrics[f"Weights/{n}_l1_norm"] = m_u[n].detach().abs().sum(-1).mean()
        return LossOutput(losses, metrics)
