"""The CLI explains mistakes in one line, with the nearest valid name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.cli import explain_overrides


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["+recipe=dpo", "loss.bta=1"], "unknown key 'loss.bta'. Did you mean loss.beta?"),
        (["+recipe=dpx"], "unknown recipe 'dpx'. Did you mean +recipe=dpo?"),
        (["loss=tdop"], "unknown loss 'tdop'. Did you mean loss=tdpo?"),
        (["model=tny"], "unknown model 'tny'. Did you mean model=tiny?"),
        (["trainer.learning_rate=fast"], "could not be converted to Float"),
        (["+recipe=tpo", "trainer.lerning_rate=1"], "Did you mean trainer.learning_rate?"),
    ],
)
def test_mistakes_get_one_line_with_a_suggestion(argv, expected):
    problem = explain_overrides(argv)
    assert problem is not None and expected in problem and "\n" not in problem


@pytest.mark.parametrize(
    "argv",
    [
        ["+recipe=dpo", "loss.beta=0.2"],
        ["+recipe=dpo", "--cfg", "job"],
        ["-m", "+recipe=dpo", "loss.beta=0.1,0.2"],
        ["hydra.run.dir=/tmp/x"],
    ],
)
def test_valid_overrides_pass(argv):
    assert explain_overrides(argv) is None


def test_cli_exit_code_and_stderr():
    out = subprocess.run(
        [sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "loss.bta=1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.startswith("alignlab: error: unknown key 'loss.bta'")
    assert "Traceback" not in out.stderr


REPO = Path(__file__).resolve().parents[1]


def _declared_losses() -> dict[str, dict[str, str]]:
    """Every loss as its file declares it, read without importing anything: name (`@register`), its
    declared `summary` and `paper`, and the module docstring's opening ("NAME — Authors Year, ...,
    arXiv:ID")."""
    losses = {}
    for path in sorted((REPO / "alignlab" / "losses").glob("*.py")):
        tree = ast.parse(path.read_text())
        doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register":
                    declared = {
                        t.id: item.value.value
                        for item in node.body
                        if isinstance(item, ast.Assign)
                        for t in item.targets
                        if getattr(t, "id", None) in ("summary", "paper")
                    }
                    losses[deco.args[0].value] = {**declared, "doc": doc, "file": path.name}
    return losses


def _list_output() -> tuple[dict[str, tuple[str, str]], list[str]]:
    """`alignlab list` parsed: loss name -> (its line, its needs line), and the recipe names."""
    out = subprocess.run(
        [sys.executable, "-m", "alignlab.cli", "list"], capture_output=True, text=True, check=True
    )
    lines = out.stdout.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("recipes"))
    losses, body = {}, lines[:split]
    for i, line in enumerate(body):
        match = re.match(r"^  ([a-z0-9_]+) +(\S.*)$", line)
        if match:
            assert i + 1 < len(body) and body[i + 1].lstrip().startswith("needs: "), (
                line,
                body[i + 1 : i + 2],
            )
            losses[match.group(1)] = (match.group(2), body[i + 1].strip())
    recipes = [line.strip() for line in lines[split + 1 :] if line.strip()]
    return losses, recipes


@pytest.fixture(scope="module")
def listed():
    return _list_output()


def test_list_shows_every_registered_loss_with_its_paper(listed):
    losses, _ = listed
    declared = _declared_losses()
    assert len(declared) >= 11, declared  # the parse found the registered losses
    assert set(losses) == set(declared)
    for name, spec in declared.items():
        line, _ = losses[name]
        # the line shows the declared summary and paper, as declared
        assert " ".join(line.split()) == f"{spec['summary']} [{spec['paper']}]", (name, line)
        # the declared paper is the one the module docstring opens with
        arxiv = re.search(r"arXiv:(\d{4}\.\d{4,5})", spec["doc"])
        authors = re.search(r"—\s*(.+?\b(?:19|20)\d\d)\b", spec["doc"])
        assert arxiv and authors, (
            f"{spec['file']}: the docstring should open 'NAME — Authors Year, ..., arXiv:ID'"
        )
        assert f"arXiv:{arxiv.group(1)}" in spec["paper"], (name, spec["paper"])
        assert authors.group(1).split()[0] in spec["paper"] and authors.group(1)[-4:] in spec["paper"], name


def test_list_needs_name_what_the_user_supplies(listed):
    losses, _ = listed
    needs = {name: needs_line for name, (_, needs_line) in losses.items()}
    assert "label" in needs["bco"] and "completion" in needs["bco"]  # unpaired feedback: its label column
    assert "loss.udm=true" in needs["bco"] and "loss.paired=true" in needs["bco"]
    assert re.search(
        r"teachers dpo \(loss\.dpo_teacher\), reverse \(loss\.reverse_teacher\)", needs["aligndistil"]
    )
    assert "data.retain" not in needs["npo"].split(";")[0]  # plain NPO has no retain set ...
    for variant in ("npo_rt", "npo_kl"):  # ... its RT and KL variants do
        assert re.search(rf"loss\.variant=[\w|]*\b{variant}\b[\w|]*: [^;]*data\.retain", needs["npo"]), needs[
            "npo"
        ]
    for name in ("asft", "tpo", "aligndistil"):
        assert "no reference" in needs[name], (name, needs[name])
    for name in ("dpo", "bco", "npo", "tdpo", "modpo"):
        assert "reference model" in needs[name], (name, needs[name])
    for name in ("tdpo", "sparsepo", "aligndistil"):
        assert "full logits" in needs[name].split(";")[0], (name, needs[name])
    assert "gold" in needs["tpo"] and "pairs chosen/rejected" in needs["dpo"]


def test_list_shows_every_recipe(listed):
    _, recipes = listed
    assert sorted(recipes) == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("flag", ["--help", "-h", None])
def test_help(flag):
    out = subprocess.run(
        [sys.executable, "-m", "alignlab.cli", *([flag] if flag else [])], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: alignlab"), out
    for command in ("train", "eval", "list"):
        assert re.search(rf"^  {command}\b", out.stdout, re.M), (command, out.stdout)


def test_help_of_the_installed_command():
    script = Path(sys.executable).parent / "alignlab"
    if not script.exists():
        pytest.skip("the `alignlab` console script is not installed beside this interpreter")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(f"  {c} " in out.stdout for c in ("train", "eval", "list")), out


def test_an_unknown_command_is_refused_with_the_usage():
    out = subprocess.run([sys.executable, "-m", "alignlab.cli", "trian"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr and "usage: alignlab" in out.stderr


@pytest.fixture
def hydra_left_clean():
    """`cli.main` runs Hydra in this process: leave no Hydra config behind for later tests."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_a_single_run_is_composed_once_by_hydra(monkeypatch, capsys, hydra_left_clean):
    import alignlab.compose
    from alignlab import cli

    calls = []
    monkeypatch.setattr(alignlab.compose, "compose", lambda *args, **kwargs: calls.append(args))
    cli.main(["train", "+recipe=dpo", "loss.beta=0.2", "--cfg", "job"])  # Hydra prints the composed config
    assert calls == [] and "beta: 0.2" in capsys.readouterr().out


def test_a_single_run_mistake_is_named_from_hydras_exception(capsys, hydra_left_clean):
    import os

    from alignlab import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "+recipe=dpo", "loss.bta=1", "--cfg", "job"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "HYDRA_FULL_ERROR" not in os.environ
    assert err.startswith("alignlab: error: unknown key 'loss.bta'. Did you mean loss.beta? Keys of loss: ")
    assert len(err.splitlines()) == 1
