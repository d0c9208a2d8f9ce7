"""MODPO's trade-off on the embedded default: how much each weighting prefers each objective.

Trains `recipes/modpo.yaml` at several weights w = (w₀, w₁) (the margin stage and the SFT stage are
trained once and reused), then measures, on the held-out pairs of each objective (builtin:sentiment,
objective 0; builtin:sentiment-understated, objective 1), the mean log-ratio margin
ρ(y_w) − ρ(y_l) of the final policy against the SFT reference, ρ = log π(y|x) − log π_ref(y|x)
summed over the response's tokens, and the fraction of pairs where it is > 0. The margin model (DPO
on the understated pairs) is measured the same way. Prints a Markdown table (docs/losses.md).

    python scripts/modpo_front.py --out /tmp/modpo_front
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

WEIGHTS = ([0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0])
OBJECTIVES = ("builtin:sentiment", "builtin:sentiment-understated")


def held_out_pairs(path: str, tokenizer, cache: Path) -> list[dict]:
    """The held-out pairs of `path`, tokenized as a run of the recipe holds them out."""
    from alignlab.config import DataConfig
    from alignlab.data import build_datasets

    return build_datasets(DataConfig(path=path, cache_dir=str(cache)), tokenizer).eval.to_list()


@torch.no_grad()
def sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    """log π(response | prompt), summed over the response's tokens, from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return picked[len(prompt) - 1 :].sum().item()


def margins(model, reference, pairs: list[dict]) -> tuple[float, float]:
    """Mean ρ(y_w) − ρ(y_l) over `pairs` and the fraction of pairs where it is > 0."""
    values = []
    for row in pairs:
        rho = {
            r: sequence_logp(model, row["prompt_ids"], row[f"{r}_ids"])
            - sequence_logp(reference, row["prompt_ids"], row[f"{r}_ids"])
            for r in ("chosen", "rejected")
        }
        values.append(rho["chosen"] - rho["rejected"])
    return sum(values) / len(values), sum(v > 0 for v in values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/modpo_front", help="folder for the runs and results.json")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.api import train

    runs = {}
    for w in WEIGHTS:
        name = f"w{w[0]}_{w[1]}"
        result = train(
            [
                "+recipe=modpo",
                f"loss.weights=[{w[0]},{w[1]}]",
                "eval.generate=false",
                f"data.cache_dir={out / 'cache'}",
            ],
            output_dir=out / name,
        )
        runs[f"({w[0]:g}, {w[1]:g})"] = result.model_dir
    saved = OmegaConf.load(Path(result.output_dir) / "config.yaml")
    # builtin:tiny@<the sft stage's model>: the SFT model, the policy's start and the reference
    reference_dir, margin_dir = saved.model.name_or_path.split("@")[-1], saved.loss.margins[0].model
    runs["the margin model (DPO on understated)"] = Path(margin_dir)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float64).eval()
    pairs = {path: held_out_pairs(path, tokenizer, out / "cache") for path in OBJECTIVES}
    results, lines = (
        {},
        ["| w | sentiment margin (accuracy) | understated margin (accuracy) |", "|---|---|---|"],
    )
    for label, model_dir in runs.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        results[label] = {path: margins(model, reference, pairs[path]) for path in OBJECTIVES}
        cells = [f"{m:.1f} ({a:.2f})" for m, a in results[label].values()]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    (out / "results.json").write_text(json.dumps({"reference": reference_dir, "results": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
