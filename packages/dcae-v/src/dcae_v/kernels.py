"""The one seam where `dcvg-kernels` can replace the torch convolution path.

With the `dcae-v[kernels]` extra installed and a CUDA input, temporal convolutions may go through

    dcvg_kernels.chunk_causal_conv3d(x, weight, bias, *, mode, chunk, context)

(`mode` in "chunk_causal" | "causal" | "non_causal", `chunk` the chunk length at that layer's
frame rate, `context` the trailing input frames of the previous streaming call or None; the
same contract as `temporal.conv3d_torch`, in plain arguments so that dcvg-kernels stays a leaf
package). On CPU, and whenever that kernel is absent, the pure-torch path runs.

`DCAE_V_KERNELS` picks the path on CUDA:

* "auto" (default): per call signature (shapes, dtype, temporal rule), the first call times the
  Triton kernel against the torch path (cuDNN after a padding copy) and every later call with
  that signature runs the faster one, like `torch.backends.cudnn.benchmark`. Measured on an H200
  the kernel wins only on the large early decoder stages (dcvg-kernels README), so "auto" is
  what keeps it from slowing the small ones down. Each decision is logged once at INFO level; a
  kernel that fails on its trial is reported with a warning and that signature stays on torch.
  Under torch.compile or CUDA-graph capture no timing is possible: those calls use torch unless
  the signature was decided before.
* "1": the Triton kernel for every CUDA call. "0": always the torch path.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from collections.abc import Callable

import torch

from dcae_v.errors import InputError
from dcae_v.temporal import TemporalRule, conv3d_torch

ConvFn = Callable[..., torch.Tensor]
MODES = ("auto", "1", "0")
TRIAL_REPEATS = 3
log = logging.getLogger(__name__)

# signature -> True when the kernel was faster (or forced), False when torch was
_decisions: dict[tuple, bool] = {}


@functools.cache
def _triton_conv() -> ConvFn | None:
    try:
        module = importlib.import_module("dcvg_kernels")
    except ImportError:
        return None
    return getattr(module, "chunk_causal_conv3d", None)


def kernel_available() -> bool:
    return _triton_conv() is not None


def kernel_mode() -> str:
    mode = os.environ.get("DCAE_V_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise InputError(f"DCAE_V_KERNELS={mode!r} is not one of {MODES}: use auto (time both paths per layer "
                         "shape, the default), 1 (always the Triton kernel on CUDA) or 0 (always torch)")
    return mode


def _via_kernel(kernel: ConvFn, x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    return kernel(x, weight, bias, mode=rule.mode, chunk=rule.chunk, context=context)


def signature(x, weight, rule: TemporalRule, context) -> tuple:
    """What the speed of one call depends on."""
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last_3d), tuple(weight.shape),
            rule.mode, rule.chunk, None if context is None else context.shape[2], str(x.device))


def _cannot_time() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _milliseconds(fn: Callable[[], torch.Tensor], device) -> float:
    """Best of a few timed runs after one warm-up (which also compiles/autotunes a Triton kernel)."""
    fn()
    best = float("inf")
    for _ in range(TRIAL_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end))
    return best


def decide(key: tuple, run_kernel: Callable[[], torch.Tensor], run_torch: Callable[[], torch.Tensor],
           timer: Callable[[Callable[[], torch.Tensor]], float]) -> bool:
    """Whether calls with signature `key` use the kernel: measured once, then remembered."""
    if key in _decisions:
        return _decisions[key]
    with torch.no_grad():
        try:
            kernel_ms = timer(run_kernel)
        except Exception as e:  # noqa: BLE001 - any failure of the optional kernel keeps the torch path
            warnings.warn(f"dcae-v: the Triton conv failed on {key} ({type(e).__name__}: {e}); this layer runs the "
                          "torch path (set DCAE_V_KERNELS=0 to skip the kernel entirely)", RuntimeWarning,
                          stacklevel=3)
            _decisions[key] = False
            return False
        torch_ms = timer(run_torch)
    use = kernel_ms < torch_ms
    _decisions[key] = use
    log.info("dcae-v conv %s: triton %.3f ms, torch %.3f ms -> %s", key, kernel_ms, torch_ms,
             "triton" if use else "torch")
    return use


def _auto(kernel: ConvFn, x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    key = signature(x, weight, rule, context)
    if key not in _decisions and _cannot_time():
        return conv3d_torch(x, weight, bias, rule, context)
    use = decide(key, lambda: _via_kernel(kernel, x, weight, bias, rule, context),
                 lambda: conv3d_torch(x, weight, bias, rule, context),
                 functools.partial(_milliseconds, device=x.device))
    if use:
        return _via_kernel(kernel, x, weight, bias, rule, context)
    return conv3d_torch(x, weight, bias, rule, context)


def select_conv(x: torch.Tensor) -> ConvFn:
    """The convolution for this input, called as fn(x, weight, bias, rule, context): on CUDA with
    the kernel installed, per DCAE_V_KERNELS (module docstring); else the torch path."""
    if not x.is_cuda:
        return conv3d_torch
    mode = kernel_mode()
    kernel = _triton_conv() if mode != "0" else None
    if kernel is None:
        return conv3d_torch
    return functools.partial(_via_kernel if mode == "1" else _auto, kernel)


def conv3d(x, weight, bias, rule: TemporalRule, context=None) -> torch.Tensor:
    return select_conv(x)(x, weight, bias, rule, context)
