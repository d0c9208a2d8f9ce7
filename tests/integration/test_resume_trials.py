"""The randomized crash-and-resume trials of scripts/resume_trials.py, a few of each case with fixed
seeds: every interrupted run, once resumed, equals the uninterrupted run on its weights, optimizer,
loss state (BCO's δ) and every log record. `python scripts/resume_trials.py --trials 20` runs more."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "resume_trials.py"
#: (case, seed): the seeds pick DPO or BCO and where the run is interrupted (see the trial's detail);
#: chosen to cover the last step, a resume inside a logging window, and each kind of damaged file.
TRIALS = [
    ("sigkill_step", 0),
    ("sigkill_save", 0),
    ("sigkill_final", 0),
    ("sigterm_step", 2),
    ("sigterm_step", 0),
    ("sigint_step", 1),
    ("sigint_step", 2),
    ("signal_final", 0),
    ("corrupt_file", 0),
    ("corrupt_file", 3),
    ("corrupt_file", 4),
    ("stale_dir", 0),
    ("stale_dir", 1),
    ("concurrent", 0),
]


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("resume_trials", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child processes: the same arithmetic, bit for bit
    yield module, module.Bench(tmp_path_factory.mktemp("trials"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case, seed", TRIALS, ids=[f"{c}-{s}" for c, s in TRIALS])
def test_an_interrupted_run_resumes_exactly(trials, case, seed):
    module, bench = trials
    result = module.trial(bench, case, seed)
    assert result.outcome == "exact", f"{case} ({result.detail}): {result.outcome}"
