"""PIL's bicubic `Image.resize` on 8-bit images, in torch, bit for bit.

NVIDIA's DC-VideoGen I2V resizes the first frame with `PIL.Image.resize((w, h))` and CLIP's input
with transformers' `CLIPImageProcessor` (PIL, bicubic). Both are reproduced here exactly rather
than approximated: torch's own uint8 antialiased bicubic differs from PIL by up to ~10 levels on
noisy images. The algorithm is Pillow's `Resample.c`: per axis, Keys' cubic (a = -0.5) stretched
by the downscale factor, weights normalised and rounded to 22-bit fixed point, a horizontal pass
to 8 bits, then a vertical pass to 8 bits.
"""

from __future__ import annotations

import math

import torch

_PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit fixed-point precision
_SUPPORT = 2.0  # bicubic


def _cubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _coefficients(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index [out, k], fixed-point weight [out, k]) as Pillow's precompute_coeffs +
    normalize_coeffs_8bpc compute them (same float64 operations, same rounding)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    inv = 1.0 / filterscale
    index = torch.zeros(out_size, ksize, dtype=torch.int64)
    weight = torch.zeros(out_size, ksize, dtype=torch.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_cubic((x + xmin - center + 0.5) * inv) for x in range(xmax)]
        total = sum(w)
        for x, v in enumerate(w):
            k = v / total if total != 0.0 else v
            weight[xx, x] = int(k * (1 << _PRECISION_BITS) + (-0.5 if k < 0 else 0.5))
            index[xx, x] = xmin + x
    return index, weight


def _resample_last_axis(x: torch.Tensor, out_size: int) -> torch.Tensor:
    index, weight = _coefficients(x.shape[-1], out_size)
    acc = torch.full((*x.shape[:-1], out_size), 1 << (_PRECISION_BITS - 1), dtype=torch.int64)
    for k in range(index.shape[1]):
        acc += x.index_select(-1, index[:, k]) * weight[:, k]
    return (acc >> _PRECISION_BITS).clamp(0, 255)


def pil_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [..., C, H, W] -> uint8 [..., C, height, width], equal to PIL's
    `Image.resize((width, height), Image.BICUBIC)` on each image (RGB/L, no box, no reducing_gap)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pil_resize takes uint8 pixels, got {pixels.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"the output size must be positive, got {width}x{height}")
    x = pixels.cpu().to(torch.int64)
    if x.shape[-1] != width:  # horizontal pass first, as Pillow
        x = _resample_last_axis(x, width)
    if x.shape[-2] != height:
        x = _resample_last_axis(x.transpose(-1, -2), height).transpose(-1, -2)
    return x.to(torch.uint8).to(pixels.device)
