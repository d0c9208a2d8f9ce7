"""`alignlab eval RUN_DIR`: evaluate a saved run against its reference model.

* held-out preference metrics of the saved policy (the run's loss and data: accuracy, margins, …);
* generations from the policy and from the reference on held-out prompts, with
  - the sequence KL(π‖π_ref) estimated from the policy's own samples: mean over samples of
    Σ_t [log π(y_t|·) − log π_ref(y_t|·)] (an unbiased Monte-Carlo estimate of the sequence KL),
  - a pluggable reward (`--reward module:function`, called as `function(prompts, completions)` and
    returning one float per completion), its mean for both models and the policy's win rate against
    the reference (ties count ½),
  - length statistics;
* `eval/report.md` and `eval/eval.json` in the run directory (the training curves are `curves.png`);
  a later evaluation goes to `eval-2/`, `eval-3/`, ..., beside the earlier reports.
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
from omegaconf import OmegaConf
from torch.nn.utils.rnn import pad_sequence

from alignlab.config import AlignConfig, to_typed
from alignlab.data import build_datasets
from alignlab.forward import concatenated_forward
from alignlab.losses import build, get
from alignlab.models import freeze, load_policy, load_tokenizer


@dataclass
class Generations:
    prompts: list[str]
    completions: list[str]
    #: (N,) summed log-probs of each completion under the model that sampled it and under the other
    logps_self: torch.Tensor
    logps_other: torch.Tensor
    lengths: list[int]
    #: (prompt ids, completion ids) of each sample, EOS included when sampled
    ids: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)


def load_reward(spec: str | None):
    """`module:function` -> the callable, or None.

    Raises:
        ValueError: one line naming what is wrong with `spec` (checked before any model loads).
    """
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward {spec!r} must be module:function, e.g. alignlab.builtin:sentiment_reward")
    try:
        scorer = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module!r} ({err})") from None
    if not callable(scorer):
        raise ValueError(f"reward {spec!r}: module {module!r} has no function {name!r}")
    return scorer


def report_dir(run_dir: Path) -> Path:
    """Where the next evaluation of `run_dir` goes: `eval/`, then `eval-2/`, `eval-3/`, ... so that
    every report is kept beside the earlier ones."""
    out, n = run_dir / "eval", 1
    while out.exists():
        n += 1
        out = run_dir / f"eval-{n}"
    return out


@torch.no_grad()
def sample(
    model, other, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 64
) -> Generations:
    """Sample one completion per prompt from `model` (ancestral: top_k=0, top_p=1, temperature 1), in
    left-padded batches of `batch_size`; score each under `model` and `other` (summed log-probs of the
    completion tokens, EOS included when sampled). The generator is seeded once with `seed`, so two
    models with the same weights draw the same completions (a model against itself ties exactly)."""
    completions, self_lp, other_lp, lengths, all_ids = [], [], [], [], []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(
                model.device
            )
            out = model.generate(
                **enc,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            rows = []
            for ids, mask, new in zip(
                enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1] :]
            ):
                new = new.tolist()
                if tokenizer.eos_token_id in new:  # keep the EOS, drop anything after it
                    new = new[: new.index(tokenizer.eos_token_id) + 1]
                rows.append((ids[mask.bool()].tolist(), new))
                completions.append(tokenizer.decode(new, skip_special_tokens=True))
                lengths.append(len(new))
            all_ids += rows
            batch = _right_padded(rows, tokenizer.pad_token_id, model.device)
            self_lp += concatenated_forward(model, batch, ("x",))["x"].logps.tolist()
            other_lp += concatenated_forward(other, batch, ("x",))["x"].logps.tolist()
    finally:
        tokenizer.padding_side = side
    return Generations(prompts, completions, torch.tensor(self_lp), torch.tensor(other_lp), lengths, all_ids)


def _right_padded(rows: list[tuple[list[int], list[int]]], pad: int, device) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows -> a collated batch "x" whose labels are the completion."""

    def padded(sequences: list[list[int]], value: int) -> torch.Tensor:
        return pad_sequence(
            [torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True, padding_value=value
        ).to(device)

    return {
        "x_input_ids": padded([p + c for p, c in rows], pad),
        "x_attention_mask": padded([[1] * (len(p) + len(c)) for p, c in rows], 0),
        "x_labels": padded([[-100] * len(p) + c for p, c in rows], -100),
    }


def win_rate(policy_rewards: list[float], reference_rewards: list[float]) -> float:
    """Fraction of prompts where the policy's reward beats the reference's; ties count ½."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_rewards, reference_rewards)]
    return sum(wins) / len(wins) if wins else float("nan")


def evaluate(
    run_dir: Path, reward: str | None = None, num_prompts: int = 32, max_new_tokens: int = 32, seed: int = 0
) -> dict:
    """Evaluate the saved run in `run_dir`; writes `run_dir/eval/` and returns the figures."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "model").is_dir() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished alignlab run (it needs model/ and config.yaml)")
    if num_prompts < 1 or max_new_tokens < 1:
        raise ValueError(
            f"the number of prompts and of new tokens must be >= 1, got {num_prompts} and {max_new_tokens}"
        )
    scorer = load_reward(reward)  # before any model loads
    cfg = load_run_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    # the reference of training: model.reference, or the initial policy (builtin models are rebuilt
    # from the run's seed, so they are the same weights)
    base = _without_adapter(cfg.model)
    reference = freeze(
        load_policy(
            replace(base, name_or_path=cfg.model.reference) if cfg.model.reference else base,
            tokenizer,
            cfg.seed,
        )
    )
    saved = run_dir / "model"
    if (saved / "adapter_config.json").exists():  # a LoRA run: the base with the trained adapter
        from peft import PeftModel

        policy = freeze(PeftModel.from_pretrained(load_policy(base, tokenizer, cfg.seed), str(saved)))
    else:
        policy = freeze(
            load_policy(replace(base, name_or_path=str(saved), tokenizer=None), tokenizer, cfg.seed)
        )

    needs = build(cfg.loss).needs  # the held-out prompts of the run's own data, whatever its kind
    data = build_datasets(cfg.data, tokenizer, seed=cfg.seed, **needs.data_shape())
    prompts = _prompts(data, tokenizer, num_prompts) if data is not None and data.eval is not None else []
    result: dict = {
        "run": str(run_dir),
        "num_prompts": len(prompts),
        "distinct_prompts": len(set(prompts)),
        "max_new_tokens": max_new_tokens,
    }
    if prompts:
        pol = sample(policy, reference, tokenizer, prompts, max_new_tokens, seed)
        ref = sample(reference, policy, tokenizer, prompts, max_new_tokens, seed)
        logratios = pol.logps_self - pol.logps_other
        result["kl_policy_reference"] = float(logratios.mean())
        result["logratios"] = [round(float(x), 4) for x in logratios]
        result["length_policy"] = {
            "mean": statistics.fmean(pol.lengths),
            "median": statistics.median(pol.lengths),
        }
        result["length_reference"] = {
            "mean": statistics.fmean(ref.lengths),
            "median": statistics.median(ref.lengths),
        }
        if scorer is not None:
            pr, rr = (
                list(map(float, scorer(prompts, pol.completions))),
                list(map(float, scorer(prompts, ref.completions))),
            )
            result.update(
                reward=reward,
                reward_policy=statistics.fmean(pr),
                reward_reference=statistics.fmean(rr),
                win_rate=win_rate(pr, rr),
                rewards_policy=pr,
                rewards_reference=rr,
            )
        result["samples"] = [
            {"prompt": p, "policy": a, "reference": b}
            for p, a, b in list(zip(prompts, pol.completions, ref.completions))[:5]
        ]
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    )
    result["held_out"] = summary.get("eval", {})
    out = report_dir(run_dir)
    out.mkdir()
    result["report"] = str(out / "report.md")
    if prompts:
        result["plot"] = str(plot_eval(result, out / "reward_kl.png"))
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(report_markdown(result))
    return result


