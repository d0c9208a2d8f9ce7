"""SparsePO — Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse
Token Masks", arXiv:2410.05102, eqs. 6–9 (spec/losses.md part 2 §2); official code huawei-noah/HEBO
`SparsePO/` @ee6112d (`sparse_trainer.py`, `mapo_trainer.py`, `mask_models.py`).

With Δ_t = logπθ(y_t|·) − logπref(y_t|·), a reward mask m^u and a KL mask m^d over response tokens,
U(y) = Σ_t m^u_t·Δ_t and D(y) = Σ_t m^d_t·KL(πref‖πθ)_t (full vocabulary):

    L = −log σ(β·[U(y_w) − U(y_l) − (D(y_l) − D(y_w))]) + λ_u·Σ_y ‖m^u(y)‖₁ + λ_d·Σ_y ‖m^d(y)‖₁

With all masks equal to 1 this is exactly TDPO₁ (no α, no stop-gradient). When one common mask
serves both reward and KL the official code halves λ_u and λ_d; so does this one.

Masks (``mask``):
* ``activation`` (MaPO, ``pref_optim=mapo``): one mask from the reference model's activations, no
  learned parameters. Each hooked tensor is averaged over its hidden dimension, z-scored over the
  response tokens, min-max rescaled to [0, 1] over the response, and set to 0 outside it; masks are
  averaged within each hook type, then across types. Hooked (Llama-family module names, see
  `ACTIVATION_HOOKS`): MLP activations, attention q/k/v projections and output, each layer's
  residual output, the embedding and the final norm. Departures: the rotary q/k (not modules in HF
  models) and the logits (computed in chunks here) are not hooked; a response whose activations are
  constant (or that has one token) gets mask 1 instead of the official code's NaN (0/0).
* ``learned`` (``pref_optim=sparse``, ``mask_model=simple_all``): heads over the reference model's
  hidden states of every layer (embedding output excluded): a shared LayerNorm, one Linear(H, 1) +
  ReLU per layer, their outputs concatenated through Linear(L, 1, no bias) + ReLU. Values are ≥ 0
  and unbounded above; ReLU's zeros give the sparsity. ``independent_masks=false`` (common) uses
  one head for both masks, true uses two. The heads are trained by this loss, with their own
  weight decay (``mask_weight_decay``, 0.01), and saved in checkpoints with the loss state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.chunked import token_kl
from alignlab.errors import ConfigError
from alignlab.losses import register
from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, PrepareContext, preference_metrics

#: MaPO hook type -> regex on the reference model's module names (Llama family; GPT-2 style names too).
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
            raise ValueError("the activation mask (MaPO) is one common mask with no L1 term: "
                             "leave loss.independent_masks=false, loss.lambda_u=0, loss.lambda_d=0")


class MaskHead(nn.Module):
    """The learned mask over all L layers' hidden states: LayerNorm → L × (Linear(H,1)+ReLU) → Linear(L,1)+ReLU."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.per_layer = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(layers))
        self.mix = nn.Linear(layers, 1, bias=False)

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """`hidden_states`: L tensors `(B, T, H)` -> mask `(B, T)`, ≥ 0."""
        per_layer = [F.relu(head(self.norm(h.float()))) for head, h in zip(self.per_layer, hidden_states)]
        return F.relu(self.mix(torch.cat(per_layer, -1))).squeeze(-1)


