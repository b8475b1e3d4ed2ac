"""AE-Adapt-V for any DiT.

Skeleton only: the protocol, the three adaptation stages and LoRA I/O are tracked in the
ae-adapt issue. Nothing is exported yet.
"""

from ae_adapt.__about__ import __version__

__all__ = ["__version__"]
