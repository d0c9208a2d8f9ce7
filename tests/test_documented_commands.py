"""Every `alignlab` command in README.md and docs/*.md is checked, so a broken example fails the build.

Commands are read from the markdown here (and from `alignlab --help`'s examples): every line of a fenced
shell block (continuations joined, comments dropped) that runs `alignlab`, `.venv/bin/alignlab` or
`-m/--module alignlab.cli`, and every inline code span that is a whole `alignlab train|eval|list` command
without placeholders (`NAME`, `<...>`, `...`, `a|b`). Training would take minutes for most of them, so a
`train` command is checked as composed, not trained: its overrides through the CLI's own check, every
member of a sweep composed and validated against the typed schema, the loss's data needs and the stages
planned. `eval` goes through the command up to loading the run, and its `--reward` is imported; `list`
runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # imports torch and composes ~60 configs: about 30 s

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: a shell line that runs alignlab: `alignlab ...` or `.venv/bin/alignlab ...` as a command (at the
#: start or after && / ; / |), or `-m / --module alignlab.cli`.
COMMAND = re.compile(r"(^|&&|;|\|)\s*(\S*/)?alignlab(\s|$)|(-m|--module)\s+alignlab\.cli\b")
INLINE = re.compile(r"`(alignlab (?:train|eval|list)\b[^`]*)`")
#: what makes an inline span a pattern rather than a command: placeholders, alternatives, or `alignlab
#: eval` without its run directory.
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\b[A-Z][A-Z_]+\b|=[A-Z]\b|\||^alignlab eval$")


def _args(tokens: list[str]) -> list[str] | None:
    """The arguments given to alignlab in one shell command's words, or None if it does not run it."""
    for i, word in enumerate(tokens):
        module = word == "alignlab.cli" and i > 0 and tokens[i - 1] in ("-m", "--module")
        if module or word == "alignlab" or word.endswith("/alignlab"):
            rest = tokens[i + 1 :]
            ends = [j for j, w in enumerate(rest) if w in ("&&", "||", ";", "|")]
            return rest[: ends[0]] if ends else rest
    return None


def _shell_lines(text: str):
    """(line number, line) of the fenced shell blocks (```bash, ```sh, ```shell, ```console or bare ```)
    of a markdown text, continuation lines joined."""
    fence, pending = None, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in ("bash", "sh", "shell", "console", ""):
            continue
        start, joined = pending if pending else (number, "")
        joined += line
        if joined.endswith("\\"):
            pending = (start, joined[:-1] + " ")
        else:
            pending = None
            yield start, joined


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, alignlab arguments) for every documented command."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for number, line in _shell_lines(text):
            if COMMAND.search(line):
                try:
                    args = _args(shlex.split(line, comments=True))
                except ValueError as err:  # e.g. an unclosed quote: a shell would refuse it too
                    args = [f"<{err}>"]
                found.append((f"{doc.name}:{number}: {line.strip()[:80]}", args or ["<no arguments>"]))
        for span in INLINE.finditer(text):
            command = span.group(1)
            if not PLACEHOLDER.search(command):
                number = text[: span.start()].count("\n") + 1
                found.append((f"{doc.name}:{number}: {command[:80]}", shlex.split(command)[1:]))
    from alignlab.cli import USAGE

    for line in USAGE.splitlines():  # `alignlab --help`'s examples
        if line.strip().startswith("alignlab "):
            command = re.sub(r"\s+\(.*\)\s*$", "", line.strip())
            found.append((f"alignlab --help: {command[:80]}", shlex.split(command)[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 40, [where for where, _ in COMMANDS]
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "distributed.md", "sweeps.md", "losses.md", "from_trl.md"} <= files, files


@pytest.mark.parametrize("where, args", COMMANDS, ids=[where.split(": ")[0] for where, _ in COMMANDS])
def test_documented_command(where, args, capfd, tmp_path, monkeypatch):
    from alignlab.cli import explain_overrides, main

    assert not any(c in arg for arg in args for c in "<>"), (
        f"{where}: a <placeholder> is a redirection in a shell"
    )
    command = args[0]
    if command == "list":
        main(["list"])
        assert "recipes (alignlab train +recipe=NAME)" in capfd.readouterr().out
    elif command == "eval":
        from alignlab.evaluate import load_reward

        monkeypatch.chdir(tmp_path)  # no run there: the command parses its flags, then stops at the run
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capfd.readouterr().err
        assert exit_.value.code == 2 and "is not a finished alignlab run" in err, err
        if "--reward" in args:
            assert callable(load_reward(args[args.index("--reward") + 1]))
    else:
        assert command == "train", where
        from alignlab import losses
        from alignlab.cli import split_argv, sweep_members
        from alignlab.compose import compose
        from alignlab.data import check_data_needs
        from alignlab.stages import plan
        from alignlab.train import to_typed

        overrides, config_dir, config_name = split_argv(args[1:])
        if config_dir is not None:  # an example of one's own recipe: give it one, in a fresh folder
            monkeypatch.chdir(tmp_path)
            for recipe in (o.split("=", 1)[1] for o in overrides if o.startswith("+recipe=")):
                (tmp_path / config_dir / "recipe").mkdir(parents=True, exist_ok=True)
                (tmp_path / config_dir / "recipe" / f"{recipe}.yaml").write_text(
                    "# @package _global_\ndefaults:\n  - override /loss: dpo\n"
                )
        assert explain_overrides(args[1:]) is None, where
        for member in sweep_members(overrides):
            cfg = compose(member, config_dir, config_name)
            typed = to_typed(cfg)
            needs = losses.build(typed.loss).needs
            check_data_needs(typed.data, needs.responses, needs.fields)
            plan(cfg)
