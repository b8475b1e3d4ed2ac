"""3D rotary position embedding of Wan-2.1 self-attention.

Each head's channels are split into temporal, height and width parts; every part rotates
adjacent channel pairs (2i, 2i+1) by position * theta^(-2i/d_part), with integer (f, h, w)
positions on the patch grid. Angles are computed in float64, as the official code does.
"""

from __future__ import annotations

import functools

import torch

from dcvg_wan.errors import InputError

THETA = 10000.0
MAX_POSITIONS = 1024  # the official frequency table has 1024 rows per axis


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): h = w = 2*(head_dim//6), t takes the rest.

    44/42/42 for head_dim 128. Official: rope_params(1024, d - 4*(d//6)) and 2 x rope_params(1024,
    2*(d//6)); diffusers WanRotaryPosEmbed: h = w = 2*(d//6), t = d - h - w.
    """
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(length: int, dim: int) -> torch.Tensor:
    """[length, dim/2] float64 angles pos * theta^(-2i/dim)."""
    inv = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    return torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device: torch.device | str | None = None):
    """(cos, sin), each [f*h*w, head_dim/2] float32, tokens in (f, h, w) row-major order.
    Cached: every denoising step of a video reuses the same tables (do not modify them)."""
    grid = tuple(int(g) for g in grid)
    if max(grid) > MAX_POSITIONS:
        raise InputError(f"token grid {grid} exceeds {MAX_POSITIONS} positions per axis (Wan's RoPE table)")
    return _cos_sin(grid, head_dim, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached tables must stay usable by autograd after an inference call
def _cos_sin(grid: tuple[int, int, int], head_dim: int, device: torch.device):
    f, h, w = grid
    t_dim, h_dim, w_dim = axis_dims(head_dim)
    parts = (
        _axis_angles(f, t_dim)[:, None, None, :].expand(f, h, w, -1),
        _axis_angles(h, h_dim)[None, :, None, :].expand(f, h, w, -1),
        _axis_angles(w, w_dim)[None, None, :, :].expand(f, h, w, -1),
    )
    angles = torch.cat(parts, dim=-1).reshape(f * h * w, head_dim // 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] pairwise (interleaved channels); computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
