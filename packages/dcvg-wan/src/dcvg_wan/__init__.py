"""Wan-2.1 text-to-video and image-to-video on DC-AE-V.

Skeleton only: the DiT, the Wan VAE, the encoders, layouts and pipelines are tracked in the
dcvg-wan issue. Nothing is exported yet.
"""

from dcvg_wan.__about__ import __version__

__all__ = ["__version__"]
