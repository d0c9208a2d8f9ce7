"""TR-DPO's reference update (`model.reference_sync`, Gorbatovski et al. 2024): the schedule against values
computed here from the models' weights, and the combinations refused before any model loads.

The resumed run equals the uninterrupted one: tests/integration/test_reference_sync_resume.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from alignlab import builtin
from alignlab.config import to_typed
from alignlab.data.collate import PreferenceCollator
from alignlab.errors import ConfigError
from alignlab.losses import build
from alignlab.losses.dpo import DPOConfig
from alignlab.train import check_reference_sync
from alignlab.trainer import AlignTrainer


def _rows(n: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    vocab = len(builtin.build_tokenizer())

    def ids(k):
        return torch.randint(6, vocab, (k,), generator=gen).tolist()

    return [{"prompt_ids": ids(3), "chosen_ids": ids(4), "rejected_ids": ids(3)} for _ in range(n)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class _Spy(TrainerCallback):
    """Before the reference update of each step (it runs first): the policy after the step's optimizer
    update and the reference as the step found it."""

    def __init__(self, policy, reference):
        self.policy, self.reference, self.seen = policy, reference, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.seen[state.global_step] = (_weights(self.policy), _weights(self.reference))


def _train(tmp_path, steps: int, alpha: float, every: int):
    """AlignTrainer (DPO, Adam) on builtin:tiny for `steps` steps with the reference updated every `every`."""
    from datasets import Dataset

    vocab = len(builtin.build_tokenizer())
    policy = builtin.build_model(vocab, seed=0)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    spy = _Spy(policy, reference)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,  # the collator reads prompt_ids / <response>_ids
        label_names=[],
    )
    trainer = AlignTrainer(
        model=policy,
        args=args,
        train_dataset=Dataset.from_list(_rows()),
        loss_fn=build(DPOConfig()),
        reference=reference,
        data_collator=PreferenceCollator(0, responses=("chosen", "rejected")),
        reference_sync=SimpleNamespace(enabled=True, alpha=alpha, every=every),
        callbacks=[spy],
    )
    initial = _weights(reference)
    trainer.train()
    return initial, spy.seen, _weights(reference)


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")


def _mix(alpha: float, policy: dict, reference: dict) -> dict:
    return {k: alpha * policy[k] + (1 - alpha) * reference[k] for k in reference}


@pytest.mark.parametrize("alpha", [0.6, 1.0], ids=["soft", "hard"])
def test_the_reference_moves_to_alpha_theta_plus_one_minus_alpha_ref_every_tau_steps(tmp_path, alpha):
    r0, seen, final = _train(tmp_path, steps=5, alpha=alpha, every=2)
    # no update before τ: steps 1 and 2 run on the initial reference
    _close(seen[1][1], r0)
    _close(seen[2][1], r0)
    # after step 2: α·θ_2 + (1 − α)·θ_ref; unchanged through step 3; after step 4 again from it
    r2 = _mix(alpha, seen[2][0], r0)
    assert any(not torch.equal(r2[k], r0[k]) for k in r0), "the update changed nothing"
    _close(seen[3][1], r2)
    _close(seen[4][1], r2)
    r4 = _mix(alpha, seen[4][0], r2)
    _close(seen[5][1], r4)
    _close(final, r4)  # step 5 is no multiple of τ
    if alpha == 1.0:  # the hard update is a copy of the policy
        assert all(torch.equal(r4[k], seen[4][0][k]) for k in r4)
    else:
        assert any(not torch.equal(r4[k], seen[4][0][k]) for k in r4)


def test_an_update_period_past_the_end_of_training_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.reference_sync.every=3 is not below the run's 3 optimizer"):
        _train(tmp_path, steps=3, alpha=0.6, every=3)


def test_a_reference_of_other_parameters_is_refused():
    from alignlab.trainer import reference_pairs

    vocab = len(builtin.build_tokenizer())
    with pytest.raises(ConfigError, match="reference's parameters differ from the policy's"):
        reference_pairs(builtin.build_model(vocab + 8, seed=0), builtin.build_model(vocab, seed=0))


def _typed(compose_run, *overrides):
    return to_typed(compose_run("+recipe=trdpo", "model.name_or_path=builtin:tiny", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("loss=simpo",), r"loss 'simpo' is reference-free \(it has none\)\. Fix: a loss with a reference"),
        (
            ("model.reference_mode=precomputed",),
            "would be stale after the first update. Fix: model.reference_mode=live",
        ),
        (("model.lora.enabled=true",), "adapters disabled .* Fix: model.lora.enabled=false"),
        (("deepspeed=zero3",), "ZeRO-3 is not supported .* Fix: deepspeed=zero2"),
        (("trainer.max_steps=30",), "every=30 is not below the run's trainer.max_steps=30: .* Fix: set"),
        (("distributed=fsdp2",), "distributed=fsdp2 is not supported .* Fix: distributed=none"),
    ],
    ids=["reference-free", "precomputed", "lora", "zero3", "period", "fsdp2"],
)
def test_impossible_combinations_are_one_line_naming_the_fields_and_the_fix(compose_run, overrides, message):
    typed = _typed(compose_run, *overrides)
    needs = build(typed.loss).needs
    with pytest.raises(ConfigError, match=message) as err:
        check_reference_sync(typed, needs)
    assert "\n" not in str(err.value) and "model.reference_sync.enabled=false" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.reference_sync.alpha=0", r"model.reference_sync.alpha must be in \(0, 1\]"),
        ("model.reference_sync.alpha=1.5", r"model.reference_sync.alpha must be in \(0, 1\]"),
        ("model.reference_sync.every=0", "model.reference_sync.every must be >= 1"),
    ],
)
def test_out_of_range_settings_are_refused(compose_run, override, message):
    with pytest.raises(ConfigError, match=message):
        _typed(compose_run, override)


def test_the_recipe_and_trl_names(compose_run):
    typed = _typed(compose_run)
    sync = typed.model.reference_sync
    assert (sync.enabled, sync.alpha, sync.every) == (True, 0.6, 30)  # embedded default: τ = 30
    check_reference_sync(typed, build(typed.loss).needs)  # DPO, live reference: accepted
    real = _typed(compose_run, "model.name_or_path=gpt2")
    assert real.model.reference_sync.every == 512  # TRL's ref_model_sync_steps on a real model


def test_alignlab_list_names_the_reference_update(capsys):
    from alignlab.cli import _list

    _list()
    out = capsys.readouterr().out
    assert "model.reference_sync.enabled=true" in out and "arXiv:2404.09656" in out
    assert "\n  trdpo\n" in out  # the recipe
