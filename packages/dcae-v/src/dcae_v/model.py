"""DC-AE-V: encoder, decoder and the `DCAEV` autoencoder with its public API."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dcae_v import tiling
from dcae_v.blocks import (
    AveragingShortcut,
    ConvShuffle,
    ConvUnshuffle,
    DecoderHead,
    DuplicatingShortcut,
    ResBlockMain,
    Residual,
    Stage,
    StreamCache,
    TemporalConv3d,
)
from dcae_v.config import DCAEVConfig, get_preset
from dcae_v.errors import InputError
from dcae_v.temporal import TemporalRule


def _rules(cfg: DCAEVConfig) -> tuple[TemporalRule, TemporalRule]:
    """(rule at the input frame rate, rule at the latent frame rate)."""
    return TemporalRule(cfg.temporal, cfg.chunk_size), TemporalRule(cfg.temporal, cfg.latent_chunk_size)


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEVConfig):
        super().__init__()
        frames, latent = _rules(cfg)
        widths, last = cfg.widths, len(cfg.widths) - 1
        self.project_in = ConvUnshuffle(cfg.in_channels, widths[cfg.active_stages[0]], 2, 1, frames)
        stages = []
        for i, depth in enumerate(cfg.depths):
            rule = latent if i > cfg.temporal_stage else frames
            blocks: list[nn.Module] = [Residual(ResBlockMain(widths[i], rule)) for _ in range(depth)]
            if depth and i < last:
                s, t = cfg.resample_factors(i)
                down = ConvUnshuffle(widths[i], widths[i + 1], s, t, rule)
                blocks.append(Residual(down, AveragingShortcut(widths[i], widths[i + 1], s, t)))
            stages.append(Stage(blocks))
        self.stages = nn.ModuleList(stages)
        self.project_out = TemporalConv3d(widths[-1], cfg.latent_channels, latent)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.project_in(x, cache)
        for stage in self.stages:
            x = stage(x, cache)
        return self.project_out(x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEVConfig):
        super().__init__()
        frames, latent = _rules(cfg)
        widths, last = cfg.widths, len(cfg.widths) - 1
        self.project_in = TemporalConv3d(cfg.latent_channels, widths[-1], latent)
        stages = []
        for i, depth in enumerate(cfg.depths):
            blocks: list[nn.Module] = []
            if depth and i < last:
                s, t = cfg.resample_factors(i)
                up_rule = latent if i + 1 > cfg.temporal_stage else frames  # runs before the shuffle
                up = ConvShuffle(widths[i + 1], widths[i], s, t, up_rule)
                blocks.append(Residual(up, DuplicatingShortcut(widths[i + 1], widths[i], s, t)))
            rule = latent if i > cfg.temporal_stage else frames
            blocks += [Residual(ResBlockMain(widths[i], rule)) for _ in range(depth)]
            stages.append(Stage(blocks))
        self.stages = nn.ModuleList(stages)
        self.project_out = DecoderHead(widths[cfg.active_stages[0]], cfg.in_channels, frames)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.project_in(z, cache)
        for stage in reversed(self.stages):
            x = stage(x, cache)
        return self.project_out(x, cache)


class DCAEV(nn.Module):
    """Deep-compression chunk-causal video autoencoder.

    `encode(x)`: x float [B, 3, T, H, W] in [-1, 1], T a multiple of 4 (or 1 for an image),
    H and W multiples of f -> latent [B, c, T/4, H/f, W/f] (unscaled; multiply by
    `scaling_factor` for diffusion). `decode(z)` is the inverse, 4 frames per latent frame,
    unclamped. `reconstruct(x)` pads any clip to the model's multiples and crops back.
    """

    def __init__(self, config: DCAEVConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, device: Any = None, dtype: torch.dtype | None = None, **overrides: Any) -> DCAEV:
        """A freshly initialised model of a named preset (e.g. "f32t4c32"), with config overrides."""
        with torch.device(device or "cpu"):
            model = cls(get_preset(name, **overrides))
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> DCAEV:
        """Load NVIDIA's `.pt`, a `.safetensors` file, or a directory from `save_pretrained`.

        With no path, loads the small default checkpoint that ships with the package.
        See `dcae_v.checkpoint.load_dcaev` for the keyword arguments.
        """
        from dcae_v.checkpoint import load_dcaev

        return load_dcaev(path, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `config.json` + `model.safetensors` (atomically)."""
        from dcae_v.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    # ---- facts -----------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, frames_per_tile: int | None = None, tile_size: int | None = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> latent [B, c, T/4, H/f, W/f].

        frames_per_tile: run in temporal tiles of this many frames with the streaming cache
        (equal to one shot; a multiple of `chunk_size` in chunk_causal mode).
        tile_size: run in spatial tiles of this many pixels, blended over 1/4 overlap.
        """
        x = self._check_video(x)
        return tiling.encode(self, x, frames_per_tile, tile_size)

    def decode(self, z: torch.Tensor, frames_per_tile: int | None = None, tile_size: int | None = None) -> torch.Tensor:
        """Latent [B, c, T', H', W'] -> video [B, 3, 4T', fH', fW'] (unclamped).

        frames_per_tile and tile_size are counted in output frames and output pixels.
        """
        z = self._check_latent(z)
        return tiling.decode(self, z, frames_per_tile, tile_size)

    def encode_stream(
        self, frames: Iterable[torch.Tensor], frames_per_tile: int | None = None, tile_size: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consume video pieces [B, 3, t, H, W] (any t) and yield latent pieces, one tile at a
        time (default tile: one chunk). Memory stays constant in the video length; the total
        frame count must be a multiple of 4 (`dcae_v.io.pad_to_multiple`)."""
        pieces = (self._check_video(f, allow_image=False, allow_any_length=True) for f in frames)
        return tiling.encode_stream(self, pieces, frames_per_tile, tile_size)

    def decode_stream(
        self, latents: Iterable[torch.Tensor], frames_per_tile: int | None = None, tile_size: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consume latent pieces [B, c, t', H', W'] and yield frame pieces, one tile at a time
        (frames_per_tile counts output frames)."""
        return tiling.decode_stream(self, (self._check_latent(z) for z in latents), frames_per_tile, tile_size)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, frames_per_tile: int | None = None, tile_size: int | None = None) -> torch.Tensor:
        """Encode + decode a clip of any size: pads (replicating the last frame/row/column) to the
        model's multiples, then crops back. T == 1 returns one frame."""
        from dcae_v.io import crop_like, pad_to_multiple

        _check_tensor(x, f"a video tensor [B, {self.config.in_channels}, T, H, W]")
        if x.ndim != 5 or 0 in x.shape or x.shape[1] != self.config.in_channels:  # before padding: name the input's shape
            raise InputError(f"expected a non-empty video tensor [B, {self.config.in_channels}, T, H, W], got shape {tuple(x.shape)}")
        padded = pad_to_multiple(x, self.pad_multiples(x.shape[2]), self.spatial_compression)
        z = self.encode(padded, frames_per_tile, tile_size)
        return crop_like(self.decode(z, frames_per_tile, tile_size), x)

    def pad_multiples(self, frames: int) -> int:
        """Frame multiple a clip of `frames` frames is padded to: 1 for an image, else the chunk
        size in chunk_causal mode (so every chunk is full, as NVIDIA's reconstruct does), else 4."""
        if frames == 1:
            return 1
        return self.config.chunk_size if self.config.temporal == "chunk_causal" else self.temporal_compression

    # ---- input checks ----------------------------------------------------------------------
    def _check_video(self, x: torch.Tensor, allow_image: bool = True, allow_any_length: bool = False) -> torch.Tensor:
        _check_tensor(x, f"a video tensor [B, {self.config.in_channels}, T, H, W]")
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"expected a video tensor [B, {self.config.in_channels}, T, H, W], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise InputError(f"expected float pixels in [-1, 1], got dtype {x.dtype}; use dcae_v.io.to_model_range")
        t, h, w = x.shape[2:]
        f = self.spatial_compression
        if h % f or w % f or h == 0 or w == 0:
            raise InputError(
                f"frame size {h}x{w} is not a (non-zero) multiple of the spatial compression {f}; "
                f"pad it (dcae_v.io.pad_to_multiple) or use reconstruct()"
            )
        if t == 0:
            raise InputError(f"the video has no frames (shape {tuple(x.shape)})")
        if t == 1 and allow_image:
            x = x.expand(-1, -1, self.temporal_compression, -1, -1)  # an image is a 4-frame still clip
        elif t % self.temporal_compression and not allow_any_length:
            raise InputError(
                f"frame count {t} is not a multiple of {self.temporal_compression} (or 1 for an image); "
                f"pad it (dcae_v.io.pad_to_multiple) or use reconstruct()"
            )
        _check_finite(x, "input video", "clean the input before encoding")
        return x.to(self.dtype)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config.latent_channels
        _check_tensor(z, f"a latent tensor [B, {c}, T, H, W]")
        if z.ndim != 5:
            raise InputError(f"expected a latent tensor [B, {c}, T, H, W], got shape {tuple(z.shape)}")
        if z.shape[1] != c:
            raise InputError(
                f"latent has {z.shape[1]} channels but this {self.config.name} model decodes {c}; "
                f"was it encoded with another DC-AE-V preset?"
            )
        if 0 in z.shape[2:]:
            raise InputError(f"latent has an empty dimension: shape {tuple(z.shape)}")
        _check_finite(z, "latent", "check the latents before decoding")
        return z.to(self.dtype)


def _check_tensor(x, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected {expected} as a torch.Tensor, got {type(x).__name__}")


def _check_finite(x: torch.Tensor, what: str, advice: str) -> None:
    if not torch.isfinite(x).all():
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"{what} contains {n} NaN/Inf value(s); {advice}")