def plot_eval(result: dict, out: Path) -> Path:
    """`eval/reward_kl.png`: the per-sample log-ratios log π/π_ref of the policy's samples (their mean
    is the KL estimate) and, with a reward, the reward distributions of policy and reference samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "rewards_policy" in result else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.hist(result["logratios"], bins=20, color="tab:blue", alpha=0.8)
    ax.axvline(
        result["kl_policy_reference"],
        color="k",
        ls="--",
        label=f"mean = KL estimate {result['kl_policy_reference']:.3f}",
    )
    ax.set(xlabel="log π(y|x) − log π_ref(y|x), y ~ π", ylabel="samples", title="KL(π‖π_ref) from samples")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        lo = min(result["rewards_policy"] + result["rewards_reference"])
        hi = max(result["rewards_policy"] + result["rewards_reference"])
        bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
        ax.hist(
            result["rewards_reference"],
            bins=bins,
            alpha=0.6,
            label=f"reference (mean {result['reward_reference']:.3f})",
        )
        ax.hist(
            result["rewards_policy"],
            bins=bins,
            alpha=0.6,
            label=f"policy (mean {result['reward_policy']:.3f})",
        )
        ax.set(
            xlabel=f"reward ({result['reward']})",
            ylabel="samples",
            title=f"reward; policy win rate {result['win_rate']:.3f}",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def load_run_config(path: Path):
    """A run's saved (resolved) `config.yaml`, typed and validated again."""
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
    return (
        replace(model_cfg, lora=replace(lora, enabled=False, merge_on_save=False))
        if lora is not None
        else model_cfg
    )


