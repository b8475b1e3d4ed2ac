"""The three temporal rules of a DC-AE-V convolution, in pure torch.

A 3D conv with temporal kernel k (padding p = k // 2) differs between modes only in which
frames fill its temporal padding:

* ``non_causal``:   p zero frames on both ends of the clip.
* ``causal``:       2p frames on the left (zeros, or the previous call's last input frames),
                    none on the right: output frame t sees inputs t-2p .. t.
* ``chunk_causal``: frames are split into chunks of L; each chunk gets, on the left, the last p
                    input frames of the previous chunk (zeros or the cache for the first chunk)
                    and p zero frames on the right. Bidirectional inside a chunk, causal across.
                    A final partial chunk (T % L != 0) is treated the same way here (the
                    contract shared with dcvg-kernels); the model's `TemporalConv3d` instead
                    runs such a tail on its own without context, as NVIDIA's released code does.

`context` is the streaming cache: the last input frames of the previous call, so that running
a video tile by tile (tiles a multiple of L) equals running it at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class TemporalRule:
    mode: str  # "chunk_causal" | "causal" | "non_causal"
    chunk: int = 0  # chunk length at this layer's frame rate (chunk_causal only)

    def context_frames(self, kernel_t: int) -> int:
        """How many trailing input frames the next streaming call needs."""
        p = kernel_t // 2
        return {"chunk_causal": p, "causal": 2 * p, "non_causal": 0}[self.mode]


def conv3d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rule: TemporalRule,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stride-1 3D conv with 'same' spatial zero padding and the temporal `rule`.

    x: [B, C, T, H, W]; context: [B, C, n, H, W] trailing frames of the previous call (or None).
    """
    kt, kh, kw = weight.shape[2:]
    p = kt // 2
    spatial = (0, kh // 2, kw // 2)
    if p == 0:
        return F.conv3d(x, weight, bias, padding=spatial)
    if rule.mode == "non_causal":
        if context is not None:
            raise ValueError("non_causal convolutions cannot stream: they need future frames")
        return F.conv3d(x, weight, bias, padding=(p, kh // 2, kw // 2))
    if rule.mode == "causal":
        left = _left_context(x, context, 2 * p)
        return F.conv3d(torch.cat([left, x], dim=2), weight, bias, padding=spatial)
    if rule.mode != "chunk_causal":
        raise ValueError(f"unknown temporal mode {rule.mode!r}")
    return _chunk_causal(x, weight, bias, rule.chunk, p, spatial, context)


def _left_context(x: torch.Tensor, context: torch.Tensor | None, n: int) -> torch.Tensor:
    """n frames to put before x: the cached frames, zero-filled on the left if too few."""
    b, c, _, h, w = x.shape
    if context is None:
        return x.new_zeros(b, c, n, h, w)
    if context.shape[0] != b or context.shape[1] != c or context.shape[3:] != x.shape[3:]:
        raise ValueError(f"streaming context of shape {tuple(context.shape)} does not fit input {tuple(x.shape)}")
    missing = n - context.shape[2]
    if missing > 0:
        context = torch.cat([x.new_zeros(b, c, missing, h, w), context], dim=2)
    return context[:, :, context.shape[2] - n :]


def _chunk_causal(x, weight, bias, chunk, p, spatial, context):
    b, c, t, h, w = x.shape
    n_full, rem = divmod(t, chunk)
    first_left = _left_context(x, context, p)
    outs = []
    if n_full:
        body = rearrange(x[:, :, : n_full * chunk], "b c (n l) h w -> b n c l h w", l=chunk)
        # left context of chunk k: last p frames of chunk k-1 (chunk 0: cache or zeros)
        lefts = torch.cat([first_left.unsqueeze(1), body[:, :-1, :, chunk - p :]], dim=1)
        rights = x.new_zeros(b, n_full, c, p, h, w)
        windows = torch.cat([lefts, body, rights], dim=3)
        y = F.conv3d(rearrange(windows, "b n c l h w -> (b n) c l h w"), weight, bias, padding=spatial)
        outs.append(rearrange(y, "(b n) c l h w -> b c (n l) h w", b=b))
    if rem:
        left = first_left if not n_full else x[:, :, n_full * chunk - p : n_full * chunk]
        tail = torch.cat([left, x[:, :, n_full * chunk :], x.new_zeros(b, c, p, h, w)], dim=2)
        outs.append(F.conv3d(tail, weight, bias, padding=spatial))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def next_context(x: torch.Tensor, context: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The trailing `n` input frames to hand to the next streaming call."""
    if n == 0:
        return None
    if x.shape[2] >= n:
        return x[:, :, x.shape[2] - n :].detach().clone()
    return torch.cat([_left_context(x, context, n), x], dim=2)[:, :, -n:].detach().clone()
