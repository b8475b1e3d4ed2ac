"""Spatial tiling for the Wan VAE, with diffusers' AutoencoderKLWan semantics, so that
`enable_tiling()` gives the same video as diffusers' `vae.enable_tiling()` on the same weights.

Frames larger than a tile are cut into overlapping tiles (default 256 px, stride 192 px), each
tile runs through the VAE with its own streaming cache, and neighbouring tiles are cross-faded
over the overlap: each tile, in row-major order, is blended in place with the already blended
tile above and then the one to its left (weight y / extent for the new tile), and the top-left
stride x stride corner of every tile is kept. The decoder tiles in latent space (256 px / 8 =
32 latent px, stride 24) and blends pixels; the encoder tiles pixels and blends the posterior
moments (extent 8 latent px). Blending is per frame, so tiled decoding still streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcvg_wan.errors import InputError


@dataclass(frozen=True)
class TileSpec:
    """Tile size and stride in pixels (diffusers' tile_sample_min_* / tile_sample_stride_*)."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def check(self, spatial_compression: int) -> TileSpec:
        s = spatial_compression
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < s or value % s:
                raise InputError(f"tile {name}={value!r} must be a positive multiple of {s} (the VAE's pixels per latent)")
        if self.stride_height > self.min_height or self.stride_width > self.min_width:
            raise InputError(f"tile strides ({self.stride_height}, {self.stride_width}) must not exceed the tile size "
                             f"({self.min_height}, {self.min_width}): tiles would leave gaps")
        return self

    def size(self, scale: int = 1) -> tuple[int, int]:
        """Tile height and width, in pixels / scale (scale 8: latent pixels)."""
        return self.min_height // scale, self.min_width // scale

    def stride(self, scale: int = 1) -> tuple[int, int]:
        return self.stride_height // scale, self.stride_width // scale

    def blend(self, scale: int = 1) -> tuple[int, int]:
        """Overlap of neighbouring tiles, over which they are cross-faded."""
        return (self.min_height - self.stride_height) // scale, (self.min_width - self.stride_width) // scale


def tile_starts(length: int, stride: int) -> list[int]:
    return list(range(0, length, stride))


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows/columns of `tile` (in place) with the last of `prev`."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    shape = [1] * tile.dim()
    shape[dim] = extent
    w = torch.arange(extent, dtype=torch.float64) / extent  # the ratio in double, rounded once, as diffusers
    new = w.to(tile.dtype).to(tile.device).view(shape)
    old = (1 - w).to(tile.dtype).to(tile.device).view(shape)
    head = tile.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * old + head * new)
    return tile


def stitch(grid: list[list[torch.Tensor]], blend: tuple[int, int], stride: tuple[int, int],
           size: tuple[int, int]) -> torch.Tensor:
    """Blend a row-major grid of overlapping tiles [..., h, w] (modified in place) into [..., H, W]."""
    rows = []
    for i, row in enumerate(grid):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(grid[i - 1][j], tile, blend[0], -2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend[1], -1)
            kept.append(tile[..., : stride[0], : stride[1]])
        rows.append(torch.cat(kept, dim=-1))
    return torch.cat(rows, dim=-2)[..., : size[0], : size[1]]
