"""`alignlab eval RUN_DIR`: evaluate a saved run against its reference model.

* held-out preference metrics of the saved policy (the run's loss and data: accuracy, margins, …);
* generations from the policy and from the reference on held-out prompts, with
  - the sequence KL(π‖π_ref) estimated from the policy's own samples: mean over samples of
    Σ_t [log π(y_t|·) − log π_ref(y_t|·)] (an unbiased Monte-Carlo estimate of the sequence KL),
  - a pluggable reward (`--reward module:function`, called as `function(prompts, completions)` and
    returning one float per completion), its mean for both models and the policy's win rate against
    the reference (ties count ½),
  - length statistics;
* `eval/report.md` and `eval/eval.json` in the run directory (the training curves are `curves.png`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass
class Generations:
    prompts: list[str]
    completions: list[str]
    #: (N,) summed log-probs of each completion under the model that sampled it and under the other
    logps_self: torch.Tensor
    logps_other: torch.Tensor
    lengths: list[int]


def load_reward(spec: str | None):
    """`module:function` -> the callable, or None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--reward must be module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


@torch.no_grad()
def sample(model, other, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> Generations:
    """Sample one completion per prompt from `model`; score it under `model` and `other` (summed log-probs)."""
    from alignlab.forward import concatenated_forward

    completions, self_lp, other_lp, lengths = [], [], [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
        torch.manual_seed(seed + i)  # the same draws for every model: a model against itself ties exactly
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        if tokenizer.eos_token_id in new.tolist():  # keep the EOS, drop anything after it
            new = new[: new.tolist().index(tokenizer.eos_token_id) + 1]
        labels = torch.cat([torch.full_like(ids[0], -100), new])[None]
        full = torch.cat([ids[0], new])[None]
        batch = {"x_input_ids": full, "x_attention_mask": torch.ones_like(full), "x_labels": labels}
        self_lp.append(concatenated_forward(model, batch, ("x",))["x"].logps.item())
        other_lp.append(concatenated_forward(other, batch, ("x",))["x"].logps.item())
        completions.append(tokenizer.decode(new, skip_special_tokens=True))
        lengths.append(int(new.numel()))
    return Generations(prompts, completions, torch.tensor(self_lp), torch.tensor(other_lp), lengths)


def win_rate(policy_rewards: list[float], reference_rewards: list[float]) -> float:
    """Fraction of prompts where the policy's reward beats the reference's; ties count ½."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_rewards, reference_rewards)]
    return sum(wins) / len(wins) if wins else float("nan")


def evaluate(run_dir: Path, reward: str | None = None, num_prompts: int = 32, max_new_tokens: int = 32,
             seed: int = 0) -> dict:
    """Evaluate the saved run in `run_dir`; writes `run_dir/eval/` and returns the figures."""
    from alignlab.data import build_datasets
    from alignlab.models import freeze, load_policy, load_tokenizer

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "model").is_dir() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished alignlab run (it needs model/ and config.yaml)")
    cfg = load_run_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    # the reference of training: model.reference, or the initial policy (builtin models are rebuilt
    # from the run's seed, so they are the same weights)
    base = _without_adapter(cfg.model)
    reference = freeze(load_policy(replace(base, name_or_path=cfg.model.reference) if cfg.model.reference else base,
                                   tokenizer, cfg.seed))
    saved = run_dir / "model"
    if (saved / "adapter_config.json").exists():  # a LoRA run: the base with the trained adapter
        from peft import PeftModel

        policy = freeze(PeftModel.from_pretrained(load_policy(base, tokenizer, cfg.seed), str(saved)))
    else:
        policy = freeze(load_policy(replace(base, name_or_path=str(saved), tokenizer=None), tokenizer, cfg.seed))

    data = build_datasets(cfg.data, tokenizer, responses=("chosen", "rejected"), seed=cfg.seed) \
        if _pairs(cfg) else None
    prompts = _prompts(data, tokenizer, num_prompts) if data is not None and data.eval is not None else []
    result: dict = {"run": str(run_dir), "num_prompts": len(prompts), "max_new_tokens": max_new_tokens}
    if prompts:
        pol = sample(policy, reference, tokenizer, prompts, max_new_tokens, seed)
        ref = sample(reference, policy, tokenizer, prompts, max_new_tokens, seed)
        result["kl_policy_reference"] = float((pol.logps_self - pol.logps_other).mean())
        result["length_policy"] = {"mean": statistics.fmean(pol.lengths), "median": statistics.median(pol.lengths)}
        result["length_reference"] = {"mean": statistics.fmean(ref.lengths), "median": statistics.median(ref.lengths)}
        scorer = load_reward(reward)
        if scorer is not None:
            pr, rr = list(map(float, scorer(prompts, pol.completions))), list(map(float, scorer(prompts, ref.completions)))
            result.update(reward=reward, reward_policy=statistics.fmean(pr), reward_reference=statistics.fmean(rr),
                          win_rate=win_rate(pr, rr))
        result["samples"] = [{"prompt": p, "policy": a, "reference": b}
                             for p, a, b in list(zip(prompts, pol.completions, ref.completions))[:5]]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    result["held_out"] = summary.get("eval", {})
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(report_markdown(result))
    return result


def load_run_config(path: Path):
    """A run's saved (resolved) `config.yaml`, typed and validated again."""
    from omegaconf import OmegaConf

    from alignlab.config import AlignConfig
    from alignlab.losses import get
    from alignlab.train import to_typed

    raw = OmegaConf.load(path)
    loss = raw.pop("loss")
    for name, kind in typing.get_type_hints(AlignConfig).items():  # groups added since the run was saved
        if name not in raw and dataclasses.is_dataclass(kind):
            raw[name] = OmegaConf.structured(kind)
    cfg = OmegaConf.merge(OmegaConf.structured(AlignConfig), raw)
    cfg.loss = OmegaConf.merge(OmegaConf.structured(get(loss.name).config), loss)
    cfg.stages = {}  # finished before the run was saved; their paths are already resolved
    return to_typed(cfg)


def _without_adapter(model_cfg):
    """The run's model config with LoRA switched off (the adapter, if any, is loaded from the run)."""
    lora = getattr(model_cfg, "lora", None)
    return replace(model_cfg, lora=replace(lora, enabled=False, merge_on_save=False)) if lora is not None else model_cfg


def _pairs(cfg) -> bool:
    from alignlab.losses import build

    return build(cfg.loss).needs.responses[-2:] == ("chosen", "rejected")


def _prompts(data, tokenizer, n: int) -> list[str]:
    seen, prompts = set(), []
    for ids in data.eval["prompt_ids"]:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text not in seen:
            seen.add(text)
            prompts.append(text)
        if len(prompts) == n:
            break
    return prompts


def report_markdown(result: dict) -> str:
    lines = [f"# Evaluation of {result['run']}", ""]
    if result.get("held_out"):
        lines += ["## Held-out preference metrics (end of training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in result["held_out"].items()
                  if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second")) and k != "epoch"]
        lines.append("")
    if result.get("num_prompts"):
        lines += [f"## Generation ({result['num_prompts']} held-out prompts, up to {result['max_new_tokens']} tokens)",
                  "", "| figure | policy | reference |", "|---|---|---|",
                  f"| KL(π‖π_ref), from policy samples | {result['kl_policy_reference']:.4f} | 0 |",
                  f"| mean length (tokens) | {result['length_policy']['mean']:.1f} | {result['length_reference']['mean']:.1f} |"]
        if "win_rate" in result:
            lines += [f"| mean reward ({result['reward']}) | {result['reward_policy']:.4f} | {result['reward_reference']:.4f} |",
                      f"| win rate against the reference | {result['win_rate']:.3f} | 0.5 |"]
        lines += ["", "Samples:", ""]
        lines += [f"- *{s['prompt']}* → policy: {s['policy']!r}; reference: {s['reference']!r}" for s in result["samples"]]
    return "\n".join(lines) + "\n"
