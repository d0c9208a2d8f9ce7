"""Safety of what a run loads: weights only from safetensors, every `torch.load` with
`weights_only=True` (including HF Trainer's own checkpoint loading on resume), and remote code off
unless the user turns it on."""

from __future__ import annotations

import ast
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


#: receivers of `.from_pretrained` that load no model weights: tokenizers, processors, configs.
_NOT_WEIGHTS = re.compile(r"(Tokenizer(Fast)?|Processor|FeatureExtractor|Config)$")
#: peft adapter loaders: they take no use_safetensors, read adapter_model.safetensors (which every
#: run writes) and fall back only to torch.load(weights_only=True).
_ADAPTER_LOADERS = re.compile(r"^PeftModel(For\w+)?$")


def _receiver(node: ast.expr) -> str:
    """`AutoModelForCausalLM` of `AutoModelForCausalLM.from_pretrained`, `AutoModel` of
    `transformers.AutoModel.from_pretrained`, the variable's name otherwise."""
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", ast.dump(node))


def _bound_names(tree: ast.Module, variable: str) -> set[str] | None:
    """The classes a variable of the module is ever assigned from (e.g. `loader = A if c else B`),
    or None when it is assigned anything else (a call's result, a parameter)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            value = node.value
            parts = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
            for part in parts:
                if not isinstance(part, (ast.Name, ast.Attribute)):
                    return None
                names.add(_receiver(part))
    return names or None


def model_from_pretrained_calls(root: Path) -> list[tuple[str, bool]]:
    """Every `X.from_pretrained(...)` under `root` that loads model weights, as ("file:line X",
    passes use_safetensors=True). Tokenizers, processors and configs are left out, as is a variable
    only ever bound to them; any other receiver counts as a model, so a new loader is audited."""
    calls = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                continue
            receiver = _receiver(node.func.value)
            bound = _bound_names(tree, receiver) if isinstance(node.func.value, ast.Name) else None
            classes = bound or {receiver}
            if all(_NOT_WEIGHTS.search(c) for c in classes) or all(
                _ADAPTER_LOADERS.match(c) for c in classes
            ):
                continue
            safe = any(
                k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            calls.append((f"{path.relative_to(root.parent)}:{node.lineno} {receiver}.from_pretrained", safe))
    return calls


def test_every_model_from_pretrained_passes_use_safetensors():
    calls = model_from_pretrained_calls(REPO / "alignlab")
    where = [call for call, _ in calls]
    # the walk finds the loaders we know of (policy/reference, the sentiment sampler, the reward-model scorer)
    for expected in ("models.py", "sentiment.py", "scorers.py"):
        assert any(expected in call for call in where), (expected, where)
    assert not [call for call, safe in calls if not safe], "model weights must load with use_safetensors=True"


def test_the_from_pretrained_audit_catches_a_missing_use_safetensors(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text(
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer\n"
        "loader = GPT2Tokenizer if bare else AutoTokenizer\n"
        "tok = loader.from_pretrained(path)\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "ok = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()\n"
        "bad = AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "off = AutoModelForCausalLM.from_pretrained(path, use_safetensors=False)\n"
    )
    (package / "sub" / "b.py").write_text(
        "import transformers\n"
        "cls = pick()\n"
        "m = transformers.AutoModelForSequenceClassification.from_pretrained(p, num_labels=1)\n"
        "n = cls.from_pretrained(p, **kwargs)\n"
    )
    calls = dict(model_from_pretrained_calls(package))
    assert calls == {
        "pkg/a.py:5 AutoModelForCausalLM.from_pretrained": True,
        "pkg/a.py:6 AutoModelForCausalLM.from_pretrained": False,
        "pkg/a.py:7 AutoModelForCausalLM.from_pretrained": False,
        "pkg/sub/b.py:3 AutoModelForSequenceClassification.from_pretrained": False,
        "pkg/sub/b.py:4 cls.from_pretrained": False,
    }


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
