"""The conv as a torch custom op, so that eager, autograd and torch.compile see one opaque call.

`dcvg_kernels::chunk_causal_conv3d` runs the Triton kernel or the torch reference, chosen by
`backend`:

* "auto"   (default) Triton for CUDA fp16/bf16/fp32 inputs when triton is installed; the
           reference everywhere else (CPU, fp64, no triton).
* "triton" always Triton. On CPU this runs in the Triton interpreter and needs TRITON_INTERPRET=1
           set before the first Triton call (tests set it in their conftest); without it, or
           without triton installed, the call raises instead of silently falling back.
* "torch"  always the reference.

Gradients, on either backend, come from the reference: the backward op
`dcvg_kernels::chunk_causal_conv3d_backward` runs `reference.conv3d_reference_backward` (torch's
convolution_backward on the reference's stacked tap copies). Triton dgrad/wgrad will replace
its body in a later slice without changing this wiring.
"""

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from dcvg_kernels.reference import (
    check_conv3d_args,
    conv3d_reference,
    conv3d_reference_backward,
    output_memory_format,
)

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_conv():
    try:
        from dcvg_kernels import conv3d
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError("backend='triton' needs the triton package: pip install 'dcvg-kernels[triton]'") from e
    return conv3d.conv3d_triton


def use_triton(x: Tensor, backend: str) -> bool:
    """Whether a call with this input and backend runs the Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend == "triton"
    return x.is_cuda and x.dtype in TRITON_DTYPES and triton_available()


@torch.library.custom_op("dcvg_kernels::chunk_causal_conv3d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], context: Optional[Tensor],
             residual: Optional[Tensor], mode: str, chunk: int, backend: str) -> Tensor:
    fn = _triton_conv() if use_triton(x, backend) else conv3d_reference
    return fn(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)


@_conv_op.register_fake
def _conv_fake(x, weight, bias, context, residual, mode, chunk, backend):
    check_conv3d_args(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)
    use_triton(x, backend)  # validates the name
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


@torch.library.custom_op("dcvg_kernels::chunk_causal_conv3d_backward", mutates_args=())
def _conv_backward_op(grad: Tensor, x: Tensor, weight: Tensor, context: Optional[Tensor],
                      mode: str, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_context); grad_context is empty when there is no context."""
    gx, gw, gctx = conv3d_reference_backward(grad, x, weight, mode=mode, chunk=chunk, context=context)
    gx = gx.contiguous(memory_format=output_memory_format(x))
    if context is None:
        gctx = x.new_empty(0)
    elif gctx is None:  # kt = 1 layers never read the context
        gctx = torch.zeros_like(context, memory_format=output_memory_format(context))
    else:  # a copy: gx and gctx may be views of one buffer, and op outputs must not alias
        gctx = gctx.clone(memory_format=output_memory_format(context))
    return gx, gw.contiguous(), gctx


@_conv_backward_op.register_fake
def _conv_backward_fake(grad, x, weight, context, mode, chunk):
    gx = torch.empty_like(x, memory_format=output_memory_format(x))
    gctx = x.new_empty(0) if context is None else torch.empty_like(
        context, memory_format=output_memory_format(context))
    return gx, torch.empty_like(weight, memory_format=torch.contiguous_format), gctx


def _setup_context(ctx, inputs, output):
    x, weight, bias, context, residual, mode, chunk, _ = inputs
    ctx.save_for_backward(x, weight, context)
    ctx.mode, ctx.chunk = mode, chunk
    ctx.has_bias, ctx.has_context, ctx.has_residual = bias is not None, context is not None, residual is not None


def _backward(ctx, grad):
    x, weight, context = ctx.saved_tensors
    gx, gw, gctx = torch.ops.dcvg_kernels.chunk_causal_conv3d_backward(grad, x, weight, context, ctx.mode, ctx.chunk)
    gbias = grad.sum((0, 2, 3, 4)) if ctx.has_bias else None
    return (gx, gw, gbias, gctx if ctx.has_context else None, grad if ctx.has_residual else None,
            None, None, None)


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_causal_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mode: str, chunk: int = 0,
                        context: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                        backend: str = "auto") -> Tensor:
    """y = conv(x) + bias + residual with DC-AE-V's temporal rule (see `dcvg_kernels.reference`).

    x [B, Cin, T, H, W] (NCDHW or channels_last_3d; the output keeps the layout), weight
    [Cout, Cin, kt, kh, kw] with each size 1 or 3, mode "chunk_causal" | "causal" | "non_causal",
    chunk the chunk length (chunk_causal only), context None or [B, Cin, n, H, W] trailing input
    frames of the previous streaming call, residual None or [B, Cout, T, H, W]. `backend` picks the
    implementation (module docstring). This is the function dcae-v's kernel seam calls.
    """
    return torch.ops.dcvg_kernels.chunk_causal_conv3d(
        x, weight, bias, context, residual, mode, int(chunk or 0), backend)
