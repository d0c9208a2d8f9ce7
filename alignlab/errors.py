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
