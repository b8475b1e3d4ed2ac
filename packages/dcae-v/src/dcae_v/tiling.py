"""Temporal streaming and spatial tiling for long and large videos.

Temporal tiles carry each conv's trailing input frames in a cache, so with tiles that are a
multiple of the chunk size the result equals one shot (up to float rounding) and memory does
not grow with the video length. Spatial tiles overlap by a quarter of the tile and are blended
with linear ramps; each spatial tile keeps its own temporal cache. Spatial tiling is an
approximation (the receptive field is cut): its error is measured in the package README.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from dcae_v.errors import InputError

if TYPE_CHECKING:
    from dcae_v.model import DCAEV

Net = Callable[..., torch.Tensor]


def encode(model: DCAEV, x: torch.Tensor, frames_per_tile: int | None, tile_size: int | None) -> torch.Tensor:
    step = _temporal_step(model, x.shape[2], frames_per_tile)
    f = model.spatial_compression
    tiler = _SpatialTiler(model.encoder, tile_size, f, 1 / f, stream=step < x.shape[2])
    return torch.cat([tiler(piece) for piece in x.split(step, dim=2)], dim=2)


def decode(model: DCAEV, z: torch.Tensor, frames_per_tile: int | None, tile_size: int | None) -> torch.Tensor:
    tc = model.temporal_compression
    step = _temporal_step(model, z.shape[2] * tc, frames_per_tile) // tc
    f = model.spatial_compression
    if tile_size is not None and (tile_size <= 0 or tile_size % f):
        raise InputError(f"decode tile_size is in output pixels and must be a positive multiple of {f}, got {tile_size}")
    tiler = _SpatialTiler(model.decoder, None if tile_size is None else tile_size // f, 1, f, stream=step < z.shape[2])
    return torch.cat([tiler(piece) for piece in z.split(step, dim=2)], dim=2)


def encode_stream(
    model: DCAEV, pieces: Iterable[torch.Tensor], frames_per_tile: int | None, tile_size: int | None
) -> Iterator[torch.Tensor]:
    _require_streamable(model)
    step = _temporal_step(model, None, frames_per_tile or model.config.chunk_size)
    f = model.spatial_compression
    tiler = _SpatialTiler(model.encoder, tile_size, f, 1 / f, stream=True)
    for block in _rebatch(pieces, step, model.temporal_compression, "frames"):
        yield tiler(block)


def decode_stream(
    model: DCAEV, latents: Iterable[torch.Tensor], frames_per_tile: int | None, tile_size: int | None
) -> Iterator[torch.Tensor]:
    _require_streamable(model)
    tc = model.temporal_compression
    step = _temporal_step(model, None, frames_per_tile or model.config.chunk_size) // tc
    f = model.spatial_compression
    if tile_size is not None and (tile_size <= 0 or tile_size % f):
        raise InputError(f"decode tile_size is in output pixels and must be a positive multiple of {f}, got {tile_size}")
    tiler = _SpatialTiler(model.decoder, None if tile_size is None else tile_size // f, 1, f, stream=True)
    for block in _rebatch(latents, step, 1, "latent frames"):
        yield tiler(block)


def check_frames_per_tile(model: DCAEV, frames_per_tile: int | None) -> None:
    """Raise InputError now if `frames_per_tile` cannot tile this model in time (callers that decode
    only after minutes of sampling check it up front)."""
    _temporal_step(model, None, frames_per_tile)


# ---- temporal helpers ------------------------------------------------------------------------
def _temporal_step(model: DCAEV, frames: int | None, frames_per_tile: int | None) -> int:
    """Validated tile length in frames; `frames` is the clip length (None for a stream)."""
    if frames_per_tile is None:
        return frames
    mode = model.config.temporal
    multiple = model.config.chunk_size if mode == "chunk_causal" else model.temporal_compression
    if frames_per_tile <= 0 or (mode != "non_causal" and frames_per_tile % multiple):
        raise InputError(f"frames_per_tile must be a positive multiple of {multiple} in {mode} mode, got {frames_per_tile}")
    if frames is not None and frames_per_tile >= frames:
        return frames
    if mode == "non_causal":
        raise InputError(
            "a non_causal DC-AE-V cannot be tiled in time without changing its output; "
            "leave frames_per_tile unset or use a chunk_causal/causal model"
        )
    return frames_per_tile


def _require_streamable(model: DCAEV) -> None:
    if model.config.temporal == "non_causal":
        raise InputError("a non_causal DC-AE-V cannot stream: every output frame depends on the whole clip")


def _rebatch(pieces: Iterable[torch.Tensor], step: int, multiple: int, unit: str) -> Iterator[torch.Tensor]:
    """Regroup pieces of any length into blocks of exactly `step` frames (the last may be shorter)."""
    buffer: list[torch.Tensor] = []
    buffered = 0
    for piece in pieces:
        buffer.append(piece)
        buffered += piece.shape[2]
        while buffered >= step:
            joined = torch.cat(buffer, dim=2)
            yield joined[:, :, :step]
            rest = joined[:, :, step:]
            buffer, buffered = ([rest] if rest.shape[2] else []), rest.shape[2]
    if buffered:
        if buffered % multiple:
            raise InputError(f"the stream ended after a remainder of {buffered} {unit}, not a multiple of {multiple}")
        yield torch.cat(buffer, dim=2)


# ---- spatial tiling --------------------------------------------------------------------------
class _SpatialTiler:
    """Apply `net` to a [B, C, T, H, W] block, optionally in overlapping spatial tiles.

    Keeps one streaming cache per spatial tile position across calls when `stream` is set.
    `ratio` is output pixels per input pixel (1/f for the encoder, f for the decoder).
    """

    def __init__(self, net: Net, tile: int | None, multiple: int, ratio: float, stream: bool):
        self.net, self.tile, self.multiple, self.ratio = net, tile, multiple, ratio
        self.caches: dict[tuple[int, int], dict] | None = {} if stream else None
        if tile is not None and (tile <= 0 or tile % multiple):
            raise InputError(f"tile_size must be a positive multiple of {multiple}, got {tile}")
        if tile is not None and (tile // 4) // multiple * multiple == 0:  # tiles would not overlap: seams
            px = multiple * 4 if ratio < 1 else 4
            unit = "pixels" if ratio < 1 else "latent pixels (decode tile_size / the spatial compression)"
            raise InputError(f"tile_size {tile} is too small to blend: tiles overlap by a quarter of a tile, at least "
                             f"one latent pixel, so the tile must be at least {px} {unit}")

    def _cache(self, key: tuple[int, int]) -> dict | None:
        return None if self.caches is None else self.caches.setdefault(key, {})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.tile is None or (h <= self.tile and w <= self.tile):
            return self.net(x, self._cache((0, 0)))
        overlap = (self.tile // 4) // self.multiple * self.multiple
        rows, cols = _starts(h, self.tile, overlap), _starts(w, self.tile, overlap)
        out = weight = None
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                y = self.net(x[..., r : r + self.tile, c : c + self.tile], self._cache((i, j)))
                if out is None:
                    shape = (*y.shape[:3], round(h * self.ratio), round(w * self.ratio))
                    out = y.new_zeros(shape, dtype=torch.float32)
                    weight = y.new_zeros(shape[-2:], dtype=torch.float32)
                ro, co, ov = round(r * self.ratio), round(c * self.ratio), round(overlap * self.ratio)
                ramp = (
                    _ramp(y.shape[-2], ov, r > 0, r + self.tile < h)[:, None]
                    * _ramp(y.shape[-1], ov, c > 0, c + self.tile < w)[None, :]
                ).to(y.device)
                out[..., ro : ro + y.shape[-2], co : co + y.shape[-1]] += y.float() * ramp
                weight[ro : ro + y.shape[-2], co : co + y.shape[-1]] += ramp
        return (out / weight).to(y.dtype)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, left: bool, right: bool) -> torch.Tensor:
    """Blend weights along one axis: rising over `overlap` on sides with a neighbour, 1 elsewhere."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if left:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if right:
            w[n - overlap :] = torch.minimum(w[n - overlap :], ramp.flip(0))
    return w
