"""LoRA (peft): the adapter-disabled reference is a view of the policy, never a copy; its logits are
the base model's, chunked or dense, even when the adapter covers the head; impossible requests
(QLoRA without a GPU, options without an adapter) are refused with the field to change."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import alignlab.models
from alignlab import builtin
from alignlab.config import LoraConfig, ModelConfig
from alignlab.errors import ConfigError
from alignlab.forward import ForwardPlan
from alignlab.models import AdapterDisabled, check_lora, load_policy, load_reference

RESPONSES = ("chosen", "rejected")


def _model_config(**lora) -> ModelConfig:
    return ModelConfig(name_or_path="builtin:tiny", lora=LoraConfig(enabled=True, **lora))


def _batch(seed=0, b=3, t=11, vocab=81):
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for r in RESPONSES:
        ids = torch.randint(3, vocab, (b, t), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        batch.update(
            {f"{r}_input_ids": ids, f"{r}_attention_mask": torch.ones_like(ids), f"{r}_labels": labels}
        )
    return batch


def _perturb_adapters(policy) -> None:
    """Fresh LoRA adapters are the identity (B = 0); give them weight so disabling them shows."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    return builtin.build_tokenizer()


def test_reference_is_a_view_of_the_policy_not_a_copy(tokenizer, monkeypatch):
    real_deepcopy = copy.deepcopy

    def no_model_copy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("a model was deep-copied")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(alignlab.models.copy, "deepcopy", no_model_copy)
    cfg = _model_config()
    policy = load_policy(cfg, tokenizer, seed=0)
    reference = load_reference(cfg, policy, tokenizer, seed=0)
    assert isinstance(reference, AdapterDisabled) and reference.policy is policy
    assert list(reference.parameters()) == [] and list(reference.children()) == []  # holds no weights
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters train
    reference.to("cpu").requires_grad_(False)  # what a trainer does to a reference leaves the policy alone
    assert any(p.requires_grad for p in policy.parameters())


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "lm_head"]])
def test_view_gives_the_base_model(tokenizer, chunk, targets):
    """With trained (non-zero) adapters, the view's log-probs and full logits are the base model's,
    also when LoRA covers the output head and the lazy logits are computed after the forward."""
    cfg = _model_config(target_modules=targets)
    policy = load_policy(cfg, tokenizer, seed=0)
    _perturb_adapters(policy)
    base = builtin.build_model(len(tokenizer), seed=0)
    reference = load_reference(cfg, policy, tokenizer, seed=0)
    batch = _batch()
    policy.train()
    plan = ForwardPlan(RESPONSES, full_logits=True, chunk_size=chunk)
    got = plan.fitted(reference)(reference, reference.get_output_embeddings(), batch)
    want = plan.fitted(base)(base, base.get_output_embeddings(), batch)
    adapted = replace(plan, full_logits=False).fitted(policy)(policy, policy.get_output_embeddings(), batch)
    assert policy.training  # the view ran it in eval mode and restored its mode
    for r in RESPONSES:
        torch.testing.assert_close(got[r].token_logps, want[r].token_logps, atol=1e-6, rtol=1e-6)
        dense = lambda x: x.dense() if hasattr(x, "dense") else x.float()  # noqa: E731
        torch.testing.assert_close(dense(got[r].logits), dense(want[r].logits), atol=1e-5, rtol=1e-5)
        assert not got[r].token_logps.requires_grad
        assert not torch.allclose(
            adapted[r].token_logps, got[r].token_logps
        )  # the adapters do change the policy


def test_reference_path_loads_a_separate_model_without_adapter(tokenizer):
    cfg = ModelConfig(name_or_path="builtin:tiny", reference="builtin:tiny", lora=LoraConfig(enabled=True))
    policy = load_policy(cfg, tokenizer, seed=0)
    reference = load_reference(cfg, policy, tokenizer, seed=0)
    assert not isinstance(reference, AdapterDisabled)
    assert not any("lora_" in n for n, _ in reference.named_parameters())


def test_target_modules_that_match_nothing_name_the_field(tokenizer):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        load_policy(_model_config(target_modules=["no_such_proj"]), tokenizer, seed=0)


def test_qlora_is_refused_without_a_gpu():
    cfg = ModelConfig(name_or_path="some/model", lora=LoraConfig(enabled=True, load_in_4bit=True))
    with pytest.raises(ConfigError, match="model.lora.load_in_4bit=true .* needs a CUDA GPU"):
        check_lora(cfg, has_gpu=False)


def test_qlora_refused_before_any_model_loads(tmp_path, compose_run, monkeypatch):
    from alignlab.train import run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the combination was checked")

    monkeypatch.setattr(alignlab.models, "load_policy", refuse)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = compose_run(
        "+recipe=dpo", "model.lora.enabled=true", "model.lora.load_in_4bit=true", f"data.cache_dir={tmp_path}"
    )
    with pytest.raises(ConfigError, match="QLoRA"):
        run(cfg, output_dir=tmp_path / "run")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"merge_on_save": True}, "model.lora.merge_on_save=true needs an adapter"),
        ({"load_in_4bit": True}, "model.lora.load_in_4bit=true needs an adapter"),
        ({"enabled": True, "r": 0}, "model.lora.r must be >= 1"),
        ({"enabled": True, "dropout": 1.0}, "model.lora.dropout"),
        ({"enabled": True, "target_modules": []}, "model.lora.target_modules"),
    ],
)
def test_bad_lora_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)


def test_lora_settings_compose_and_typos_fail(compose_run):
    from alignlab.train import to_typed

    typed = to_typed(
        compose_run(
            "+recipe=dpo",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lora.target_modules=[q_proj,v_proj]",
        )
    )
    assert typed.model.lora.r == 4 and list(typed.model.lora.target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(Exception, match="model.lora.rank"):
        compose_run("+recipe=dpo", "model.lora.rank=4")


@pytest.mark.parametrize("mask", ["learned", "activation"])
def test_sparsepo_reads_the_base_model_through_the_adapter_view(tokenizer, mask):
    """The LoRA reference is the policy with adapters disabled (no copy): the activations SparsePO
    declares come from the base model, not from the adapted policy."""
    import torch

    from alignlab.forward import ForwardPlan
    from alignlab.losses.sparsepo import SparsePO, SparsePOConfig

    cfg = _model_config()
    policy = load_policy(cfg, tokenizer, seed=0)
    with torch.no_grad():  # a non-zero adapter, so that the adapted policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    view = load_reference(cfg, policy, tokenizer, seed=0)
    needs = SparsePO(SparsePOConfig(mask=mask)).needs
    ids = torch.randint(6, len(tokenizer), (2, 7))
    batch = {
        "chosen_input_ids": ids,
        "chosen_attention_mask": torch.ones_like(ids),
        "chosen_labels": torch.where(torch.arange(7) >= 3, ids, -100),
    }
    plan = ForwardPlan(("chosen",), activations=needs.activations)
    run = lambda m: plan(m, view.get_output_embeddings(), batch)["chosen"].activations  # noqa: E731
    with torch.no_grad():
        got = run(view)
        with policy.disable_adapter():
            base = run(policy)
        adapted = run(policy)
    assert got.keys() == base.keys() and got
    for kind in got:
        for g, b in zip(got[kind], base[kind]):
            torch.testing.assert_close(g, b)
    assert any(not torch.allclose(g, a) for kind in got for g, a in zip(got[kind], adapted[kind]))
