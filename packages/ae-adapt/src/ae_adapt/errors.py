"""Typed errors with actionable messages; only a CLI turns them into exit codes."""


class AdaptError(Exception):
    """Base class for errors the user can fix."""


class ProtocolError(AdaptError, TypeError):
    """A model that does not offer what AE-Adapt-V needs (the message names the missing member)."""


class ShapeError(AdaptError, ValueError):
    """Latents the new patch embedder cannot tile, or grids that cannot be pooled onto each other."""


class CacheError(AdaptError, ValueError):
    """A latent cache that is missing, malformed, or built with other autoencoders than the run's."""


class ResumeError(AdaptError, ValueError):
    """A checkpoint that cannot be resumed as asked (changed config, other stage, other world size)."""


class PresetError(AdaptError, ValueError):
    """An unknown preset name (the message lists the valid ones)."""


class OutputError(AdaptError, ValueError):
    """An output path that cannot be written (missing or read-only directory, a directory as target)."""


class DivergedError(AdaptError, ArithmeticError):
    """A stage's loss or gradients became NaN/Inf; stopped before any checkpoint or output was
    overwritten (the message names the last good checkpoint and what to change)."""
