"""The one seam where `dcvg-kernels` can replace the torch convolution path.

With the `dcae-v[kernels]` extra installed and a CUDA input, temporal convolutions go through
`dcvg_kernels.chunk_causal_conv3d` (same arguments as `temporal.conv3d_torch`). Everywhere
else, and whenever that kernel is not available, the pure-torch path in `temporal.py` runs.
Set DCAE_V_KERNELS=0 to force the torch path.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from dcae_v.temporal import TemporalRule, conv3d_torch

ConvFn = Callable[..., torch.Tensor]


@functools.cache
def _triton_conv() -> ConvFn | None:
    try:
        module = importlib.import_module("dcvg_kernels")
    except ImportError:
        return None
    return getattr(module, "chunk_causal_conv3d", None)


def kernel_available() -> bool:
    return _triton_conv() is not None


def select_conv(x: torch.Tensor) -> ConvFn:
    """The convolution implementation for this input (Triton on CUDA when installed)."""
    if x.is_cuda and os.environ.get("DCAE_V_KERNELS", "1") != "0":
        fn = _triton_conv()
        if fn is not None:
            return fn
    return conv3d_torch


def conv3d(x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    return select_conv(x)(x, weight, bias, rule, context)