def _prompts(data, tokenizer, n: int) -> list[str]:
    """`n` held-out prompts: the distinct ones in order, cycled when there are fewer than `n` (each
    repeat draws a new sample), so that a small held-out set still gives `n` samples."""
    seen, prompts = set(), []
    for ids in data.eval["prompt_ids"]:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.strip() and text not in seen:  # a prompt of unknown tokens only decodes to nothing
            seen.add(text)
            prompts.append(text)
        if len(prompts) == n:
            break
    return [prompts[i % len(prompts)] for i in range(n)] if prompts else []


def report_markdown(result: dict) -> str:
    lines = [f"# Evaluation of {result['run']}", ""]
    if result.get("held_out"):
        lines += ["## Held-out preference metrics (end of training)", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4f} |"
            for k, v in result["held_out"].items()
            if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second")) and k != "epoch"
        ]
        lines.append("")
    if result.get("num_prompts"):
        distinct = result.get("distinct_prompts", result["num_prompts"])
        on = f"{distinct} distinct " if distinct < result["num_prompts"] else ""
        lines += [
            f"## Generation ({result['num_prompts']} samples on {on}held-out prompts, up to "
            f"{result['max_new_tokens']} tokens)",
            "",
            "| figure | policy | reference |",
            "|---|---|---|",
            f"| KL(π‖π_ref), from policy samples | {result['kl_policy_reference']:.4f} | 0 |",
            f"| mean length (tokens) | {result['length_policy']['mean']:.1f} "
            f"| {result['length_reference']['mean']:.1f} |",
        ]
        if "win_rate" in result:
            lines += [
                f"| mean reward ({result['reward']}) | {result['reward_policy']:.4f} "
                f"| {result['reward_reference']:.4f} |",
                f"| win rate against the reference | {result['win_rate']:.3f} | 0.5 |",
            ]
        if result.get("plot"):
            lines += ["", f"![reward and KL]({Path(result['plot']).name})"]
        lines += ["", "Samples:", ""]
        lines += [
            f"- *{s['prompt']}* → policy: {s['policy']!r}; reference: {s['reference']!r}"
            for s in result["samples"]
        ]
    return "\n".join(lines) + "\n"
