"""The kernels as torch custom ops, so that eager, autograd and torch.compile see opaque calls.

`dcvg_kernels::chunk_causal_conv3d` runs the Triton kernel or the torch fallback, chosen by
`backend`:

* "auto"   (default) Triton for CUDA fp16/bf16/fp32 inputs when triton is installed; the
           torch fallback everywhere else (CPU, fp64, no triton).
* "triton" always Triton. On CPU this runs in the Triton interpreter and needs TRITON_INTERPRET=1
           set before the first Triton call (tests set it in their conftest); without it, or
           without triton installed, the call raises instead of silently falling back.
* "torch"  always the torch fallback (`fallback.py`: padded windows and one conv3d, equal to the
           reference).

Gradients come from the backward op `dcvg_kernels::chunk_causal_conv3d_backward`, on the same
backend as the forward: Triton dgrad/wgrad (`conv3d_backward`), or
`reference.conv3d_reference_backward` (torch's convolution_backward on the reference's stacked
tap copies). The bias gradient is a torch sum on both.

`dcvg_kernels::flash_attention` (+ `_backward`) is the Triton attention; `attention` below calls
it on CUDA and SDPA elsewhere.
"""

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from dcvg_kernels.fallback import conv3d_fallback
from dcvg_kernels.reference import (
    attention_reference,
    check_attention_args,
    check_conv3d_args,
    conv3d_reference_backward,
    output_memory_format,
)

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # = flash_attention.MAX_HEAD_DIM (not imported here: that module needs triton)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module(name: str):
    """A Triton module of this package, imported on first use (after TRITON_INTERPRET is settled)."""
    try:
        return importlib.import_module(f"dcvg_kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError("backend='triton' needs the triton package: pip install 'dcvg-kernels[triton]'") from e


def _triton_conv():
    return _triton_module("conv3d").conv3d_triton


def use_triton(x: Tensor, backend: str) -> bool:
    """Whether a call with this input and backend runs the Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend == "triton"
    return x.is_cuda and x.dtype in TRITON_DTYPES and triton_available()


@torch.library.custom_op("dcvg_kernels::chunk_causal_conv3d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, context: Tensor | None,
             residual: Tensor | None, mode: str, chunk: int, backend: str) -> Tensor:
    fn = _triton_conv() if use_triton(x, backend) else conv3d_fallback
    return fn(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)


@_conv_op.register_fake
def _conv_fake(x, weight, bias, context, residual, mode, chunk, backend):
    check_conv3d_args(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)
    use_triton(x, backend)  # validates the name
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


@torch.library.custom_op("dcvg_kernels::chunk_causal_conv3d_backward", mutates_args=())
def _conv_backward_op(grad: Tensor, x: Tensor, weight: Tensor, context: Tensor | None,
                      mode: str, chunk: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_context); grad_context is empty when there is no context."""
    fn = conv3d_reference_backward
    if use_triton(x, backend):
        fn = _triton_module("conv3d_backward").conv3d_triton_backward
    gx, gw, gctx = fn(grad, x, weight, mode=mode, chunk=chunk, context=context)
    gx = gx.contiguous(memory_format=output_memory_format(x))
    if context is None:
        gctx = x.new_empty(0)
    elif gctx is None:  # kt = 1 layers never read the context
        gctx = torch.zeros_like(context, memory_format=output_memory_format(context))
    elif fn is conv3d_reference_backward:  # its gx and gctx are views of one buffer; outputs must not alias
        gctx = gctx.clone(memory_format=output_memory_format(context))
    return gx, gw.contiguous(), gctx


@_conv_backward_op.register_fake
def _conv_backward_fake(grad, x, weight, context, mode, chunk, backend):
    gx = torch.empty_like(x, memory_format=output_memory_format(x))
    gctx = x.new_empty(0) if context is None else torch.empty_like(
        context, memory_format=output_memory_format(context))
    return gx, torch.empty_like(weight, memory_format=torch.contiguous_format), gctx


def _setup_context(ctx, inputs, output):
    x, weight, bias, context, residual, mode, chunk, backend = inputs
    ctx.save_for_backward(x, weight, context)
    ctx.mode, ctx.chunk, ctx.backend = mode, chunk, backend
    ctx.has_bias, ctx.has_context, ctx.has_residual = bias is not None, context is not None, residual is not None


def _backward(ctx, grad):
    x, weight, context = ctx.saved_tensors
    gx, gw, gctx = torch.ops.dcvg_kernels.chunk_causal_conv3d_backward(grad, x, weight, context, ctx.mode, ctx.chunk,
                                                                       ctx.backend)
    gbias = grad.sum((0, 2, 3, 4)) if ctx.has_bias else None
    return (gx, gw, gbias, gctx if ctx.has_context else None, grad if ctx.has_residual else None,
            None, None, None)


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, mode: str, chunk: int = 0,
                        context: Tensor | None = None, residual: Tensor | None = None,
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


# --- fused attention ------------------------------------------------------------------------

def _triton_attention():
    return _triton_module("flash_attention")


@torch.library.custom_op("dcvg_kernels::flash_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, Lq, H, D], lse [B, H, Lq] fp32) by the Triton kernel (CUDA, or CPU interpreted)."""
    return _triton_attention().attention_forward(q, k, v, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, scale):
    check_attention_args(q, k, v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dcvg_kernels::flash_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                           out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_attention().attention_backward(grad_out, q, k, v, out, lse, grad_lse, scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dcvg_kernels.flash_attention_backward(grad_out, grad_lse, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def use_triton_attention(q: Tensor, backend: str) -> bool:
    """Whether `attention` runs the Triton kernel for this input and backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend == "triton"
    return (q.is_cuda and q.dtype in TRITON_DTYPES and 1 <= q.shape[-1] <= MAX_HEAD_DIM
            and triton_available())


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                       backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32): softmax(q·kᵀ·scale)·v per head and
    the natural-log softmax denominator. Both are differentiable. "torch" computes them with the
    fp32 reference (a full score matrix: small inputs only)."""
    check_attention_args(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton_attention(q, backend):
        return torch.ops.dcvg_kernels.flash_attention(q, k, v, scale)
    out, lse = attention_reference(q, k, v, scale)
    return out.to(q.dtype), lse


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal softmax attention on [B, L, H, D] (Wan's layout), scale 1/sqrt(D) by default.

    q [B, Lq, H, D], k and v [B, Lk, H, D] (Lq != Lk allowed, e.g. cross-attention to text).
    backend "auto": the Triton kernel on CUDA for fp16/bf16/fp32 and head dims <= 128, else
    `F.scaled_dot_product_attention` on [B, H, L, D] views; "triton" forces the kernel (CPU: the
    interpreter, TRITON_INTERPRET=1); "torch" forces SDPA. Differentiable on every backend.
    """
    check_attention_args(q, k, v)
    if use_triton_attention(q, backend):
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return torch.ops.dcvg_kernels.flash_attention(q, k, v, scale)[0]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
