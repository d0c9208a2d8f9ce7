"""scripts/bench_sentiment.py: how the scored samples are cut into data, and the --tiny benchmark end to
end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sentiment.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sentiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GROUPS = [
    {"prompt": "p1", "completions": ["a", "b", "c", "d"], "scores": [0.5, -0.2, 0.9, 0.0]},
    {"prompt": "p2", "completions": ["e", "f", "g", "h"], "scores": [0.0, 0.0, 0.0, 0.0]},  # all tie
    {"prompt": "p3", "completions": ["i", "i", "j", "j"], "scores": [0.3, 0.3, -0.4, -0.4]},  # two distinct
]


def test_pairs_take_best_against_worst_and_skip_ties():
    assert _bench().pairs_of(GROUPS) == [
        {"prompt": "p1", "chosen": "c", "rejected": "b", "chosen_score": 0.9, "rejected_score": -0.2},
        {"prompt": "p3", "chosen": "i", "rejected": "j", "chosen_score": 0.3, "rejected_score": -0.4},
    ]


def test_triples_gold_second_worst():
    bench = _bench()
    assert bench.triples_of(GROUPS) == [{"prompt": "p1", "gold": "c", "chosen": "a", "rejected": "b"}]


def test_unpaired_labels_split_at_the_median():
    rows, median = _bench().unpaired_of(GROUPS)
    assert median == 0.0  # the 12 scores sorted: -0.4 -0.4 -0.2 0 0 0 0 0 0.3 0.3 0.5 0.9
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("a", True),
        ("b", False),
        ("c", True),
        ("i", True),
        ("i", True),
        ("j", False),
        ("j", False),
    ]


def test_flips_swap_the_requested_fraction():
    rows = [{"prompt": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    out = _bench().flipped(rows, 0.4, seed=0)
    assert sum(r["chosen"].startswith("r") for r in out) == 4
    assert all({r["chosen"], r["rejected"]} == {f"c{r['prompt']}", f"r{r['prompt']}"} for r in out)


def test_retain_nll_is_interpolated_at_equal_forgetting():
    trajectory = [
        {"forget_nll": 1.0, "retain_nll": 1.0},  # the reference
        {"forget_nll": 3.0, "retain_nll": 2.0},  # after some steps
        {"forget_nll": 5.0, "retain_nll": 6.0},
    ]
    retain_at = _bench().retain_at
    assert retain_at(trajectory, 2.0) == pytest.approx(1.5)
    assert retain_at(trajectory, 4.0) == pytest.approx(4.0)
    assert retain_at(trajectory, 5.5) is None  # beyond the forgetting the method reached


def test_methods_name_their_runs_and_set_their_strength():
    losses = _bench().LOSSES
    assert losses["dpo"].run("dpo", 0.1) == "s1-dpo-b0.1" and losses["dpo"].args(0.1) == [
        "loss=dpo",
        "loss.beta=0.1",
    ]
    assert losses["orpo"].run("orpo", 5.0) == "s1-orpo-lam5.0" and "loss.lam=5.0" in losses["orpo"].args(5.0)
    combo = losses["combo"].args(0.5)
    assert "+loss.term_options.dpo.beta=0.5" in combo and "+loss.term_options.bco.beta=0.5" in combo
    assert "loss.loss_type=discopop" in losses["dpo-discopop"].args(0.1)


def _run(tmp_path, name, kl, reward, rewards):
    run = tmp_path / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps({"rewards_policy": rewards}))
    return {"run": str(run), "kl": kl, "reward": reward, "reference_reward": 0.2}


def test_runs_are_placed_against_dpos_frontier(tmp_path):
    bench = _bench()
    s = bench.Settings(tiny=False)  # β 0.05, 0.1, 0.5
    b = bench.Bench(s, {}, tmp_path, 0, reuse=True, train=False)
    # DPO's frontier: reference (0, 0.2) → (2, 0.6) → (4, 0.7) → (8, 0.8); every SE 0.01 (rewards ± 0.05
    # and one 0 over 25 prompts: stdev 0.05), so a margin of 2·√2·0.01 ≈ 0.028
    spread = [0.05, -0.05] * 12 + [0.0]
    for beta, kl, reward in ((0.5, 2.0, 0.6), (0.1, 4.0, 0.7), (0.05, 8.0, 0.8)):
        b.results[f"s1-dpo-b{beta}"] = _run(tmp_path, f"dpo{beta}", kl, reward, [reward + x for x in spread])
    place = lambda kl, reward: bench.against_dpo(b, _run(tmp_path, f"x{kl}-{reward}", kl, reward, spread))  # noqa: E731
    assert place(1.0, 0.45) == "beyond"  # DPO's chord at KL 1: 0.4
    assert place(-0.1, 0.21) == "on"  # a negative KL estimate: at the reference
    assert place(3.0, 0.66) == "on"  # DPO at KL 3: 0.65
    assert place(6.0, 0.70) == "below"  # DPO at KL 6: 0.75
    assert place(12.0, 0.75) == "below"  # DPO reaches 0.8 at KL 8
    assert place(12.0, 0.78) == "more KL"  # not below DPO's best by the margin, at more KL
    assert place(12.0, 0.85) == "more KL"


@pytest.mark.slow
def test_tiny_benchmark_writes_its_report_and_figures(shared_path, tmp_path):
    shared_path("models", "stories260k")
    out = tmp_path / "docs" / "benchmarks.md"
    assert (
        _bench().main(
            [
                "--tiny",
                "--out",
                str(out),
                "--runs",
                str(tmp_path / "runs"),
                "--cache",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    text = out.read_text()
    for section in (
        "## 1. Reward against KL",
        "## 2. DPO against rDPO",
        "## 3. BCO",
        "## 4. MODPO",
        "## 5. NPO against gradient ascent",
        "## 6. AlignDistil",
        "## 7. TDPO",
    ):
        assert section in text
    assert "python scripts/bench_sentiment.py --tiny" in text and "## Failed runs" not in text
    assert "| kto | every sample labelled by the median score |" in text
    for png in ("frontier.png", "frontier_new.png", "modpo_front.png", "unlearning.png"):
        assert (tmp_path / "docs" / "benchmarks" / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert {
        "s1-dpo-b0.1",
        "s1-kto-b0.1",
        "s2-rdpo-flip0.4",
        "s3-bco-unpaired",
        "s3-kto-unpaired",
        "s1-aligndistil-b0.1",
    } <= set(results["results"])
    # study 5: the reference, then each method's checkpoints (steps 1 and 2 of the tiny run): a trajectory
    assert [(r["method"].split()[0], r.get("steps", 0)) for r in results["unlearning"]] == [
        ("reference", 0),
        ("NPO", 1),
        ("NPO", 2),
        ("GA", 1),
        ("GA", 2),
    ]
