"""Errors caused by the user's input (config, data, model paths), shown as one actionable line.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Base of every error whose message tells the user what to change."""


class ConfigError(UserError):
    """A config value or combination that cannot work."""
