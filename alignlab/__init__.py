"""alignlab: align language models from preference data."""

__version__ = "0.1.0"
