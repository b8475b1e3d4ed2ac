"""The torch path the conv op runs where Triton does not (CPU, fp64, no triton): one cuDNN/MKL-DNN
conv3d over temporally padded windows, instead of the reference's one input copy per tap.

Same semantics as `reference.conv3d_reference` (tests compare the two). The temporal rule becomes
padding: "non_causal" pads p zero frames on both sides; "causal" puts 2p frames on the left (the
streaming context, zero-filled); "chunk_causal" cuts the clip into chunks and gives each the last
p frames before it on the left and p zero frames on the right, then convolves all chunks as one
batch (a final partial chunk separately).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcvg_kernels.reference import check_conv3d_args, output_memory_format


def _left_frames(x, context, n):
    """The n frames before x: the context's last n, zero-filled on the left when it is shorter."""
    b, c, _, h, w = x.shape
    have = 0 if context is None else min(n, context.shape[2])
    parts = [x.new_zeros(b, c, n - have, h, w)] if have < n else []
    if have:
        parts.append(context[:, :, context.shape[2] - have:])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _chunk_windows(x, weight, bias, chunk, p, left, spatial):
    b, c, t, h, w = x.shape
    n_full, rem = divmod(t, chunk)
    outs = []
    if n_full:
        body = x[:, :, :n_full * chunk].unflatten(2, (n_full, chunk)).transpose(1, 2)  # b n c l h w
        # chunk k's left frames: the last p of chunk k-1 (p = 1 <= chunk: kt is 1 or 3)
        lefts = torch.cat([left.unsqueeze(1), body[:, :-1, :, chunk - p:]], dim=1)
        windows = torch.cat([lefts, body, body.new_zeros(b, n_full, c, p, h, w)], dim=3)
        y = F.conv3d(windows.flatten(0, 1), weight, bias, padding=spatial)
        outs.append(y.unflatten(0, (b, n_full)).transpose(1, 2).flatten(2, 3))
    if rem:
        start = n_full * chunk
        prev = x[:, :, start - p:start] if n_full else left  # the p frames before the partial chunk
        tail = torch.cat([prev, x[:, :, start:], x.new_zeros(b, c, p, h, w)], 2)
        outs.append(F.conv3d(tail, weight, bias, padding=spatial))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def conv3d_fallback(x, weight, bias, *, mode, chunk=0, context=None, residual=None) -> torch.Tensor:
    """`conv3d_reference`'s result by padded windows and a single conv3d per call."""
    plan = check_conv3d_args(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)
    kt, kh, kw = weight.shape[2:]
    p, spatial = kt // 2, (0, kh // 2, kw // 2)
    if p == 0:
        y = F.conv3d(x, weight, bias, padding=spatial)
    elif mode == "non_causal":
        y = F.conv3d(x, weight, bias, padding=(p, kh // 2, kw // 2))
    elif mode == "causal":
        y = F.conv3d(torch.cat([_left_frames(x, context, 2 * p), x], dim=2), weight, bias, padding=spatial)
    else:
        y = _chunk_windows(x, weight, bias, plan.chunk, p, _left_frames(x, context, p), spatial)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=output_memory_format(x))
