"""Typed errors with actionable messages; only the CLI turns them into exit codes."""


class DCAEVError(Exception):
    """Base class for errors the user can fix."""


class InputError(DCAEVError, ValueError):
    """A tensor, video or image the model cannot take as given (the message says what to do)."""


class CheckpointError(DCAEVError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the architecture."""
