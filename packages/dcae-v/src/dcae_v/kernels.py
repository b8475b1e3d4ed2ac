"""The one seam where `dcvg-kernels` can replace the torch convolution path.

With the `dcae-v[kernels]` extra installed and a CUDA input, temporal convolutions go through

    dcvg_kernels.chunk_causal_conv3d(x, weight, bias, *, mode, chunk, context)

(`mode` in "chunk_causal" | "causal" | "non_causal", `chunk` the chunk length at that layer's
frame rate, `context` the trailing input frames of the previous streaming call or None; the
same contract as `temporal.conv3d_torch`, in plain arguments so that dcvg-kernels stays a leaf
package). Everywhere else, and whenever that kernel is absent, the pure-torch path runs.

Opt-in for now: set DCAE_V_KERNELS=1. The Triton kernel is tested against the reference in the
Triton interpreter only; it becomes the CUDA default once it has been validated and timed on a
GPU (dcvg-kernels README). DCAE_V_KERNELS=0 always forces the torch path.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from dcae_v.temporal import TemporalRule, conv3d_torch

ConvFn = Callable[..., torch.Tensor]
DEFAULT_ON_CUDA = "0"  # "1" once the Triton kernel is GPU-validated


@functools.cache
def _triton_conv() -> ConvFn | None:
    try:
        module = importlib.import_module("dcvg_kernels")
    except ImportError:
        return None
    return getattr(module, "chunk_causal_conv3d", None)


def kernel_available() -> bool:
    return _triton_conv() is not None


def _via_kernel(kernel: ConvFn, x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    return kernel(x, weight, bias, mode=rule.mode, chunk=rule.chunk, context=context)


def select_conv(x: torch.Tensor) -> ConvFn:
    """The convolution for this input, called as fn(x, weight, bias, rule, context):
    the Triton kernel on CUDA when installed, else the torch reference."""
    if x.is_cuda and os.environ.get("DCAE_V_KERNELS", DEFAULT_ON_CUDA) == "1":
        kernel = _triton_conv()
        if kernel is not None:
            return functools.partial(_via_kernel, kernel)
    return conv3d_torch


def conv3d(x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    return select_conv(x)(x, weight, bias, rule, context)
