"""Triton kernels for DC-VideoGen.

Skeleton only: the chunk-causal conv3d and fused attention kernels are tracked in the
dcvg-kernels issue. Nothing is exported yet, so `dcae-v` keeps its pure-torch path.
"""

from dcvg_kernels.__about__ import __version__

__all__ = ["__version__"]
