"""scripts/bench_trl.py: the timing arithmetic, the HH split, and an end-to-end --quick run against TRL."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_trl.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_step_times_are_intervals_between_step_ends_after_warmup():
    probe = _bench().Probe()
    probe.step_ends = [10.0, 11.0, 13.0, 16.0]  # four steps ended at these times
    probe.tokens = [100, 200, 300, 400]
    probe.slots = [100, 250, 300, 500]
    out = probe.result(warmup=2, baseline=0.0)
    # steps 2 and 3 are timed: 13-11 = 2 s and 16-13 = 3 s, holding 300 + 400 tokens
    assert out["step_times"] == [2.0, 3.0]
    assert out["tokens_per_s"] == pytest.approx(700 / 5)
    assert out["pad_fraction"] == pytest.approx(1 - 1000 / 1150)


def test_dpo_model_flops_count_every_matmul_and_attention():
    # d=4, 1 layer, 2 heads of 2 (kv too), MLP 8, vocab 10: q,o 2*(4*4) + k,v 2*(4*4) = 64, MLP 3*4*8 = 96,
    # head 10*4 = 40 -> 200 weights in matmuls; a forward token: 2*200 + 4*1*4*T, T = 5 -> 480 FLOPs
    config = {
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 8,
        "vocab_size": 10,
    }
    flops = _bench().dpo_flops_per_token
    assert flops(config, 5, live_reference=True) == 4 * 480  # policy forward + backward (3), reference (1)
    assert flops(config, 5, live_reference=False) == 3 * 480
    # grouped-query attention: 1 kv head of 2 -> k,v 2*(4*2) = 16 instead of 32
    assert flops({**config, "num_key_value_heads": 1}, 5, live_reference=False) == 3 * (480 - 2 * 16)


def test_mfu_uses_the_gpu_peak_for_bf16_only():
    bench = _bench()
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
    assert bench.peak_flops(None, "bfloat16") is None and bench.peak_flops("Some GPU", "bfloat16") is None
    assert bench.peak_flops("Some GPU", "bfloat16", override_tflops=100) == 100e12
    probe = bench.Probe()
    probe.step_ends, probe.tokens, probe.rows = [0.0, 1.0, 3.0], [60, 80, 100], [4, 4, 4]
    out = probe.result(warmup=1, baseline=0.0, flops_of=lambda tokens, length: tokens * length, peak=100.0)
    # timed steps 1, 2 (1 s, 2 s): 80 tokens of mean length 20 and 100 of 25 -> (1600 + 2500) / 3 s
    assert out["model_tflops_per_s"] == pytest.approx(4100 / 3 / 1e12)
    assert out["mfu"] == pytest.approx(4100 / 3 / 100)


def test_gradient_accumulation_adds_the_micro_batches_of_each_step():
    probe = _bench().Probe()
    probe.accum = 2
    probe.step_ends = [10.0, 12.0, 16.0]  # three optimizer steps, of two micro-batches each
    probe.tokens = [1, 2, 30, 40, 500, 600]
    probe.rows = [2, 2, 2, 2, 2, 2]
    out = probe.result(warmup=1, baseline=0.0, flops_of=lambda tokens, length: tokens * length, gemm=10.0)
    # timed steps 1 and 2 (2 s, 4 s) hold 30 + 40 and 500 + 600 tokens, 4 rows each
    assert out["tokens"] == [70, 1100]
    assert out["tokens_per_s"] == pytest.approx(1170 / 6)
    # model FLOPs: tokens x mean length = 70 * 17.5 + 1100 * 275 over 6 s, against a 10 FLOP/s GEMM
    flops = (70 * 17.5 + 1100 * 275) / 6
    assert out["model_tflops_per_s"] == pytest.approx(flops / 1e12)
    assert out["gemm_ratio"] == pytest.approx(flops / 10.0)


def test_gemm_rate_is_two_n_cubed_over_the_best_time():
    rate = _bench().gemm_rate(threads=1, n=64, repeats=2)
    assert 1e6 < rate < 1e13  # FLOP/s of a 64x64 matmul: plausible on any CPU


def test_profile_puts_each_op_in_one_category_and_the_rest_in_python():
    import torch

    bench = _bench()
    prof = bench.StepProfile(warmup=0, steps=1)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = torch.optim.AdamW([weight])
    prof.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with prof.profiler:
        x = torch.randn(32, 64)
        loss = torch.log_softmax(x @ weight, -1).sum()
        loss.backward()
        optimizer.step()
    prof.wall_s = 10.0  # pretend the step took 10 s: what no op accounts for is Python
    out = prof.breakdown()
    assert out["step_s"] == 10.0
    assert out["matmuls"] > 0 and out["log-softmax, logsumexp, gather"] > 0 and out["optimizer"] > 0
    assert out["attention"] == 0 and out["data loading, collation"] == 0
    categories = sum(v for k, v in out.items() if k not in ("step_s", "Python, framework"))
    assert categories + out["Python, framework"] == pytest.approx(10.0)
    assert ("matmuls", "aten::mm") in {(c, op) for c, op, _ in prof.top_ops}


def test_long_rows_are_real_hh_text_within_the_token_bounds(shared_path):
    shared_path("data", "hh-rlhf")
    from transformers import GPT2TokenizerFast

    gpt2 = shared_path("tokenizers", "gpt2")
    tok = GPT2TokenizerFast(vocab=str(gpt2 / "vocab.json"), merges=str(gpt2 / "merges.txt"))
    rows = _bench()._hh_long_rows(tok, 3, 300, 400)
    assert len(rows) == 3 and len({r["prompt"] for r in rows}) == 3
    for r in rows:
        for part in ("prompt", "chosen", "rejected"):
            assert 300 <= len(tok(r[part], add_special_tokens=False)["input_ids"]) <= 400, part
        assert r["prompt"].endswith("\n\nAssistant:") and r["chosen"] != r["rejected"]


def test_hh_split_takes_the_prompt_up_to_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    prompt, c, r = _bench()._split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (c, r) == (" like this", " no")
    assert _bench()._split_hh("no turns here", "x") is None


@pytest.mark.slow
def test_quick_run_against_trl_agrees_at_step_0_and_writes_the_table(shared_path, tmp_path):
    pytest.importorskip("trl")
    shared_path("models", "stories260k")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--workloads",
            "w1",
            "--sections",
            "trl",
            "--modes",
            "live",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    records = [r for r in results["records"] if r["section"] == "trl"]
    assert {r["framework"] for r in records} == {"alignlab", "trl"}
    for r in records:
        assert "error" not in r, r["error"]
        assert len(r["step_times"]) == 2 and all(t > 0 for t in r["step_times"])
        # policy = reference at step 0: the DPO loss is -log σ(0) = ln 2 in both frameworks
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    a, t = sorted(records, key=lambda r: r["framework"])
    assert abs(a["first_loss"] - t["first_loss"]) <= 1e-5
    # the same tokens: the policy's summed log-probs of the first batch agree (ln 2 alone would not show it)
    for key in ("logps/chosen", "logps/rejected"):
        assert a["first_metrics"][key] == pytest.approx(t["first_metrics"][key], abs=1e-4)
    ratios = results["workloads"]["w1"]["ratios"]["live"]
    assert ratios["loss0_agree"] is True
    table = (out / "results.md").read_text()
    assert "| W1: alignlab / TRL | tokens/s (of medians) |" in table and "| live reference |" in table
