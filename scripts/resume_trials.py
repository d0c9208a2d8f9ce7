"""Randomized crash-and-resume trials on the embedded default: is every interrupted run, once resumed,
the uninterrupted run, tensor for tensor and record for record?

Each trial interrupts a run in one way (a case), resumes it with `trainer.resume_from_checkpoint=latest`
where the case calls for it, and compares the result with an uninterrupted run of the same config:
the final weights, the optimizer state of the last checkpoint, the loss's state (BCO's δ) and every
record of `metrics.jsonl` (timing fields aside). Runs: 16 steps of the embedded default (builtin:tiny on
56 builtin:sentiment training examples, batch 8: 7 steps an epoch, so runs cross two epoch boundaries;
DPO, or BCO with its running reward mean δ as loss state), a checkpoint
every 3 steps, a log record every 4 (so resumes fall inside logging windows), an evaluation every 8,
one thread. Cases:

  sigkill_step    SIGKILL at the end of a random step (a child process), then resume
  sigkill_save    SIGKILL inside a checkpoint's save (after the weights, the optimizer, or before the
                  marker), then resume: the partial checkpoint must be skipped
  sigkill_final   SIGKILL during the final evaluation or save, then resume: nothing is trained again
  sigterm_step    SIGTERM during a random step (the last one included): exit 3 with a checkpoint, then resume
  sigint_step     Ctrl-C (SIGINT) likewise
  signal_final    SIGTERM or Ctrl-C during the final save: the run finishes as if nothing happened
  corrupt_file    a file of the newest checkpoint truncated, emptied, altered or deleted after a kill
                  that followed it: `latest` skips it, the run resumes from the one before
  stale_dir       the directory holds another run (another seed; finished or not): resuming and a
                  fresh start are refused, `trainer.overwrite_output_dir=true` replaces it
  concurrent      two runs started at once in one directory: the one that does not get the lock is
                  refused (exit 6, naming the other); the other finishes undisturbed

    python scripts/resume_trials.py --trials 20                 # every case, 20 trials each
    python scripts/resume_trials.py --cases sigterm_step --trials 5 --doc docs/resume_trials.md

The test suite runs a few trials of each case with fixed seeds (tests/integration/test_resume_trials.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, LOG_EVERY, EVAL_EVERY = 16, 3, 4, 8
CASES = (
    "sigkill_step",
    "sigkill_save",
    "sigkill_final",
    "sigterm_step",
    "sigint_step",
    "signal_final",
    "corrupt_file",
    "stale_dir",
    "concurrent",
)
#: cases that need a child process (a real SIGKILL, or two runs at once)
CHILD_CASES = ("sigkill_step", "sigkill_save", "sigkill_final", "concurrent")
TIMING = ("_runtime", "_per_second")


def overrides(loss: str, cache: Path, seed: int = 7) -> list[str]:
    return [
        f"+recipe={loss}",
        f"trainer.max_steps={STEPS}",
        f"trainer.save_steps={SAVE_EVERY}",
        f"trainer.logging_steps={LOG_EVERY}",
        f"trainer.eval_steps={EVAL_EVERY}",
        "trainer.save_total_limit=null",
        "trainer.per_device_train_batch_size=8",
        f"data.limit={28 if loss == 'bco' else 56}",
        "data.eval_size=8",
        "eval.generate=false",
        "model.name_or_path=builtin:tiny",  # the random tiny model: no SFT stage
        f"data.cache_dir={cache}",
        f"seed={seed}",
    ]


def compose(items: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from alignlab.compose import register_configs
    from alignlab.config import resource_dir

    register_configs()
    with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
        return hydra_compose("config", overrides=list(items))


def run_inline(items: list[str], out: Path, hook=None):
    """`alignlab.train.run` in this process; `hook(trainer_kwargs)` may add callbacks."""
    from alignlab.train import run

    if hook is None:
        return run(compose(items), output_dir=out)
    import alignlab.trainer

    init = alignlab.trainer.AlignTrainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        hook(self)

    alignlab.trainer.AlignTrainer.__init__ = patched
    try:
        return run(compose(items), output_dir=out)
    finally:
        alignlab.trainer.AlignTrainer.__init__ = init


# -- the child process: a run that interrupts itself at a chosen point ----------------------------------
def child(argv: list[str]) -> None:
    """`child WHEN ARG SIGNAL -- overrides...`: run `alignlab train`, sending SIGNAL to itself at WHEN:
    step (end of step ARG), save (inside the save of checkpoint-ARG: weights|optimizer|marker), final
    (final evaluation or save: evaluate|save), slow (no signal; ARG seconds of sleep per step)."""
    when, arg, sig, _, *items = argv
    import torch

    torch.set_num_threads(1)
    from transformers import TrainerCallback

    import alignlab.checkpoints
    import alignlab.trainer

    trainer_cls = alignlab.trainer.AlignTrainer
    kill = lambda: os.kill(os.getpid(), getattr(signal, sig))  # noqa: E731

    class AtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if when == "step" and state.global_step == int(arg):
                kill()
            if when == "slow":
                time.sleep(float(arg))

    init, train = trainer_cls.__init__, trainer_cls.train

    def patched_init(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(AtStep())

    def patched_train(self, *a, **k):
        result = train(self, *a, **k)
        self.trained = True
        return result

    trainer_cls.__init__, trainer_cls.train = patched_init, patched_train
    if when == "save":  # inside the save of checkpoint-STEP, after POINT
        step, point = arg.split(":")
        save_model, save_opt, mark = (
            trainer_cls.save_model,
            trainer_cls._save_optimizer_and_scheduler,
            alignlab.trainer.mark_complete,
        )

        def save_model_then(self, output_dir=None, _internal_call=False):
            save_model(self, output_dir, _internal_call)
            if _internal_call and self.state.global_step == int(step) and point == "weights":
                kill()

        def save_opt_then(self, output_dir):
            save_opt(self, output_dir)
            if self.state.global_step == int(step) and point == "optimizer":
                kill()

        def mark_after(folder, identity=None):
            if Path(folder).name == f"checkpoint-{step}" and point == "marker":
                kill()
            mark(folder, identity)

        trainer_cls.save_model, trainer_cls._save_optimizer_and_scheduler = save_model_then, save_opt_then
        alignlab.trainer.mark_complete = mark_after
    if when == "final":  # the final evaluation or save, after training
        name = "evaluate" if arg == "evaluate" else "save_model"
        original = getattr(trainer_cls, name)

        def final(self, *a, **k):
            if getattr(self, "trained", False):
                kill()
            return original(self, *a, **k)

        setattr(trainer_cls, name, final)
    from alignlab.cli import main

    main(["train", *items])


def spawn(when: str, arg, sig: str, items: list[str], out: Path, wait: bool = True):
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "child",
        when,
        str(arg),
        sig,
        "--",
        *items,
        f"hydra.run.dir={out}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
    }
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env
    )


# -- comparison -------------------------------------------------------------------------------------------
def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)} for line in lines]


def _tensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, weights_only=True)["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def compare(run_dir: Path, reference: Path) -> str | None:
    """The first difference between a finished run and the reference, or None when they are identical."""
    import torch

    if not (run_dir / "summary.json").exists():
        return "the run did not finish (no summary.json)"
    for name in (
        "model/model.safetensors",
        f"checkpoint-{STEPS}/optimizer.pt",
        "model/loss_state.safetensors",
    ):
        ours, theirs = run_dir / name, reference / name
        if not theirs.exists():
            continue
        if not ours.exists():
            return f"{name} is missing"
        a, b = _tensors(ours), _tensors(theirs)
        if a.keys() != b.keys():
            return f"{name}: other tensors"
        for key in a:
            if not torch.equal(a[key], b[key]):
                return f"{name}: {key} differs by {(a[key].float() - b[key].float()).abs().max().item():.3g}"
    ours, theirs = records(run_dir), records(reference)
    if ours != theirs:
        for i, (x, y) in enumerate(zip(ours, theirs)):
            if x != y:
                return f"metrics.jsonl record {i + 1} (step {y.get('step')}) differs: {x} vs {y}"
        return f"metrics.jsonl has {len(ours)} records, the reference {len(theirs)}"
    return None


# -- the trials -------------------------------------------------------------------------------------------
@dataclass
class Trial:
    case: str
    seed: int
    detail: str = ""
    outcome: str = ""  # "exact" or what went wrong
    seconds: float = 0.0


@dataclass
class Bench:
    root: Path
    references: dict = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def items(self, loss: str, seed: int = 7) -> list[str]:
        return overrides(loss, self.cache, seed)

    def reference(self, loss: str, seed: int = 7) -> Path:
        key = (loss, seed)
        if key not in self.references:
            out = self.root / f"reference-{loss}-{seed}"
            run_inline(self.items(loss, seed), out)
            self.references[key] = out
        return self.references[key]

    def resume(self, loss: str, out: Path):
        return run_inline([*self.items(loss), "trainer.resume_from_checkpoint=latest"], out)


def trial(bench: Bench, case: str, seed: int) -> Trial:
    rng = random.Random(f"{case}-{seed}")
    loss = rng.choice(("dpo", "bco"))
    out = bench.root / f"{case}-{seed}"
    t = Trial(case, seed)
    start = time.time()
    try:
        problem = CASE_FUNCTIONS[case](bench, rng, loss, out, t)
        t.outcome = "exact" if problem is None else problem
    except Exception as err:  # noqa: BLE001 - a failed trial is a row of the table, not the end of the script
        t.outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    t.seconds = time.time() - start
    shutil.rmtree(out, ignore_errors=True)
    return t


def _killed(bench, loss, out, when, arg) -> str | None:
    """A child run SIGKILLed at `when`/`arg` (see `child`); what went wrong, if anything."""
    done = spawn(when, arg, "SIGKILL", bench.items(loss), out)
    if done.returncode != -signal.SIGKILL:
        return f"the child was not killed (exit {done.returncode}): {done.stdout[-600:]}"
    return None


def case_sigkill_step(bench, rng, loss, out, t):
    step = rng.randint(1, STEPS)
    t.detail = f"{loss}, SIGKILL after step {step}"
    reference = bench.reference(loss)
    problem = _killed(bench, loss, out, "step", step)
    if problem:
        return problem
    bench.resume(loss, out)
    return compare(out, reference)


def case_sigkill_save(bench, rng, loss, out, t):
    step = rng.choice(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    point = rng.choice(("weights", "optimizer", "marker"))
    t.detail = f"{loss}, SIGKILL in the save of checkpoint-{step}, after the {point}"
    reference = bench.reference(loss)
    failed = _killed(bench, loss, out, "save", f"{step}:{point}")
    if failed:
        return failed
    from alignlab.checkpoints import problem

    if (out / f"checkpoint-{step}").exists() and problem(out / f"checkpoint-{step}") is None:
        return f"the partial checkpoint-{step} passes verification"
    bench.resume(loss, out)
    return compare(out, reference)


def case_sigkill_final(bench, rng, loss, out, t):
    point = rng.choice(("evaluate", "save"))
    t.detail = f"{loss}, SIGKILL in the final {point}"
    reference = bench.reference(loss)
    failed = _killed(bench, loss, out, "final", point)
    if failed:
        return failed
    bench.resume(loss, out)
    return compare(out, reference)


def _signal_at_step(sig: int, step: int):
    from transformers import TrainerCallback

    class Send(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:  # during step `step`
                os.kill(os.getpid(), sig)

    return lambda trainer: trainer.add_callback(Send())


def _signal_case(bench, rng, loss, out, t, sig):
    from alignlab.errors import Interrupted

    step = rng.choice([STEPS, *range(1, STEPS + 1)])  # the last step twice as often
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    t.detail = f"{loss}, {name} during step {step}"
    reference = bench.reference(loss)
    try:
        run_inline(bench.items(loss), out, _signal_at_step(sig, step))
    except Interrupted as err:
        if step == STEPS:
            return f"stopped in the last step instead of finishing: {err}"
        if f"stopped by {name} at step {step}; checkpoint saved" not in str(err) or "Resume with:" not in str(
            err
        ):
            return f"unexpected message: {err}"
        bench.resume(loss, out)
    else:
        if step != STEPS:
            return f"{name} at step {step} did not stop the run"
    return compare(out, reference)


def case_sigterm_step(bench, rng, loss, out, t):
    return _signal_case(bench, rng, loss, out, t, signal.SIGTERM)


def case_sigint_step(bench, rng, loss, out, t):
    return _signal_case(bench, rng, loss, out, t, signal.SIGINT)


def case_signal_final(bench, rng, loss, out, t):
    sig = rng.choice((signal.SIGTERM, signal.SIGINT))
    t.detail = f"{loss}, {signal.Signals(sig).name} during the final save"

    def hook(trainer):
        save_model = trainer.save_model

        def signalled(output_dir=None, _internal_call=False):
            if not _internal_call:
                os.kill(os.getpid(), sig)
            return save_model(output_dir, _internal_call)

        trainer.save_model = signalled

    reference = bench.reference(loss)
    run_inline(bench.items(loss), out, hook)
    return compare(out, reference)


DAMAGE = ("truncate", "empty", "alter", "delete")


def _killed_after(reference: Path, out: Path, step: int) -> None:
    """`out`: the reference's directory as a kill right after checkpoint-`step` left it."""
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".alignlab.lock"))
    for path in out.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    for name in ("model", "eval"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("summary.json", "curves.png"):
        (out / name).unlink(missing_ok=True)
    record = json.loads((out / "alignlab_run.json").read_text())
    (out / "alignlab_run.json").write_text(json.dumps({**record, "status": "running"}))
    kept = [
        line
        for line in (out / "metrics.jsonl").read_text().splitlines(keepends=True)
        if json.loads(line)["step"] <= step and "train_runtime" not in line
    ]
    (out / "metrics.jsonl").write_text("".join(kept))


def case_corrupt_file(bench, rng, loss, out, t):
    step = rng.choice(range(2 * SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    files = [
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
        "log_state.json",
        *(["loss_state.safetensors"] if loss == "bco" else []),
    ]
    name, damage = rng.choice(files), rng.choice(DAMAGE)
    t.detail = f"{loss}, checkpoint-{step}/{name}: {damage}"
    reference = bench.reference(loss)
    _killed_after(reference, out, step)
    path = out / f"checkpoint-{step}" / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "alter":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:
        path.unlink()
    from alignlab.checkpoints import latest_complete

    chosen, skipped = latest_complete(out)
    if chosen != out / f"checkpoint-{step - SAVE_EVERY}" or not skipped:
        return f"latest chose {chosen} (skipped: {skipped})"
    bench.resume(loss, out)
    return compare(out, reference)


def case_stale_dir(bench, rng, loss, out, t):
    from alignlab.errors import UserError

    finished = rng.random() < 0.5
    step = STEPS if finished else rng.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
    t.detail = f"{loss}, another seed's {'finished run' if finished else f'run killed after step {step}'}"
    other = bench.reference(loss, seed=8)
    reference = bench.reference(loss)
    if finished:
        shutil.copytree(other, out, ignore=shutil.ignore_patterns(".alignlab.lock"))
    else:
        _killed_after(other, out, step)
    before = _listing(out)
    for extra in (["trainer.resume_from_checkpoint=latest"], []):
        try:
            run_inline([*bench.items(loss), *extra], out)
            return f"a run with {extra or 'a fresh start'} was accepted in another run's directory"
        except UserError as err:
            if "Fix:" not in str(err):
                return f"refusal without a fix: {err}"
    if _listing(out) != before:
        return f"a refused run changed the directory: {sorted(set(_listing(out)) ^ set(before))}"
    run_inline([*bench.items(loss), "trainer.overwrite_output_dir=true"], out)
    return compare(out, reference)


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every file under `folder` (the lock file aside) with its size and modification time."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".alignlab.lock"
    )


def case_concurrent(bench, rng, loss, out, t):
    delay = rng.uniform(0.0, 1.0)
    t.detail = f"{loss}, two runs started {delay:.1f} s apart in one directory"
    reference = bench.reference(loss)
    first = spawn("slow", 0.2, "SIGCONT", bench.items(loss), out, wait=False)
    time.sleep(delay)
    second = spawn(
        "slow", 0.2, "SIGCONT", [*bench.items(loss), "trainer.resume_from_checkpoint=latest"], out, wait=False
    )
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    codes = sorted((p.returncode, i) for i, p in enumerate((first, second)))
    if [code for code, _ in codes] != [0, 6]:
        return (
            f"exit codes {[p.returncode for p in (first, second)]}, expected one 0 and one 6: "
            f"{outputs[1][-600:]}"
        )
    winner = (first, second)[codes[0][1]]
    if f"pid {winner.pid}" not in outputs[codes[1][1]]:
        return f"the refused run did not name the live one (pid {winner.pid}): {outputs[codes[1][1]][-600:]}"
    return compare(out, reference)


CASE_FUNCTIONS = {name: globals()[f"case_{name}"] for name in CASES}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per case")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--seed", type=int, default=0, help="the first trial's seed")
    parser.add_argument("--doc", type=Path, help="write the table into this markdown file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignlab-trials-") as tmp:
        bench = Bench(Path(tmp))
        for case in args.cases:
            for seed in range(args.seed, args.seed + args.trials):
                t = trial(bench, case, seed)
                rows.append(t)
                print(
                    f"{t.case:<14} seed {t.seed:<3} {t.seconds:5.1f} s  {t.outcome:<6}  {t.detail}",
                    flush=True,
                )
                if args.doc:  # after every trial: an interrupted session still leaves its table
                    write_doc(args.doc, summary(rows), rows, args)
    print(summary(rows))
    return 0 if all(t.outcome == "exact" for t in rows) else 1


def summary(rows: list[Trial]) -> str:
    lines = ["| case | trials | exact | seconds per trial |", "|---|---:|---:|---:|"]
    for case in dict.fromkeys(t.case for t in rows):
        mine = [t for t in rows if t.case == case]
        exact = sum(t.outcome == "exact" for t in mine)
        lines.append(
            f"| {case} | {len(mine)} | {exact}/{len(mine)} | {sum(t.seconds for t in mine) / len(mine):.1f} |"
        )
    return "\n".join(lines)


def write_doc(path: Path, table: str, rows: list[Trial], args) -> None:
    failures = [t for t in rows if t.outcome != "exact"]
    details = "\n".join(f"- {t.case} seed {t.seed} ({t.detail}): {t.outcome}" for t in failures) or "None."
    path.write_text(
        "# Crash-and-resume trials\n\n"
        f"`python scripts/resume_trials.py --trials {args.trials}` on {time.strftime('%Y-%m-%d')} "
        f"({len(rows)} trials done of {args.trials * len(args.cases)} asked) "
        f"({os.cpu_count()} CPUs, one thread). What each case does is in the script's docstring; each "
        "trial is compared with an uninterrupted run of the same config on the final weights, the last "
        "checkpoint's optimizer state, the loss's state (BCO's δ) and every record of `metrics.jsonl` "
        "(timing fields aside). *Exact* means all of them are bitwise equal.\n\n"
        f"{table}\n\nFailures:\n\n{details}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
