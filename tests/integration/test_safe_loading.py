"""Safety of what a run loads: weights only from safetensors, every `torch.load` with
`weights_only=True` (including HF Trainer's own checkpoint loading on resume), and remote code off
unless the user turns it on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from alignlab.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def test_no_unsafe_deserialisation_in_the_package():
    unsafe = []
    for path in sorted((REPO / "alignlab").rglob("*.py")):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                unsafe.append(f"{path.name}: {call.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            unsafe.append(f"{path.name}: imports a pickle module")
    assert not unsafe, unsafe


@pytest.mark.slow
def test_resume_loads_checkpoints_with_weights_only(run_and_resume, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    _, resumed = run_and_resume("dpo", 4, 2)
    assert calls, "resuming loaded no optimizer/scheduler/RNG state through torch.load"
    assert all(flag is True for flag in calls), calls
    saved = {p.name for p in resumed.model_dir.iterdir()}
    assert "model.safetensors" in saved and not {"pytorch_model.bin", "training_args.bin"} & saved


def test_trust_remote_code_is_off_unless_set():
    assert ModelConfig(name_or_path="x").trust_remote_code is False
    for path in [*(REPO / "configs").rglob("*.yaml"), *(REPO / "recipes").rglob("*.yaml")]:
        assert "trust_remote_code: true" not in path.read_text().lower(), path


@pytest.mark.parametrize("trust", [False, True])
def test_model_and_tokenizer_loading_pass_the_setting_through(monkeypatch, trust):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.models import load_policy, load_tokenizer

    seen = {}

    class Stop(Exception):
        pass

    def fake(kind):
        def from_pretrained(name, **kwargs):
            seen[kind] = kwargs
            raise Stop
        return from_pretrained

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake("tokenizer"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake("model"))
    cfg = ModelConfig(name_or_path="some/hub-model", trust_remote_code=trust)
    with pytest.raises(Stop):
        load_tokenizer(cfg)
    with pytest.raises(Stop):
        load_policy(cfg, tokenizer=None, seed=0)
    assert seen["tokenizer"]["trust_remote_code"] is trust and seen["model"]["trust_remote_code"] is trust
    assert seen["model"]["use_safetensors"] is True  # never a pickled .bin


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(monkeypatch):
    from transformers import AutoTokenizer

    from alignlab.models import ModelError, load_tokenizer

    class NoSpecialTokens:
        pad_token_id = eos_token_id = None

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kwargs: NoSpecialTokens())
    with pytest.raises(ModelError, match="neither a pad nor an EOS token"):
        load_tokenizer(ModelConfig(name_or_path="some/hub-model"))
