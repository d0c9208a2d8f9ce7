"""SFT — supervised fine-tuning on the preferred responses, the π_SFT that DPO starts from:
Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", arXiv:2305.18290, §4: when no SFT model is available, "we initialize π_ref by maximizing
likelihood of preferred completions (x, y_w)".

    L = −(1/N) Σ_i Σ_t log πθ(y_w,i,t | x_i, y_w,i,<t),   N = the number of response tokens in the batch

the token-mean negative log-likelihood of the chosen responses (the causal-LM loss of HF
`Trainer` and TRL's `SFTTrainer`, prompt tokens masked). Reference-free; it reads only `chosen`.
The embedded default's recipes use it as their `sft` stage (configs/model/tiny.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignlab.losses.base import Loss, LossInputs, LossOutput, Needs, batch_token_mean_nll, register


@dataclass
class SFTConfig:
    name: str = "sft"


@register("sft", SFTConfig)
class SFT(Loss):
    """Token-mean NLL of the chosen responses (module docstring)."""

    needs = Needs(reference=False, responses=("chosen",))
    summary = "supervised fine-tuning: NLL of the chosen responses, the SFT stage before DPO"
    paper = (
        "supervised fine-tuning on the preferred responses, the π_SFT that DPO starts from: "
        "Rafailov et al. 2023, arXiv:2305.18290"
    )

    def forward(self, batch: LossInputs) -> LossOutput:
        chosen = batch.policy["chosen"]
        losses = batch_token_mean_nll(batch, "chosen")
        metrics = {"nll_loss": losses.detach().mean(), "logps/chosen": chosen.logps.detach().mean()}
        return LossOutput(losses, metrics)
