"""Pure-torch references: the semantics every kernel in this package must match, and the fallback
wherever Triton does not run (CPU, no triton installed, fp64, gradients).

Chunk-causal conv3d (the DC-AE-V temporal convolution). Stride 1, 'same' spatial zero padding,
temporal kernel kt in {1, 3} with p = kt // 2. Tap i of output frame t reads input frame
s = t + i - shift (shift = 2p for "causal", else p). Frame s is read when

* 0 <= s < T (this clip), or -n <= s < 0 (frame n + s of the n-frame streaming `context`);
* and, for "chunk_causal" with chunk length C, s < (floor(t / C) + 1) * C (never a later chunk);

every other frame reads as zeros. This is the rule of `dcae_v.temporal.conv3d_torch` written
per tap (the test suite checks that the two agree): "non_causal" sees t-p..t+p and cannot
stream, "causal" sees t-2p..t, "chunk_causal" is bidirectional inside a chunk and causal across
chunks (a final partial chunk is treated like any chunk). Only the last p (chunk_causal) or 2p
(causal) context frames can be read; a shorter context is zero-filled on the left. Layers with
kt = 1 are per-frame 2D convolutions and ignore `mode`'s temporal rule and `context`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

MODES = ("chunk_causal", "causal", "non_causal")
KERNEL_SIZES = (1, 3)


class TemporalPlan(NamedTuple):
    """The validated temporal rule, as the kernels consume it."""

    shift: int  # tap i of output frame t reads input frame t + i - shift
    chunk: int  # chunk length of the chunk rule; 0 = no chunk rule
    use_context: bool  # whether `context` is read at all


def check_conv3d_args(x, weight, bias, *, mode, chunk, context, residual) -> TemporalPlan:
    """Host-side validation shared by the reference, the Triton launcher and the fake kernel."""
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"expected x [B, Cin, T, H, W] and weight [Cout, Cin, kt, kh, kw], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    b, cin, t, h, w = x.shape
    cout, wcin, kt, kh, kw = weight.shape
    if wcin != cin:
        raise ValueError(f"weight has {wcin} input channels, x has {cin} (grouped convs are not supported)")
    if any(k not in KERNEL_SIZES for k in (kt, kh, kw)):
        raise ValueError(f"kernel size {(kt, kh, kw)} unsupported: each of kt, kh, kw must be 1 or 3")
    if mode not in MODES:
        raise ValueError(f"unknown temporal mode {mode!r}; expected one of {MODES}")
    if t == 0 or h == 0 or w == 0:
        raise ValueError(f"x {tuple(x.shape)} has an empty time or space axis")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    out_shape = (b, cout, t, h, w)
    for name, tensor, shape in (("bias", bias, (cout,)), ("residual", residual, out_shape)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    for name, tensor in (("weight", weight), ("bias", bias), ("context", context), ("residual", residual)):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise ValueError(f"dtype mismatch: x is {x.dtype} but {name} is {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {tensor.device}")

    p = kt // 2
    if p == 0:
        return TemporalPlan(shift=0, chunk=0, use_context=False)
    if mode == "non_causal" and context is not None:
        raise ValueError("non_causal convolutions cannot stream: they need future frames")
    if mode == "chunk_causal" and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk_causal needs a chunk length >= 1, got {chunk!r}")
    if context is not None and (
            context.dim() != 5 or (context.shape[0], context.shape[1]) != (b, cin) or context.shape[3:] != x.shape[3:]):
        raise ValueError(f"streaming context of shape {tuple(context.shape)} does not fit input "
                         f"{tuple(x.shape)}: expected [B, Cin, n, H, W]")
    return TemporalPlan(shift=2 * p if mode == "causal" else p,
                        chunk=chunk if mode == "chunk_causal" else 0,
                        use_context=context is not None)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow the input's layout (channels_last_3d in, channels_last_3d out), on every path."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def conv3d_reference(x, weight, bias, *, mode, chunk=0, context=None, residual=None) -> torch.Tensor:
    """The temporal conv by its per-tap rule (module docstring), plus an optional residual add:
    y = conv(x) + bias + residual. Differentiable in every tensor argument."""
    plan = check_conv3d_args(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)
    kh, kw = weight.shape[3:]
    if weight.shape[2] == 1:
        y = F.conv3d(x, weight, bias, padding=(0, kh // 2, kw // 2))
    else:
        stacked, w2d = _stack_taps(x, weight, context if plan.use_context else None, plan)
        y = F.conv3d(stacked, w2d, bias, padding=(0, kh // 2, kw // 2))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=output_memory_format(x))


def conv3d_reference_backward(grad, x, weight, *, mode, chunk=0, context=None):
    """(grad_x, grad_weight, grad_context or None) of `conv3d_reference` for output gradient `grad`.

    Written without autograd (a torch custom op's body runs with autograd off): the input
    gradient of every tap copy is scattered back to the frame it was read from.
    """
    plan = check_conv3d_args(x, weight, None, mode=mode, chunk=chunk, context=context, residual=None)
    cout, cin, kt, kh, kw = weight.shape
    conv_args = ([1, 1, 1], [0, kh // 2, kw // 2], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False])
    if kt == 1:
        gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, *conv_args)
        return gx, gw, None
    ctx = context if plan.use_context else None
    stacked, w2d = _stack_taps(x, weight, ctx, plan)
    g_stacked, g_w2d, _ = torch.ops.aten.convolution_backward(grad, stacked, w2d, None, *conv_args)
    gw = g_w2d.reshape(cout, kt, cin, kh, kw).transpose(1, 2)
    t_len, n = x.shape[2], 0 if ctx is None else ctx.shape[2]
    g_source = x.new_zeros(x.shape[0], cin, n + t_len, *x.shape[3:])
    for i, g_tap in enumerate(g_stacked.split(cin, dim=1)):
        index, ok = _tap_index(t_len, n, i - plan.shift, plan.chunk, x.device)
        g_source.index_add_(2, index, torch.where(ok.view(1, 1, t_len, 1, 1), g_tap, 0))
    return g_source[:, :, n:], gw, None if ctx is None else g_source[:, :, :n]


def _stack_taps(x, weight, context, plan):
    """One input copy per temporal tap, stacked on channels, and the matching (1, kh, kw) weight:
    a single conv then sums the taps, and the temporal rule is which frames each copy holds."""
    cout, cin, kt, kh, kw = weight.shape
    taps = [_tap_frames(x, context, i - plan.shift, plan.chunk) for i in range(kt)]
    return torch.cat(taps, dim=1), weight.transpose(1, 2).reshape(cout, kt * cin, 1, kh, kw)


def _tap_index(t_len, n, d, chunk, device):
    """For output frames t: the index of frame t + d in cat([context (n frames), x]), and whether
    the rule lets t read it."""
    t = torch.arange(t_len, device=device)
    s = t + d
    ok = (s >= -n) & (s < t_len)
    if chunk:
        ok &= s < (t // chunk + 1) * chunk
    return (s + n).clamp(0, n + t_len - 1), ok


def _tap_frames(x, context, d, chunk):
    """Frame t of the result is input frame t + d where the rule allows it, else zeros."""
    n = 0 if context is None else context.shape[2]
    index, ok = _tap_index(x.shape[2], n, d, chunk, x.device)
    source = x if n == 0 else torch.cat([context, x], dim=2)
    return torch.where(ok.view(1, 1, -1, 1, 1), source.index_select(2, index), 0)


def attention_reference(q, k, v, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal softmax attention on [B, L, H, D] tensors, computed in fp32 (fp64 stays fp64).

    Returns (out [B, Lq, H, D], lse [B, H, Lq], natural log of the softmax denominator of the
    scaled scores): the oracle for the fused attention kernel's output and saved LSE.
    Differentiable (plain torch ops), so its autograd is the oracle for the kernel's backward.
    """
    check_attention_args(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("blhd,bmhd->bhlm", q.to(dtype), k.to(dtype)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhlm,bmhd->blhd", torch.exp(scores - lse.unsqueeze(-1)), v.to(dtype))
    return out, lse


def check_attention_args(q, k, v) -> None:
    """Host-side checks shared by the launcher, the fake kernel and the public function."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or (q.shape[0], q.shape[2], q.shape[3]) != (
            k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"expected q [B, Lq, H, D] and k, v [B, Lk, H, D] with equal B, H, D; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[1] == 0 and q.shape[1] > 0:
        raise ValueError("k and v have no rows: softmax over an empty key set is undefined")
