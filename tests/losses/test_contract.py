"""Every registered loss honours the contract (alignlab/losses/base.py)."""

from __future__ import annotations

import re

import pytest
import torch

from alignlab.losses import REGISTRY, build, get
from alignlab.losses.base import LossInputs, Needs, PrepareContext, SequenceLogps

#: the transformers config fields a loss may size its own parameters by (`PrepareContext.architecture`)
HIDDEN, LAYERS = 4, 2


def _activations(needs: Needs, gen, batch: int, width: int) -> dict | None:
    """Random reference activations of the kinds the loss declared (`Needs.activations`)."""
    if needs.activations is None:
        return None
    acts = {
        kind: [torch.randn(batch, width, generator=gen, dtype=torch.float64)]
        for kind, _ in needs.activations.modules
    }
    if needs.activations.hidden_states:
        acts["hidden_states"] = [
            torch.randn(batch, width, HIDDEN, generator=gen, dtype=torch.float64) for _ in range(LAYERS)
        ]
    return acts


def _random_inputs(needs: Needs, leaves: list, batch: int = 3, width: int = 5, vocab: int = 7) -> LossInputs:
    """Random policy/reference inputs; the policy's leaf logits are appended to `leaves`."""
    gen = torch.Generator().manual_seed(0)

    def seqs(grad: bool) -> dict[str, SequenceLogps]:
        out = {}
        for name in needs.responses:
            logits = torch.randn(batch, width, vocab, generator=gen, dtype=torch.float64, requires_grad=grad)
            labels = torch.randint(vocab, (batch, width), generator=gen)
            mask = torch.ones(batch, width, dtype=torch.bool)
            mask[0, -2:] = False  # some padding
            if grad:
                leaves.append(logits)
            logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask
            out[name] = SequenceLogps(
                logps,
                mask,
                logits if needs.full_logits else None,
                logits.detach().mean((1, 2)),
                activations=None if grad else _activations(needs, gen, batch, width),
            )
        return out

    fields = {f: torch.randn(batch, generator=gen, dtype=torch.float64) for f in needs.batch_fields}
    teachers = {name: seqs(False) for name, _ in needs.teachers}
    return LossInputs(
        policy=seqs(True),
        reference=seqs(False) if needs.reference else None,
        fields=fields,
        teachers=teachers,
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract(name):
    entry = REGISTRY[name]
    loss = build(entry.config()).double()
    architecture = type("Architecture", (), {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS})
    # parameters a loss builds in prepare (SparsePO's heads) do not depend on what ran before; seed 1:
    # a 4-wide random ReLU mask head can be zero on every token (seed 0 draws one), which by design
    # stops every gradient to the policy, and this test is about the gradient's path
    torch.manual_seed(1)
    loss.prepare(
        PrepareContext(
            reference=None,
            tokenizer=None,
            train=None,
            eval=None,
            device=torch.device("cpu"),
            seed=0,
            architecture=architecture,
        )
    )
    leaves: list[torch.Tensor] = []
    out = loss(_random_inputs(loss.needs, leaves))
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    grads = torch.autograd.grad(out.losses.mean(), leaves, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the policy"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_docstring_cites_paper(name):
    doc = REGISTRY[name].loss.__module__
    module_doc = __import__(doc, fromlist=["_"]).__doc__ or ""
    assert re.search(r"arXiv:\d{4}\.\d{4,5}|et al\. \d{4}", module_doc), (
        f"{name}: module docstring cites no paper"
    )
    assert REGISTRY[name].loss.summary, f"{name}: no one-line summary for `alignlab list`"


def test_unknown_loss_suggests_nearest():
    with pytest.raises(KeyError, match="Did you mean 'dpo'"):
        get("dpoo")


LOSSES_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "alignlab" / "losses"
#: what a loss file may import of alignlab: the contract and the chunked-logits helpers.
LOSS_MAY_IMPORT = ("alignlab.losses.base", "alignlab.chunked")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_loss_imports_only_the_contract(name):
    """A loss never reaches up: no model loading, data or forward code, only base.py and chunked.py.
    What it needs from models (a reference, teachers, scores, activations) it declares in `Needs`."""
    import ast

    path = LOSSES_DIR / f"{REGISTRY[name].loss.__module__.rsplit('.', 1)[-1]}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m == "alignlab" or m.startswith("alignlab.")}
    assert ours <= set(LOSS_MAY_IMPORT), f"{path.name} imports {sorted(ours - set(LOSS_MAY_IMPORT))}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_fields(name):
    """`paper`, `options`, `headline` are declared, and `needs` is a value, never a property."""
    import dataclasses

    entry = REGISTRY[name]
    assert re.search(r"\b(19|20)\d\d\b", entry.loss.paper), f"{name}: Loss.paper names no year"
    defaults = entry.config()
    for option, values in entry.loss.options.items():
        assert option in {f.name for f in dataclasses.fields(defaults)}, (
            f"{name}: options names no field {option!r}"
        )
        assert getattr(defaults, option) in values, f"{name}: the default {option} is not among its options"
    assert all(key.startswith("eval_") for key in entry.loss.headline), name
    assert not isinstance(vars(entry.loss).get("needs"), property), f"{name}: set self.needs in __init__"
    assert isinstance(build(defaults).needs, Needs)
