"""Errors caused by the user's input (config, data, model paths), shown as one actionable line.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Base of every error whose message tells the user what to change."""


class ConfigError(UserError):
    """A config value or combination that cannot work."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_error_behind(error: BaseException) -> UserError | None:
    """The first `UserError` in an exception's chain (itself, its cause or its context), if any.

    OmegaConf reports an error raised by a resolver (e.g. ``${stage:NAME}``) as its own
    `InterpolationResolutionError`, with the original only in the chain.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class RunStopped(Exception):
    """A run that stopped before finishing, for a reason its one-line message names; the CLI prints the
    message and exits with `exit_code` (see `EXIT_CODES`)."""

    exit_code = 1


class Interrupted(RunStopped):
    """SIGTERM or Ctrl-C: a checkpoint was saved at the end of the step; the message has the resume
    command."""

    exit_code = 3


class StorageError(RunStopped):
    """The run directory could not be written (disk full, permission denied, read-only)."""

    exit_code = 5


class RunDirectoryBusy(RunStopped):
    """Another live run holds the run directory's lock."""

    exit_code = 6


class StoppedAtOnce(RunStopped):
    """A second Ctrl-C: stopped at once, without a checkpoint of the current step."""

    exit_code = 130


#: `alignlab train`'s exit codes (README "Runs you can trust").
EXIT_CODES = {
    0: "finished",
    1: "an unexpected error (a bug: the traceback is printed)",
    2: (
        "invalid input: config, data, paths, or a run directory that belongs to another run "
        "(the line says the fix)"
    ),
    3: "preempted (SIGTERM or Ctrl-C): a checkpoint was saved; resumable with the printed command",
    4: "stopped by the NaN guard: a non-finite loss or gradient (the last checkpoint is the last good state)",
    5: "the run directory could not be written: disk full, permission denied or read-only",
    6: "the run directory is in use by another live run",
    130: "a second Ctrl-C: stopped at once (resume from the last complete checkpoint)",
}
