"""The controlled-sentiment benchmark (DPO paper §6.1 and its followers, rebuilt for a CPU).

    python scripts/bench_sentiment.py            # everything, then docs/benchmarks.md + docs/benchmarks/*.png
    python scripts/bench_sentiment.py --tiny     # a smoke version (a few prompts and steps) into --out

Policy and reference: ../shared/models/stories260k (a pretrained TinyStories Llama, 260K params).
Ground truth: the VADER compound score of the completion (`alignlab.bench.sentiment.vader`). Data: the
reference's own samples on story openings (k per prompt, fixed seed), scored by VADER and cut into
pairs (best vs worst), triples (TPO: best as gold, second as chosen, worst as rejected), thumbs-up /
down labels (BCO: above / below the median score), flipped pairs (rDPO) and a forget / retain split
(NPO: samples of the stories of one character). Every model is trained by `alignlab.train.run` on a
composed Hydra config and scored by the end-of-training eval (`eval.*`, alignlab/evaluate.py):
mean VADER reward of policy samples on held-out openings and KL(π‖π_ref) from those samples.

Studies: (1) every preference loss at three β: the reward-vs-KL frontier; (2) DPO vs rDPO under
20% / 40% label flips; (3) BCO on unpaired labels; (4) MODPO sentiment + length over w; (5) NPO vs
gradient ascent (NPO's β → 0 limit) on a forget set, with retain perplexity; (6) AlignDistil's
teachers and student; (7) TDPO's KL against DPO's at similar reward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread: the figures do not depend on the core count, and on a shared 2-core machine two threads
# ran each training step about 10x slower than one (2026-12-02)
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignlab.bench import sentiment  # noqa: E402
from alignlab.builtin import joint_from_pairs  # noqa: E402
from alignlab.losses.dpo import LOSS_TYPES as DPO_LOSS_TYPES  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "stories260k"
#: the character whose stories are forgotten in study 5.
FORGET_NAME = "Tom"


class Settings:
    """Sizes of the full benchmark and of the `--tiny` smoke version."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.samples_per_prompt = 4
        self.max_new_tokens = 12 if tiny else 32
        self.train_prompts = 24 if tiny else 900
        self.eval_prompts = 8 if tiny else 108
        self.steps = 2 if tiny else 40
        self.batch_size = 8 if tiny else 16
        self.lr = 3e-4
        self.betas = [0.1] if tiny else [0.05, 0.1, 0.5]
        #: study 1's losses (the tiny version keeps one per data kind)
        self.losses = ["dpo", "tdpo", "tpo", "kto"] if tiny else list(LOSSES)
        #: AlignDistil's runs (study 6): its reverse teacher and its student
        self.aligndistil = True
        self.flips = [0.4] if tiny else [0.2, 0.4]
        #: MODPO length weights; 0 is DPO (study 1's run at β = 0.1, not retrained)
        self.modpo_w = [0.1] if tiny else [0.0, 0.05, 0.1, 0.3]
        #: NPO study: steps of each unlearning run, and every how many steps its checkpoint is scored
        self.npo_steps = 2 if tiny else 40
        self.npo_every = 1 if tiny else 5


# -- data -------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def groups(split: str, n: int, s: Settings, seed: int, cache: Path) -> list[dict]:
    """k VADER-scored samples of the reference for each of the first n openings of `split` (cached)."""
    path = cache / f"groups-{split}-{n}-k{s.samples_per_prompt}-t{s.max_new_tokens}-seed{seed}.jsonl"
    if not path.exists():
        rows = sentiment.sample_groups(
            MODEL,
            sentiment.story_prompts(split)[:n],
            s.samples_per_prompt,
            seed,
            s.max_new_tokens,
            whole_sentences=True,
        )
        write_jsonl(path, rows)
    return [json.loads(line) for line in path.read_text().splitlines()]


def ranked(group: dict) -> list[tuple[float, str]]:
    """The group's distinct non-empty samples, best first (ties keep sampling order)."""
    seen, out = set(), []
    for score, text in sorted(zip(group["scores"], group["completions"]), key=lambda g: -g[0]):
        if text and text not in seen:
            seen.add(text)
            out.append((score, text))
    return out


def pairs_of(gs: list[dict]) -> list[dict]:
    rows = []
    for g in gs:
        r = ranked(g)
        if len(r) >= 2 and r[0][0] > r[-1][0]:
            rows.append(
                {
                    "prompt": g["prompt"],
                    "chosen": r[0][1],
                    "rejected": r[-1][1],
                    "chosen_score": r[0][0],
                    "rejected_score": r[-1][0],
                }
            )
    return rows


def joint_of(pairs: list[dict]) -> list[dict]:
    """JPO's joint pairs from `pairs`, built as `alignlab.builtin.joint_pairs` builds them, judged by
    the samples' VADER scores."""
    return joint_from_pairs(pairs, lambda row, response: row[f"{response}_score"])


def triples_of(gs: list[dict]) -> list[dict]:
    """TPO triples: gold = best, chosen = second best, rejected = worst (second strictly above worst;
    three distinct texts, which alignlab's data pipeline requires)."""
    rows = []
    for g in gs:
        r = ranked(g)
        if len(r) >= 3 and r[1][0] > r[-1][0]:
            rows.append({"prompt": g["prompt"], "gold": r[0][1], "chosen": r[1][1], "rejected": r[-1][1]})
    return rows


def unpaired_of(gs: list[dict]) -> tuple[list[dict], float]:
    """BCO thumbs-up / down: every sample above the median score is desirable, below it undesirable."""
    median = statistics.median(s for g in gs for s in g["scores"])
    rows = [
        {"prompt": g["prompt"], "completion": t, "label": s > median}
        for g in gs
        for s, t in zip(g["scores"], g["completions"])
        if t and s != median
    ]
    return rows, median


def flipped(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """The pairs with chosen and rejected swapped in a random `rate` fraction of them (fixed seed)."""
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(rows)), round(rate * len(rows))))
    return [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flip else r
        for i, r in enumerate(rows)
    ]


