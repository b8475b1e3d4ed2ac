"""Typed errors with actionable messages; only a CLI turns them into exit codes."""


class WanError(Exception):
    """Base class for errors the user can fix."""


class InputError(WanError, ValueError):
    """A tensor the model cannot take as given (the message says what was expected)."""


class CheckpointError(WanError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the architecture."""