def activation_mask(activations: dict[str, list[torch.Tensor]], response: torch.Tensor) -> torch.Tensor:
    """MaPO's mask `(B, T)` from hidden-dimension means `(B, T)` of each hooked tensor, by hook type."""
    maps = []
    for tensors in activations.values():
        maps.append(torch.stack([_rescale(t.float(), response) for t in tensors]).mean(0))
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

    needs = Needs(reference=True, full_logits=True)
    summary = "token masks on the reward and the KL: activation (MaPO) or learned sparse masks (Christopoulou et al. 2024)"

    def __init__(self, cfg: SparsePOConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleDict()
        self._captured: dict[str, list[torch.Tensor]] = {}
        self._hooks: list = []

    # -- reading the reference model --------------------------------------------------------------
    def prepare(self, ctx: PrepareContext) -> None:
        """Hook the reference model; for learned masks, build the heads (trained with the policy)."""
        self.attach(ctx.reference)

    def attach(self, reference: nn.Module) -> None:
        """Register forward hooks on `reference` that capture what the masks read on every forward."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if next(reference.children(), None) is None:  # e.g. alignlab.models.AdapterDisabled
            raise ConfigError("sparsepo reads the reference model's activations through hooks, but this reference "
                              "has no modules of its own (with model.lora.enabled it is the policy with adapters "
                              "disabled); set model.reference to the base model (e.g. model.reference=builtin:tiny)")
        if self.cfg.mask == "activation":
            patterns = {kind: re.compile(p) for kind, p in ACTIVATION_HOOKS.items()}
            for name, module in reference.named_modules():
                for kind, pattern in patterns.items():
                    if pattern.search(name):
                        self._hooks.append(module.register_forward_hook(self._capture(kind, reduce=True)))
        else:
            layers = [m for n, m in reference.named_modules() if re.search(ACTIVATION_HOOKS["residual"], n)]
            if not layers:
                raise ValueError("sparsepo: no decoder layers found in the reference model to read hidden states from")
            for layer in layers:
                self._hooks.append(layer.register_forward_hook(self._capture("hidden", reduce=False)))
            if not self.heads:
                hidden = reference.config.hidden_size
                names = ("common",) if not self.cfg.independent_masks else ("reward", "kl")
                for name in names:
                    self.heads[name] = MaskHead(hidden, len(layers))
        if not self._hooks:
            raise ValueError("sparsepo: no reference module matched the activation hooks (ACTIVATION_HOOKS)")

    def _capture(self, kind: str, reduce: bool):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(tensor) and tensor.dim() == 3:
                self._captured.setdefault(kind, []).append(tensor.detach().mean(-1) if reduce else tensor.detach())
        return hook

    def param_groups(self) -> list[dict]:
        """The mask heads' optimizer group, with their own weight decay."""
        params = [p for p in self.heads.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.cfg.mask_weight_decay}] if params else []

    # -- the loss -----------------------------------------------------------------------------------
    def _masks(self, batch: LossInputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Reward and KL masks per response, `(B, T-1)` aligned with the token log-probs."""
        captured, self._captured = self._captured, {}
        names = ("chosen", "rejected")
        response = torch.cat([batch.policy[n].mask for n in names])
        if not captured:
            raise RuntimeError("sparsepo: the reference model's activations were not captured; was prepare() run?")
        # Hooks saw the full input (N, T); position t of the log-probs predicts token t+1.
        if self.cfg.mask == "activation":
            acts = {k: [t[:, 1:] for t in v] for k, v in captured.items()}
            mask = activation_mask(acts, response)
            reward = kl = mask
        else:
            hidden = [h[:, 1:] for h in captured["hidden"]]
            reward = self.heads["common" if "common" in self.heads else "reward"](hidden) * response
            kl = reward if "common" in self.heads else self.heads["kl"](hidden) * response
        split = lambda m: dict(zip(names, m.chunk(2)))  # noqa: E731
        return split(reward), split(kl)

    def forward(self, batch: LossInputs) -> LossOutput:
        cfg = self.cfg
        m_u, m_d = self._masks(batch)
        u, d, seq_kl, l1 = {}, {}, {}, 0.0
        common = m_u is m_d or all(m_u[n] is m_d[n] for n in m_u)
        scale = 0.5 if common else 1.0
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
        metrics = preference_metrics(batch, cfg.beta * (u["chosen"] - d["chosen"]),
                                     cfg.beta * (u["rejected"] - d["rejected"]))
        for n in ("chosen", "rejected"):
            tokens = batch.policy[n].mask
            metrics[f"SeqKL/{n}"] = seq_kl[n].detach().mean()
            metrics[f"MaskKL/{n}"] = d[n].detach().mean()
            metrics[f"Weights/{n}_sparsity"] = ((m_u[n] == 0) & tokens).sum().float().detach() / tokens.sum().clamp(min=1) * 100
            metrics[f"Weights/{n}_l1_norm"] = m_u[n].detach().abs().sum(-1).mean()
        return LossOutput(losses, metrics)