def build_data(s: Settings, seed: int, cache: Path) -> dict[str, Path]:
    train, held_out = (
        groups("train", s.train_prompts, s, seed, cache),
        groups("eval", s.eval_prompts, s, seed + 1, cache),
    )
    d = cache / f"data-{'tiny' if s.tiny else 'full'}-seed{seed}"
    pairs = pairs_of(train)
    unpaired, median = unpaired_of(train)
    forget = [
        {"prompt": g["prompt"], "completion": t}
        for g in train
        if FORGET_NAME in g["prompt"].split()
        for t in g["completions"]
        if t
    ]
    retain = [
        {"prompt": g["prompt"], "completion": t}
        for g in train
        if FORGET_NAME not in g["prompt"].split()
        for t in g["completions"]
        if t
    ]
    paths = {
        "pairs": write_jsonl(d / "pairs.jsonl", pairs),
        "eval_pairs": write_jsonl(d / "eval_pairs.jsonl", pairs_of(held_out)),
        "triples": write_jsonl(d / "triples.jsonl", triples_of(train)),
        "joint": write_jsonl(d / "joint.jsonl", joint_of(pairs)),
        "eval_joint": write_jsonl(d / "eval_joint.jsonl", joint_of(pairs_of(held_out))),
        "eval_triples": write_jsonl(d / "eval_triples.jsonl", triples_of(held_out)),
        "unpaired": write_jsonl(d / "unpaired.jsonl", unpaired),
        "eval_unpaired": write_jsonl(d / "eval_unpaired.jsonl", unpaired_of(held_out)[0]),
        "forget": write_jsonl(d / "forget.jsonl", forget),
        "retain": write_jsonl(d / "retain.jsonl", retain[: len(retain) // 2]),  # trained on (NPO+RT) / never
        "retain_heldout": write_jsonl(d / "retain_heldout.jsonl", retain[len(retain) // 2 :][:400]),
    }
    for rate in s.flips:
        paths[f"flip{rate}"] = write_jsonl(
            d / f"pairs_flip{int(rate * 100)}.jsonl", flipped(pairs, rate, seed)
        )
    scores = [x for g in train for x in g["scores"]]
    stats = {
        "train_prompts": len(train),
        "samples": len(scores),
        "pairs": len(pairs),
        "triples": sum(1 for _ in open(paths["triples"])),
        "unpaired": len(unpaired),
        "desirable": sum(r["label"] for r in unpaired),
        "median_score": median,
        "mean_score": statistics.fmean(scores),
        "zero_scores": sum(x == 0 for x in scores) / len(scores),
        "chosen_mean": statistics.fmean(r["chosen_score"] for r in pairs),
        "rejected_mean": statistics.fmean(r["rejected_score"] for r in pairs),
        "eval_prompts": len(held_out),
        "forget": len(forget),
    }
    (d / "stats.json").write_text(json.dumps(stats, indent=2))
    return {**paths, "stats": stats}


# -- training + evaluation through alignlab -----------------------------------------------------------
class Bench:
    def __init__(
        self, s: Settings, data: dict, runs: Path, seed: int, reuse: bool, train: bool = True
    ) -> None:
        self.s, self.data, self.runs, self.seed, self.reuse = s, data, runs, seed, reuse
        #: False: report the finished runs only (`--report-only`), train nothing
        self.may_train = train
        self.results: dict[str, dict] = {}
        self.failures: dict[str, str] = {}

    def common(self, data: str, eval_data: str, steps: int | None = None) -> list[str]:
        s = self.s
        return [
            f"model.name_or_path={MODEL}",
            f"data.path={self.data[data]}",
            f"data.eval_path={self.data[eval_data]}",
            "data.max_length=80",
            "data.max_prompt_length=32",
            f"data.cache_dir={self.runs / 'tokenized'}",
            f"trainer.max_steps={steps or s.steps}",
            f"trainer.per_device_train_batch_size={s.batch_size}",
            "trainer.per_device_eval_batch_size=64",
            f"trainer.learning_rate={s.lr}",
            "trainer.warmup_steps=0",
            "trainer.logging_steps=10",
            "trainer.eval_steps=0",
            "trainer.save_steps=0",
            "eval.reward=alignlab.bench.sentiment:vader_reward",
            f"eval.num_prompts={s.eval_prompts}",
            f"eval.max_new_tokens={s.max_new_tokens}",
            f"seed={self.seed}",
            f"stages_dir={self.runs / 'stages'}",
        ]

    def train(
        self,
        name: str,
        overrides: list[str],
        data: str = "pairs",
        eval_data: str = "eval_pairs",
        steps: int | None = None,
    ) -> dict | None:
        from hydra import compose, initialize_config_dir

        from alignlab.compose import register_configs
        from alignlab.config import resource_dir
        from alignlab.train import run

        out = self.runs / name
        done = out / "eval" / "eval.json"
        if not self.may_train and not done.exists():
            return None
        if not (self.reuse and done.exists()):
            shutil.rmtree(out, ignore_errors=True)
            register_configs()
            with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
                cfg = compose("config", overrides=[*overrides, *self.common(data, eval_data, steps)])
            start = time.time()
            try:
                run(cfg, output_dir=out)
            except Exception as err:  # one failing run must not stop the benchmark; the report lists it
                self.failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"bench: {name}: FAILED {self.failures[name]}", flush=True)
                return None
            (out / "bench_seconds").write_text(f"{time.time() - start:.1f}")
        figures = json.loads(done.read_text())
        summary = json.loads((out / "summary.json").read_text())
        r = {
            "name": name,
            "reward": figures["reward_policy"],
            "reference_reward": figures["reward_reference"],
            "kl": figures["kl_policy_reference"],
            "win_rate": figures["win_rate"],
            "length": figures["length_policy"]["mean"],
            "reference_length": figures["length_reference"]["mean"],
            "accuracy": summary["eval"].get("eval_rewards/accuracies"),
            "run": str(out),
            "seconds": float((out / "bench_seconds").read_text()),
            "sample": figures["samples"][0]["policy"],
        }
        self.results[name] = r
        print(
            f"bench: {name}: reward {r['reward']:.3f} (ref {r['reference_reward']:.3f}) KL {r['kl']:.3f} "
            f"win {r['win_rate']:.3f} [{r['seconds']:.0f} s]",
            flush=True,
        )
        return r


@dataclass(frozen=True)
class Method:
    """One line of study 1: a loss (or a loss with options) and the strength swept on the frontier."""

    #: the loss and its fixed options
    overrides: tuple[str, ...]
    #: which figure / panel it is drawn in
    family: str
    data: str = "pairs"
    eval_data: str = "eval_pairs"
    #: the config keys the strength sets (all to the same value), and its name in the report
    knob: tuple[str, ...] = ("loss.beta",)
    symbol: str = "β"
    #: its three values; None: `Settings.betas` (the β of DPO's grid)
    values: tuple[float, ...] | None = None

    def points(self, s: Settings) -> list[float]:
        if self.values is None:
            return list(s.betas)
        return [self.values[len(self.values) // 2]] if s.tiny else list(self.values)

    def run(self, name: str, value: float) -> str:
        """The run's directory name: `s1-dpo-b0.1` for a β, `s1-orpo-λ5.0` → `s1-orpo-lam5.0` else."""
        return f"s1-{name}-{TAGS.get(self.symbol, 'b')}{value}"

    def args(self, value: float) -> list[str]:
        return [*self.overrides, *(f"{key}={value}" for key in self.knob)]


TAGS = {"β": "b", "λ": "lam"}
ORIGINAL, REFERENCE_FREE, DPO_FORMS, DPO_WEIGHTS = (
    "alignlab's own losses",
    "reference-free, unpaired and combined (#16)",
    "DPO's loss_type forms (#16)",
    "DPO with f-divergences, LD-DPO, WPO, TR-DPO and JPO (#16)",
)
#: study 1, the reward-vs-KL frontier: name -> Method. A new method is one line here (a loss, a loss
#: option or a config such as a reference-update schedule, on pairs or on its own data).
LOSSES = {
    "dpo": Method(("loss=dpo",), ORIGINAL),
    "tdpo": Method(("loss=tdpo",), ORIGINAL),
    "sparsepo": Method(("loss=sparsepo",), ORIGINAL),
    "rdpo": Method(("loss=rdpo", "loss.epsilon=0.1"), ORIGINAL),
    "rpo": Method(("loss=rpo",), ORIGINAL),
    "asft": Method(("loss=asft",), ORIGINAL),
    "tpo": Method(("loss=tpo",), ORIGINAL, "triples", "eval_triples"),
    "modpo": Method(("loss=modpo", "loss.weights=[1.0,0.1]", "loss.margins=[{kind:length}]"), ORIGINAL),
    "bco": Method(("loss=bco",), ORIGINAL),
    # issue 16
    "simpo": Method(("loss=simpo", "loss.gamma=0.5"), REFERENCE_FREE, values=(1.0, 2.0, 5.0)),
    "cpo": Method(("loss=cpo",), REFERENCE_FREE),
    "orpo": Method(("loss=orpo",), REFERENCE_FREE, knob=("loss.lam",), symbol="λ", values=(0.1, 1.0, 5.0)),
    "kto": Method(("loss=kto",), REFERENCE_FREE),
    "combo": Method(
        ("loss=combo",), REFERENCE_FREE, knob=("+loss.term_options.dpo.beta", "+loss.term_options.bco.beta")
    ),
    **{
        f"dpo-{form}": Method(("loss=dpo", f"loss.loss_type={form}"), DPO_FORMS)
        for form in DPO_LOSS_TYPES
        if form not in ("sigmoid", "ipo", "hinge")  # DPO itself, and its older IPO and SLiC forms
    },
    "dpo-forward_kl": Method(("loss=dpo", "loss.f_divergence=forward_kl"), DPO_WEIGHTS),
    "dpo-js": Method(("loss=dpo", "loss.f_divergence=js_divergence"), DPO_WEIGHTS),
    "dpo-alpha0.5": Method(("loss=dpo", "loss.f_divergence=alpha_divergence"), DPO_WEIGHTS),
    "ld-dpo": Method(("loss=dpo", "loss.ld_alpha=0.5"), DPO_WEIGHTS),
    "wpo": Method(("loss=dpo", "loss.wpo=true"), DPO_WEIGHTS),
    # TR-DPO: the reference moves to 0.6·policy + 0.4·reference every 10 of the 40 steps
    "trdpo": Method(
        ("loss=dpo", "model.reference_sync.enabled=true", "model.reference_sync.every=10"), DPO_WEIGHTS
    ),
    # JPO on joint pairs: half conditional, half across two openings (`joint_of`)
    "jpo": Method(("loss=jpo",), DPO_WEIGHTS, "joint", "eval_joint"),
}


def middle_or_rest(values: list[float], first: bool) -> list[float]:
    """The middle value of `values` when `first`, else the others, largest first."""
    mid = values[len(values) // 2]
    return [mid] if first else sorted((v for v in values if v != mid), reverse=True)


def study_frontier(b: Bench, first: bool) -> None:
    """Study 1 and AlignDistil's runs: each method at its middle strength when `first` (β = 0.1, which
    the other studies compare with), else at its other strengths."""
    for name in b.s.losses:
        m = LOSSES[name]
        for value in middle_or_rest(m.points(b.s), first):
            b.train(m.run(name, value), m.args(value), m.data, m.eval_data)
    for beta in middle_or_rest(b.s.betas, first) if b.s.aligndistil else []:
        # AlignDistil (study 6 too): the DPO run above is its DPO teacher; the reverse teacher is DPO
        # on swapped pairs; then the student
        reverse = b.train(f"s6-reverse-b{beta}", ["loss=dpo", f"loss.beta={beta}", "data.swap_pairs=true"])
        if reverse is not None and f"s1-dpo-b{beta}" in b.results:
            b.train(
                f"s1-aligndistil-b{beta}",
                [
                    "loss=aligndistil",
                    f"loss.beta={beta}",
                    f"loss.dpo_teacher={b.runs / f's1-dpo-b{beta}' / 'model'}",
                    f"loss.reverse_teacher={Path(reverse['run']) / 'model'}",
                ],
            )


def study_flips(b: Bench) -> None:
    beta = 0.1
    for rate in b.s.flips:
        b.train(f"s2-dpo-flip{rate}", ["loss=dpo", f"loss.beta={beta}"], f"flip{rate}")
        b.train(
            f"s2-rdpo-flip{rate}", ["loss=rdpo", f"loss.beta={beta}", f"loss.epsilon={rate}"], f"flip{rate}"
        )


#: study 3: the losses of unpaired thumbs-up / down data (each also in study 1, on pairs taken apart)
UNPAIRED = ("bco", "kto")


def study_unpaired(b: Bench) -> None:
    for loss in UNPAIRED:
        b.train(f"s3-{loss}-unpaired", [f"loss={loss}", "loss.beta=0.1"], "unpaired", "eval_unpaired")


def study_modpo(b: Bench) -> None:
    for w in b.s.modpo_w:
        if w == 0 and "s1-dpo-b0.1" in b.results:  # MODPO with w = (1,) is DPO with β/w₀ (modpo.py)
            b.results["s4-modpo-w0.0"] = b.results["s1-dpo-b0.1"]
            continue
        overrides = ["loss=modpo", "loss.beta=0.1"]
        overrides += (
            [f"loss.weights=[1.0,{w}]", "loss.margins=[{kind:length}]"] if w else ["loss.weights=[1.0]"]
        )
        b.train(f"s4-modpo-w{w}", overrides)


@__import__("torch").no_grad()
def token_nll(model_dir: Path, rows: list[dict]) -> float:
    """Mean per-token negative log-likelihood of the completions given their prompts (the model in
    `model_dir`, a saved model or a training checkpoint; the tokenizer of stories260k)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        logp = model(ids).logits[0, :-1].log_softmax(-1)
        total -= float(logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum())
        count += len(c)
    return total / max(count, 1)


def study_unlearning(b: Bench) -> list[dict]:
    """Each method trains once for `npo_steps`, saving a checkpoint every `npo_every` steps; every
    checkpoint is scored on the forget and held-out retain sets: a trajectory per method, so that
    methods are compared at the same amount of forgetting, as in the NPO paper's Figure 1."""
    forget = [json.loads(x) for x in open(b.data["forget"])][:200]
    retain = [json.loads(x) for x in open(b.data["retain_heldout"])][:200]
    rows = [
        {
            "method": "reference",
            "forget_nll": token_nll(MODEL, forget),
            "retain_nll": token_nll(MODEL, retain),
        }
    ]
    methods = [
        ("NPO (β=0.1)", ["loss=npo", "loss.beta=0.1"]),
        ("GA (NPO, β=1e-4: its β→0 limit)", ["loss=npo", "loss.beta=0.0001"]),
        (
            "NPO+RT (β=0.1)",
            ["loss=npo", "loss.beta=0.1", "loss.variant=npo_rt", f"data.retain={b.data['retain']}"],
        ),
        (
            "GA+RT (β=1e-4)",
            ["loss=npo", "loss.beta=0.0001", "loss.variant=npo_rt", f"data.retain={b.data['retain']}"],
        ),
    ]
    steps = b.s.npo_steps
    for name, overrides in methods[:2] if b.s.tiny else methods:
        run = f"s5-{name.split()[0].lower()}-{steps}"
        out = b.runs / run
        if not b.may_train and not (out / "summary.json").exists():
            continue
        if not (b.reuse and (out / "summary.json").exists()):
            from hydra import compose, initialize_config_dir

            from alignlab.compose import register_configs
            from alignlab.config import resource_dir
            from alignlab.train import run as train

            register_configs()
            common = [
                o
                for o in b.common("forget", "forget", steps)
                if not o.startswith(("data.eval_path", "trainer.save_steps"))
            ]
            with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
                cfg = compose(
                    "config",
                    overrides=[
                        *overrides,
                        *common,
                        "data.eval_size=0",
                        "eval.generate=false",
                        "trainer.learning_rate=1e-3",
                        f"trainer.save_steps={b.s.npo_every}",
                        "trainer.save_total_limit=null",
                    ],
                )  # every checkpoint is scored
            shutil.rmtree(out, ignore_errors=True)
            train(cfg, output_dir=out)
        seconds = json.loads((out / "summary.json").read_text())["wall_seconds"]
        for step in range(b.s.npo_every, steps + 1, b.s.npo_every):
            model_dir = out / "model" if step == steps else out / f"checkpoint-{step}"
            rows.append(
                {
                    "method": name,
                    "steps": step,
                    "seconds": seconds if step == steps else 0.0,
                    "forget_nll": token_nll(model_dir, forget),
                    "retain_nll": token_nll(model_dir, retain),
                }
            )
        print(
            f"bench: {run}: forget NLL {rows[-1]['forget_nll']:.3f} retain NLL {rows[-1]['retain_nll']:.3f}",
            flush=True,
        )
    return rows


def retain_at(trajectory: list[dict], forget_nll: float) -> float | None:
    """The retain NLL of a method's trajectory (reference first) interpolated at a forget NLL; None
    outside the forgetting it reached."""
    pts = sorted((r["forget_nll"], r["retain_nll"]) for r in trajectory)
    for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
        if f0 <= forget_nll <= f1 and f1 > f0:
            return r0 + (r1 - r0) * (forget_nll - f0) / (f1 - f0)
    return None


# -- report -----------------------------------------------------------------------------------------
def se(run: str) -> float:
    """Standard error of the mean reward of a run's policy samples."""
    rewards = json.loads((Path(run) / "eval" / "eval.json").read_text())["rewards_policy"]
    return statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else float("nan")


def run_seconds(b: Bench, unlearning: list[dict]) -> float:
    """Training + evaluation seconds of every run of the report (a reused run: its original time)."""
    total = sum(r["seconds"] for name, r in b.results.items() if name != "s4-modpo-w0.0")
    return total + sum(r.get("seconds", 0.0) for r in unlearning)


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def frontier_points(b: Bench, name: str) -> list[tuple[float, float, float]]:
    """(KL, reward, strength) of a study-1 method's finished runs, by KL."""
    m = LOSSES.get(name, Method((), ORIGINAL))  # AlignDistil: its teachers' β
    return sorted(
        (r["kl"], r["reward"], value)
        for value in (m.values or b.s.betas)
        if (r := b.results.get(m.run(name, value))) is not None
    )


def plot_frontier(b: Bench, out: Path, families: list[str]) -> None:
    """Reward against KL: one panel per family of methods, DPO's line (dashed) and the reference in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(families), figsize=(6.5 * len(families), 5), sharex=True, sharey=True, squeeze=False
    )
    ref = next(iter(b.results.values()))["reference_reward"]
    for family, ax in zip(families, axes[0]):
        ax.scatter([0], [ref], marker="*", s=160, color="k", label="reference", zorder=5)
        names = [n for n, m in LOSSES.items() if m.family == family]
        names += ["aligndistil"] if family == ORIGINAL else []
        if family != ORIGINAL and (dpo := frontier_points(b, "dpo")):
            ax.plot([0] + [p[0] for p in dpo], [ref] + [p[1] for p in dpo], "k--", label="dpo", alpha=0.6)
        for name in names:
            pts = frontier_points(b, name)
            if not pts:
                continue
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, alpha=0.85)
            symbol = LOSSES[name].symbol if name in LOSSES else "β"
            for kl, rew, value in pts:
                ax.annotate(
                    f"{symbol}={value:g}",
                    (kl, rew),
                    fontsize=6,
                    color=line.get_color(),
                    xytext=(3, 2),
                    textcoords="offset points",
                )
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(xlabel="KL(π‖π_ref), nats per completion (from policy samples)", title=family)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean VADER reward of samples")
    fig.suptitle("Controlled sentiment on stories260k: reward vs KL")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def against_dpo(b: Bench, r: dict) -> str:
    """Where a run sits against DPO's frontier: the polyline from the reference (KL 0) through DPO's runs
    by KL. "beyond" / "below" when its reward is more / less than DPO's interpolated at the same KL by
    over twice the combined standard error (the run's and the largest of DPO's), "on" else; past DPO's
    largest KL, "below" DPO's best reward so, else "more KL"."""
    dpo = frontier_points(b, "dpo")
    if not dpo:
        return "no DPO"
    margin = 2 * math.hypot(
        se(r["run"]), max(se(b.results[LOSSES["dpo"].run("dpo", v)]["run"]) for *_, v in dpo)
    )
    pts = [(0.0, r["reference_reward"])] + [(kl, rew) for kl, rew, _ in dpo]
    if r["kl"] > pts[-1][0]:
        best = max(rew for _, rew in pts)
        return "below" if r["reward"] < best - margin else "more KL"
    kl = max(r["kl"], 0.0)  # a Monte-Carlo KL can come out below 0: the reference's place then
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            at = r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
            break
    diff = r["reward"] - at
    return "beyond" if diff > margin else "below" if diff < -margin else "on"


def plot_xy(
    points: list[tuple[float, float, str]],
    xlabel: str,
    ylabel: str,
    title: str,
    out: Path,
    extra: list[tuple[float, float, str]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for x, y, label in extra:
        ax.scatter([x], [y], marker="*", s=140, color="k")
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_unlearning(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ref = rows[0]
    ax.scatter([ref["forget_nll"]], [ref["retain_nll"]], marker="*", s=150, color="k", label="reference")
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        pts = [ref] + [r for r in rows[1:] if r["method"] == method]
        ax.plot([p["forget_nll"] for p in pts], [p["retain_nll"] for p in pts], "o-", label=method)
    ax.set(
        xlabel="forget NLL per token (higher = more forgotten)",
        ylabel="held-out retain NLL per token (lower = better)",
        title=f"Unlearning the stories of {FORGET_NAME}",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def report(
    b: Bench, unlearning: list[dict], stats: dict, wall: float, command: str, docs: Path, figs: Path
) -> str:
    import torch

    R = b.results
    s = b.s
    mid = 0.1 if 0.1 in s.betas else s.betas[0]
    rel = os.path.relpath(figs, docs.parent if docs.suffix else docs)
    lines = [
        "# Benchmarks: controlled sentiment on stories260k",
        "",
        "The IMDb controlled-sentiment experiment of DPO (Rafailov et al. 2023, §6.1), also used by TDPO, "
        "rDPO and SparsePO, rebuilt for a 2-core CPU. Generated by one command; every number below comes "
        "from its last run.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        "shared with other jobs while measured",
        (
            f"- this report was assembled from the finished runs in `{b.runs.name}/` (`--report-only`, "
            f"{wall / 60:.1f} min); "
            if not b.may_train
            else f"- wall time of this invocation: **{wall / 60:.1f} min**; "
        )
        + f"training + evaluation summed over its "
        f"{len(R) + len({r['method'] for r in unlearning[1:]}) - ('s4-modpo-w0.0' in R)} "
        f"runs: **{run_seconds(b, unlearning) / 60:.1f} min** "
        "(runs reused with `--reuse` count their original time); sampling the data once more, cached "
        "afterwards in `runs/cache/sentiment/` by seed and size",
        f"- seeds: data {b.seed} (train openings) / {b.seed + 1} "
        f"(held-out openings), training `seed={b.seed}`",
        "",
        "## Set-up",
        "",
        "- **policy = reference**: `../shared/models/stories260k`, "
        "Karpathy's TinyStories Llama (260K parameters, "
        "vocabulary 512); full fine-tuning.",
        "- **ground-truth reward**: VADER compound score of "
        "the completion (`alignlab.bench.sentiment.vader`, "
        "PyPI `vadersentiment`), in [-1, 1]. It plays the role of the IMDb sentiment classifier.",
        f"- **data**: {stats['train_prompts']} story openings with "
        "neutral wording (`alignlab.bench.sentiment.story_prompts`; "
        f"held-out openings use other character names), {s.samples_per_prompt} samples of the reference each "
        f"(ancestral sampling, up to {s.max_new_tokens} tokens, cut after the last full sentence), "
        f"VADER-scored: mean score {stats['mean_score']:.3f}, "
        f"{stats['zero_scores']:.0%} of samples score exactly 0.",
        f"  - pairs: best vs worst sample, ties skipped: {stats['pairs']} pairs "
        f"(chosen mean {stats['chosen_mean']:.3f}, rejected mean {stats['rejected_mean']:.3f});",
        f"  - TPO triples (gold = best, chosen = second, rejected = worst): {stats['triples']};",
        "  - BCO thumbs-up / down (score above / below the "
        f"median {stats['median_score']:.3f}; at the median "
        f"skipped): {stats['unpaired']} ({stats['desirable']} desirable).",
        f"- **training**: `alignlab.train.run` on a composed config per run: {s.steps} steps, batch "
        f"{s.batch_size}, AdamW lr {s.lr}, constant after no warm-up (linear decay), full fine-tuning.",
        f"- **evaluation**: the end-of-training eval (`eval.reward=alignlab.bench.sentiment:vader_reward`, "
        f"`eval.num_prompts={s.eval_prompts}`, `eval.max_new_tokens={s.max_new_tokens}`): one sample per "
        "held-out opening from the policy and from the reference (the same seed), mean VADER reward, "
        "win rate against the reference's sample (ties ½), KL(π‖π_ref) = mean over the policy's samples of "
        "log π(y|x) − log π_ref(y|x) (nats per completion). ± is the standard error over prompts.",
        "",
        "## 1. Reward against KL, every preference loss at three strengths",
        "",
        f"![reward vs KL]({rel}/frontier.png)",
        "",
        "The methods added for issue 16, DPO's line dashed in each panel:",
        "",
        f"![reward vs KL, new methods]({rel}/frontier_new.png)",
        "",
        "| loss | β or strength | reward | KL | win rate | held-out acc. | mean length | against DPO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = next(iter(R.values()))
    lines.append(
        f"| reference | – | {ref['reference_reward']:.3f} | 0 | 0.5 | – | {ref['reference_length']:.1f} | – |"
    )
    verdicts: dict[str, dict[str, dict[str, list[str]]]] = {}  # family -> where -> method -> strengths
    for name in [*LOSSES, "aligndistil"]:
        m = LOSSES.get(name, Method((), ORIGINAL))
        for value in m.values or s.betas:
            r = R.get(m.run(name, value))
            if r:
                where = "–" if name == "dpo" else against_dpo(b, r)
                strength = f"{value:g}" if m.symbol == "β" else f"{m.symbol} = {value:g}"
                verdicts.setdefault(m.family, {}).setdefault(where, {}).setdefault(name, []).append(strength)
                lines.append(
                    f"| {name} | {strength} | {r['reward']:.3f} ± {se(r['run']):.3f} | {r['kl']:.2f} | "
                    f"{r['win_rate']:.3f} | {fmt(r['accuracy'])} | {r['length']:.1f} | {where} |"
                )
    lines += [
        "",
        "β is each loss's own β (for ASFT the β of its log-sigmoid terms, for TPO the β of its preference "
        "term, for MODPO w = (1, 0.1) with the length margin, for AlignDistil the teachers' DPO β). "
        "The methods of issue 16 at DPO's three β, except: SimPO at β = 1, 2, 5 (its β scales a "
        "length-averaged log-prob; the paper's 2.0 in the middle), γ = 0.5; ORPO at λ = 0.1, 1, 5, the "
        "weight of its odds-ratio term (it has no β; TRL calls λ `beta`); combo (MPO: 0.8·DPO + 0.2·BCO "
        "paired + 1·SFT) at the β of its DPO and BCO terms; KTO on the pairs taken apart (chosen = "
        "desirable, rejected = undesirable, λ_D = λ_U = 1); `dpo-<loss_type>` is `loss=dpo "
        "loss.loss_type=<loss_type>` (TRL's forms, their own constants at the defaults); dpo-forward_kl, "
        "dpo-js and dpo-alpha0.5 are f-DPO's `f_divergence` forward_kl, js_divergence and "
        "alpha_divergence (a = 0.5); ld-dpo is `ld_alpha=0.5`; wpo is `wpo=true`; dpo-dpop is DPOP "
        "(λ = 50); trdpo is DPO whose reference moves to 0.6·policy + 0.4·reference every 10 of the 40 "
        "steps (`model.reference_sync`, TR-DPO's α with a τ scaled to this short run); jpo trains on "
        "joint pairs built from the same pairs (`joint_of`: half its own pair, half against the previous "
        "opening's rejected sample) and is evaluated on the held-out joint pairs' chosen openings, whose "
        "reference reward differs slightly from the pairs' (0.260 against 0.263). "
        "Held-out accuracy: the loss's own preference accuracy on held-out pairs, where it logs one.",
        "",
        "**Against DPO** (last column): DPO's frontier is the line from the reference (KL 0) through DPO's "
        "three runs by KL; a run is *beyond* / *below* it when its reward is above / under DPO's, "
        "interpolated at the same KL, by more than twice the combined standard error (the run's and the "
        "largest of DPO's), *on* it otherwise. Past DPO's largest KL a run is *below* when DPO's best run "
        "has more reward (by the same margin) at less KL, *more KL* otherwise: a reward not below DPO's "
        "best, paid with a KL no DPO run reached. DPO's segment from the reference to its "
        "β = 0.5 run is a chord: a concave frontier lies above it, so *beyond* at a KL under that run's "
        "is weaker evidence.",
        "",
    ]
    for family in (ORIGINAL, REFERENCE_FREE, DPO_FORMS, DPO_WEIGHTS):
        v = verdicts.get(family, {})
        parts = [
            f"{label}: " + ", ".join(f"{name} ({', '.join(values)})" for name, values in v[key].items())
            for key, label in (
                ("beyond", "beyond DPO's frontier"),
                ("on", "on it"),
                ("below", "below it"),
                ("more KL", "past DPO's KL, reward not below its best"),
            )
            if v.get(key)
        ]
        if parts:
            lines += [f"- *{family}* — " + "; ".join(parts) + ".", ""]
    lines += [
        "**npo** is not in this study: it is an unlearning loss (it has no chosen response to move "
        "towards), see study 5.",
        "",
    ]
    # study 2
    lines += [
        "## 2. DPO against rDPO under label flips",
        "",
        "β = 0.1; a random 20% / 40% of the training pairs "
        f"have chosen and rejected swapped (seed {b.seed}); "
        "rDPO is told the true flip rate (ε). Held-out pairs are clean.",
        "",
        "| flip rate | DPO reward | DPO KL | DPO acc. | rDPO reward | rDPO KL | rDPO acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    rows2 = [(0.0, R.get(f"s1-dpo-b{mid}"), R.get(f"s1-rdpo-b{mid}"))] + [
        (rate, R.get(f"s2-dpo-flip{rate}"), R.get(f"s2-rdpo-flip{rate}")) for rate in s.flips
    ]
    for rate, d, r in rows2:
        if d and r:
            lines.append(
                f"| {rate:.0%}{' (ε = 0.1)' if rate == 0 else ''} | {d['reward']:.3f} ± {se(d['run']):.3f} | "
                f"{d['kl']:.2f} | {fmt(d['accuracy'])} | "
                f"{r['reward']:.3f} ± {se(r['run']):.3f} | {r['kl']:.2f} | "
                f"{fmt(r['accuracy'])} |"
            )
    clean_d, clean_r = rows2[0][1], rows2[0][2]
    drops = [
        (rate, clean_d["reward"] - d["reward"], clean_r["reward"] - r["reward"])
        for rate, d, r in rows2[1:]
        if d and r and clean_d and clean_r
    ]
    if drops:
        ok = all(dr < dd for _, dd, dr in drops)
        lines += [
            "",
            "Claim (rDPO paper): *rDPO degrades less than DPO under label flips* — "
            + verdict(ok)
            + " here: "
            + "; ".join(
                f"at {rate:.0%} the reward drops by {dd:.3f} for DPO and {dr:.3f} for rDPO"
                for rate, dd, dr in drops
            )
            + ".",
            "",
        ]
    # study 3
    rows3 = [
        (loss, label, r)
        for loss in UNPAIRED
        for label, r in (
            ("pairs taken apart (chosen = up, rejected = down)", R.get(f"s1-{loss}-b{mid}")),
            ("every sample labelled by the median score", R.get(f"s3-{loss}-unpaired")),
        )
        if r
    ]
    if rows3:
        lines += [
            "## 3. BCO and KTO on unpaired thumbs-up / down",
            "",
            "| loss | data | reward | KL | win rate |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {loss} | {label} | {r['reward']:.3f} ± {se(r['run']):.3f} | {r['kl']:.2f} | "
            f"{r['win_rate']:.3f} |"
            for loss, label, r in rows3
        ]
        lines += [
            "",
            f"Both at β = {mid} (KTO: λ_D = λ_U = 1, its KL reference point from mismatched completions).",
        ]
        for loss in UNPAIRED:
            unp = R.get(f"s3-{loss}-unpaired")
            if unp:
                gain = unp["reward"] - unp["reference_reward"]
                lines.append(
                    f"{loss.upper()} on thumbs-up/down labels alone: reward {unp['reward']:.3f} against the "
                    f"reference's {unp['reference_reward']:.3f} ("
                    + (
                        "an improvement"
                        if gain > 2 * se(unp["run"])
                        else "no improvement beyond 2 standard errors"
                    )
                    + ")."
                )
        lines.append("")
    # study 4
    front = [
        (R[f"s4-modpo-w{w}"]["length"], R[f"s4-modpo-w{w}"]["reward"], f"w_len={w}")
        for w in s.modpo_w
        if f"s4-modpo-w{w}" in R
    ]
    if front:
        plot_xy(
            front,
            "mean completion length (tokens) of policy samples",
            "mean VADER reward",
            "MODPO: sentiment pairs + length margin, w = (1, w_len)",
            figs / "modpo_front.png",
            [(ref["reference_length"], ref["reference_reward"], "reference")],
        )
        lines += [
            "## 4. MODPO: sentiment and brevity",
            "",
            "MODPO on the sentiment pairs with the length margin r = −|y| (tokens), w = (1, w_len), β = 0.1; "
            "w_len = 0 is DPO.",
            "",
            f"![MODPO front]({rel}/modpo_front.png)",
            "",
            "| w_len | reward | KL | mean length |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {w} | {R[f's4-modpo-w{w}']['reward']:.3f} ± {se(R[f's4-modpo-w{w}']['run']):.3f} | "
            f"{R[f's4-modpo-w{w}']['kl']:.2f} | {R[f's4-modpo-w{w}']['length']:.1f} |"
            for w in s.modpo_w
            if f"s4-modpo-w{w}" in R
        ]
        lengths = [p[0] for p in front]
        ok = all(a >= b_ for a, b_ in zip(lengths, lengths[1:])) and lengths[-1] < lengths[0]
        rewards = [p[1] for p in front]
        why = ""
        if not ok and max(lengths) - min(lengths) < 0.5:
            why = (
                f" Every sample is capped at {s.max_new_tokens} "
                "tokens: stories260k almost never ends a story that "
                "early, and this short training does not teach it to, so the length objective cannot show in "
                "samples; its weight still costs sentiment reward "
                "and adds KL (the margin is paid in the loss)."
            )
        lines += [
            "",
            f"Claim (MODPO paper): *raising a margin's weight moves the policy along that objective* — "
            f"{verdict(ok)} here for length: mean length "
            f"{' → '.join(f'{x:.1f}' for x in lengths)} and reward "
            f"{' → '.join(f'{x:.3f}' for x in rewards)} as w_len grows.{why}",
            "",
        ]
    # study 5
    if unlearning:
        plot_unlearning(unlearning, figs / "unlearning.png")
        base = unlearning[0]
        lines += [
            "## 5. NPO against gradient ascent",
            "",
            "Forget set: the reference's samples for the "
            f"openings that name {FORGET_NAME} ({stats['forget']} "
            "completions); utility: per-token NLL of held-out "
            "retain completions (other characters' openings, "
            "never trained on). Gradient ascent is NPO at β = 1e-4, its documented β → 0 limit "
            "(alignlab/losses/npo.py: the gradient 2σ(βρ)∇ρ tends to ∇ρ); RT adds the retain NLL "
            "(NPO+RT, and GA+RT = gradient difference). lr "
            "1e-3, the same for all; each method is one run of "
            f"{s.npo_steps} steps whose checkpoint every {s.npo_every} "
            "steps is scored, so the methods are compared "
            "at equal forgetting (the NPO paper's Figure 1 "
            "compares forget quality against utility the same way).",
            "",
            f"![unlearning]({rel}/unlearning.png)",
            "",
            "| method | steps | forget NLL ↑ | retain NLL ↓ |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r.get('steps', 0)} | {r['forget_nll']:.3f} | {r['retain_nll']:.3f} |"
            for r in unlearning
        ]
        trajectories: dict[str, list[dict]] = {}
        for r in unlearning[1:]:
            trajectories.setdefault(r["method"].split()[0], [base]).append(r)
        for a, g_ in (("NPO", "GA"), ("NPO+RT", "GA+RT")):
            if a not in trajectories or g_ not in trajectories:
                continue
            reach = min(max(r["forget_nll"] for r in trajectories[m]) for m in (a, g_))
            levels = [base["forget_nll"] + d for d in (0.5, 1, 2, 4, 8) if base["forget_nll"] + d <= reach]
            matched = [(f, retain_at(trajectories[a], f), retain_at(trajectories[g_], f)) for f in levels]
            matched = [(f, n, g) for f, n, g in matched if n is not None and g is not None]
            if not matched:
                lines += [
                    "",
                    f"Claim (NPO paper): *{a} keeps retain utility better than {g_}* — not testable here: "
                    f"their trajectories reach no common level of forgetting above the reference's "
                    f"{base['forget_nll']:.2f} + 0.5.",
                ]
                continue
            ok = all(n < g - 0.02 for _, n, g in matched)
            lines += [
                "",
                f"Claim (NPO paper): *{a} keeps retain utility better than {g_}* — {verdict(ok)} here at "
                "equal forgetting: "
                + "; ".join(
                    f"at forget NLL {f:.2f} the retain NLL is {n:.2f} for {a} and {g:.2f} for {g_}"
                    for f, n, g in matched
                )
                + f" (reference {base['retain_nll']:.2f})."
                + (
                    ""
                    if ok
                    else " Forget and retain stories come from one distribution (only a name differs), "
                    "so forgetting one costs the other at a similar rate whichever the loss; NPO's bounded "
                    "gradient slows forgetting down but does not separate the two."
                ),
            ]
        lines.append("")
    # study 6
    lines += [
        "## 6. AlignDistil: teachers and student",
        "",
        "The DPO teacher is study 1's DPO run at the same β, "
        "the reverse teacher DPO on swapped pairs; the student "
        "is trained with AlignDistil's token-adaptive extrapolated "
        "teacher (β₂ = default) on the chosen responses.",
        "",
        "| β | DPO teacher reward / KL | reverse teacher reward / KL | student reward / KL |",
        "|---|---|---|---|",
    ]
    for beta in s.betas:
        t, rv, st = R.get(f"s1-dpo-b{beta}"), R.get(f"s6-reverse-b{beta}"), R.get(f"s1-aligndistil-b{beta}")
        if t and rv and st:
            lines.append(
                f"| {beta} | {t['reward']:.3f} / {t['kl']:.2f} | {rv['reward']:.3f} / {rv['kl']:.2f} | "
                f"{st['reward']:.3f} / {st['kl']:.2f} |"
            )
    lines.append("")
    # study 7
    pairs7 = [(beta, R.get(f"s1-dpo-b{beta}"), R.get(f"s1-tdpo-b{beta}")) for beta in s.betas]
    pairs7 = [(beta, d, t) for beta, d, t in pairs7 if d and t]
    if pairs7:
        lines += [
            "## 7. TDPO against DPO: KL at similar reward",
            "",
            "| β | DPO reward | DPO KL | TDPO reward | TDPO KL |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {beta} | {d['reward']:.3f} ± {se(d['run']):.3f} | {d['kl']:.2f} | {t['reward']:.3f} ± "
            f"{se(t['run']):.3f} | {t['kl']:.2f} |"
            for beta, d, t in pairs7
        ]
        # the reference itself is on every frontier (β → ∞: reward of the reference at KL 0)
        dpo_pts = sorted([(ref["reference_reward"], 0.0)] + [(d["reward"], d["kl"]) for _, d, _ in pairs7])

        def dpo_kl_at(reward):  # DPO's KL interpolated on its own frontier at this reward (None outside)
            for (r0, k0), (r1, k1) in zip(dpo_pts, dpo_pts[1:]):
                if r0 <= reward <= r1 and r1 > r0:
                    return k0 + (k1 - k0) * (reward - r0) / (r1 - r0)
            return None

        cmp = [(t["reward"], t["kl"], dpo_kl_at(t["reward"])) for _, _, t in pairs7]
        inside = [(rw, kt, kd) for rw, kt, kd in cmp if kd is not None]
        if inside:
            ok = all(kt < kd for _, kt, kd in inside)
            lines += [
                "",
                "Claim (TDPO paper): *TDPO reaches a given reward at lower KL than DPO* — "
                + verdict(ok)
                + " here: "
                + "; ".join(
                    f"at reward {rw:.3f} TDPO's KL is {kt:.2f}, DPO's (interpolated) {kd:.2f}"
                    for rw, kt, kd in inside
                )
                + ".",
                "",
            ]
        else:
            lines += [
                "",
                "Claim (TDPO paper): *TDPO reaches a given reward at lower KL than DPO* — not testable "
                "directly here: no TDPO point falls inside DPO's "
                "reward range; compare the points in the frontier "
                "plot.",
                "",
            ]
    lines += [
        "## Caveats",
        "",
        "- One seed, one data draw. With about 100 held-out openings the standard error of a mean reward is "
        "±0.03 to ±0.04 (given per row): differences under about 0.08 are not evidence.",
        f"- A fixed, short budget for every loss ({s.steps} "
        f"steps at lr {s.lr}): losses are compared where they "
        "are after the same number of updates, not at their "
        "optima, so β moves the points less than the theory "
        "(a larger β means a tighter optimum, but none of these runs gets near its optimum).",
        "- KL is a Monte-Carlo estimate from one sample per prompt; it can be noisy, and a loss that changes "
        "the model's habits outside the sentiment (e.g. where it puts EOS, or which names it uses) pays KL "
        "for it without any reward. Completions are capped at "
        f"{s.max_new_tokens} tokens; training completions were cut after their last full sentence (EOS "
        "appended by the data pipeline), so an SFT term teaches the policy to end early, which costs KL.",
        '- VADER is a lexicon: the policy raises its reward by using more positive words ("happy", '
        '"loved", "fun"), which is exactly what the IMDb task rewards as well; the samples in each run\'s '
        "`eval/report.md` show it.",
        "- TPO is trained on triples and evaluated on the "
        "held-out openings that have three distinct samples, "
        "so its reference reward differs from the others'; compare it by its win rate and its gain over its "
        "own reference.",
        "",
    ]
    missing = [LOSSES[name].run(name, value) for name in s.losses for value in LOSSES[name].points(s)] + [
        f"s1-aligndistil-b{beta}" for beta in s.betas if s.aligndistil
    ]
    missing = [run for run in missing if run not in R]
    if missing:
        lines += [
            "## Runs not in this report",
            "",
            "Not trained when this report was assembled (the full command trains them): "
            + ", ".join(f"`{m}`" for m in missing)
            + ".",
            "",
        ]
    if b.failures:
        lines += ["## Failed runs", ""] + [f"- `{name}`: {err}" for name, err in b.failures.items()] + [""]
    lines += ["## Runs", "", "| run | seconds |", "|---|---|"]
    lines += [
        f"| {name} | {r['seconds']:.0f} |" for name, r in R.items() if not name.startswith("s4-modpo-w0")
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a smoke version: a few prompts and steps (CI)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="the report (markdown)")
    p.add_argument("--figures", type=Path, default=None, help="PNG folder (default: <out folder>/benchmarks)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_sentiment", help="run directories")
    p.add_argument(
        "--cache", type=Path, default=REPO / "runs" / "cache" / "sentiment", help="sampled data cache"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs instead of retraining")
    p.add_argument("--only", default="1234567", help="the studies to run, e.g. 12 (default: all)")
    p.add_argument(
        "--losses",
        default="",
        help="study 1's methods to train, comma-separated, e.g. dpo,simpo (default: all; the report "
        "includes every finished run in --runs with --reuse)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: report the finished runs in --runs"
    )
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.losses.split(","))) - {*LOSSES, "aligndistil"})
    if unknown:
        print(
            f"bench_sentiment: --losses names {unknown}: not in LOSSES ({', '.join(LOSSES)})", file=sys.stderr
        )
        return 2
    if not MODEL.exists():
        print(f"bench_sentiment: needs {MODEL} (the ../shared folder beside the repository)", file=sys.stderr)
        return 2
    start = time.time()
    s = Settings(args.tiny)
    if args.losses:
        s.losses = [x for x in args.losses.split(",") if x in LOSSES]
        s.aligndistil = "aligndistil" in args.losses.split(",")
    figs = args.figures or args.out.parent / "benchmarks"
    figs.mkdir(parents=True, exist_ok=True)
    data = build_data(s, args.seed, args.cache)
    b = Bench(s, data, args.runs, args.seed, args.reuse or args.report_only, train=not args.report_only)
    if set("167") & set(args.only):
        study_frontier(b, first=True)  # β = 0.1 first: the other studies compare with it
    if "2" in args.only:
        study_flips(b)
    if "3" in args.only:
        study_unpaired(b)
    if "4" in args.only:
        study_modpo(b)
    unlearning = study_unlearning(b) if "5" in args.only else []
    if set("167") & set(args.only):
        study_frontier(b, first=False)
    if b.results:
        plot_frontier(b, figs / "frontier.png", [ORIGINAL])
        plot_frontier(b, figs / "frontier_new.png", [REFERENCE_FREE, DPO_FORMS, DPO_WEIGHTS])
    command = "python scripts/bench_sentiment.py" + (" --tiny" if args.tiny else "")
    command += " --reuse" if args.reuse else ""
    text = report(b, unlearning, data["stats"], time.time() - start, command, args.out, figs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.runs / "results.json").write_text(
        json.dumps({"results": b.results, "unlearning": unlearning, "stats": data["stats"]}, indent=2)
    )
    print(f"bench_sentiment: {args.out} and {figs} in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
