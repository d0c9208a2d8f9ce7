"""A LoRA run on the embedded tiny model: the loss falls while the reference (the policy with its
adapters disabled) stays exactly the initial model; the adapter is saved, and merged it loads with
plain transformers; precomputed reference log-probs give the same losses as the live view."""

from __future__ import annotations

import json

import pytest
import torch

import alignlab.models
from alignlab.forward import concatenated_forward
from alignlab.models import AdapterDisabled
from alignlab.train import run

pytestmark = pytest.mark.slow

RESPONSES = ("chosen", "rejected")
LORA = (
    "+recipe=dpo",
    "model.lora.enabled=true",
    "trainer.learning_rate=3e-3",
    "trainer.logging_steps=1",
    "trainer.eval_steps=0",
)


def _losses(result):
    return [
        json.loads(line)["loss"] for line in result.metrics_file.read_text().splitlines() if '"loss"' in line
    ]


def _fixed_batch(tokenizer):
    from alignlab.data import PreferenceCollator

    rows = []
    for prompt, chosen, rejected in [
        ("review : the film was", "really great .", "really dull ."),
        ("in short , the book is", "quite charming !", "quite weak !"),
    ]:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        rows.append(
            {
                "prompt_ids": p,
                "chosen_ids": tokenizer(chosen, add_special_tokens=False).input_ids,
                "rejected_ids": tokenizer(rejected, add_special_tokens=False).input_ids,
            }
        )
    return PreferenceCollator(tokenizer.pad_token_id, responses=RESPONSES)(rows)


def test_lora_trains_reference_unchanged_adapter_saved_and_merged(tmp_path, compose_run, monkeypatch):
    seen = {}
    load_policy = alignlab.models.load_policy

    def recording_load_policy(cfg, tokenizer, seed):
        policy = load_policy(cfg, tokenizer, seed)
        seen.update(policy=policy, tokenizer=tokenizer, batch=_fixed_batch(tokenizer))
        seen["before"] = concatenated_forward(AdapterDisabled(policy), seen["batch"], RESPONSES, chunk_size=4)
        return policy

    monkeypatch.setattr(alignlab.models, "load_policy", recording_load_policy)
    # no end-of-training eval: it loads models through the load_policy recorded here
    cfg = compose_run(
        *LORA,
        "trainer.max_steps=40",
        "model.lora.merge_on_save=true",
        "eval.generate=false",
        f"data.cache_dir={tmp_path / 'c'}",
    )
    result = run(cfg, output_dir=tmp_path / "run")

    losses = _losses(result)
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)  # fresh adapters (B = 0): policy == reference
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5  # it learns (0.69 -> about 0.55)
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.7

    policy, batch = seen["policy"], seen["batch"]
    after = concatenated_forward(AdapterDisabled(policy), batch, RESPONSES, chunk_size=4)
    adapted = concatenated_forward(policy, batch, RESPONSES, chunk_size=4)
    for r in RESPONSES:
        assert torch.equal(after[r].token_logps, seen["before"][r].token_logps)  # the reference never moved
        assert not torch.allclose(adapted[r].token_logps, after[r].token_logps)  # the policy did

    # model/ holds the adapter and the tokenizer; model_merged/ is a plain transformers model
    assert (result.model_dir / "adapter_model.safetensors").exists()
    assert (result.model_dir / "adapter_config.json").exists() and (
        result.model_dir / "tokenizer.json"
    ).exists()
    assert not (result.model_dir / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    AutoTokenizer.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ours = concatenated_forward(merged, batch, RESPONSES)
    for r in RESPONSES:
        torch.testing.assert_close(ours[r].token_logps, adapted[r].token_logps, atol=1e-5, rtol=1e-5)


def test_lora_precomputed_reference_equals_live(tmp_path, compose_run):
    common = (*LORA, "trainer.max_steps=5", "model.lora.dropout=0", f"data.cache_dir={tmp_path / 'c'}")
    live = run(compose_run(*common), output_dir=tmp_path / "live")
    pre = run(compose_run(*common, "model.reference_mode=precomputed"), output_dir=tmp_path / "pre")
    assert _losses(pre) == pytest.approx(_losses(live), abs=1e-6)
