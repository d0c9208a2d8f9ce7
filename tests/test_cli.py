"""The CLI explains mistakes in one line, with the nearest valid name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignlab.cli import explain_overrides


@pytest.mark.parametrize("argv, expected", [
    (["+recipe=dpo", "loss.bta=1"], "unknown key 'loss.bta'. Did you mean loss.beta?"),
    (["+recipe=dpx"], "unknown recipe 'dpx'. Did you mean +recipe=dpo?"),
    (["loss=tdop"], "unknown loss 'tdop'. Did you mean loss=tdpo?"),
    (["model=tny"], "unknown model 'tny'. Did you mean model=tiny?"),
    (["trainer.learning_rate=fast"], "could not be converted to Float"),
    (["+recipe=tpo", "trainer.lerning_rate=1"], "Did you mean trainer.learning_rate?"),
])
def test_mistakes_get_one_line_with_a_suggestion(argv, expected):
    problem = explain_overrides(argv)
    assert problem is not None and expected in problem and "\n" not in problem


@pytest.mark.parametrize("argv", [["+recipe=dpo", "loss.beta=0.2"], ["+recipe=dpo", "--cfg", "job"],
                                  ["-m", "+recipe=dpo", "loss.beta=0.1,0.2"], ["hydra.run.dir=/tmp/x"]])
def test_valid_overrides_pass(argv):
    assert explain_overrides(argv) is None


def test_cli_exit_code_and_stderr():
    out = subprocess.run([sys.executable, "-m", "alignlab.cli", "train", "+recipe=dpo", "loss.bta=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("alignlab: error: unknown key 'loss.bta'")
    assert "Traceback" not in out.stderr


def test_list_shows_every_loss_and_recipe():
    out = subprocess.run([sys.executable, "-m", "alignlab.cli", "list"], capture_output=True, text=True, check=True)
    for name in ("dpo", "tdpo", "sparsepo", "rdpo", "npo", "asft", "tpo", "modpo", "bco", "rpo", "aligndistil"):
        assert f"  {name} " in out.stdout
    assert "arXiv" in out.stdout or "et al." in out.stdout
