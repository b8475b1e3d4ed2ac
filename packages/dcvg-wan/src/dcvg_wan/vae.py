"""The Wan-2.1 VAE (f8t4c16): causal 3D convolutions run chunk by chunk with a feature cache.

Module names and nesting are those of the official wan/modules/vae.py, so `Wan2.1_VAE.pth` loads
as is. Every temporal convolution is causal (padded on the past side only); the official code
feeds the encoder the first frame alone and then groups of 4 frames, and the decoder one latent
frame at a time, each convolution keeping the last 2 frames it saw in a cache. That is exact,
so memory does not grow with the clip length. Two layers are not plain causal convolutions and
follow the official code literally: a temporal downsample passes the first frame through and
then maps (previous frame, 2 new frames) to one; a temporal upsample passes the first latent
frame through and then turns each frame into two (channel halves of a causal conv whose history
starts at that second frame).

Configs with another temporal compression are encoded in groups of that many frames (the
official code always takes 4, which drops frames when the compression is 2).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcvg_wan.errors import InputError
from dcvg_wan.vae_config import WanVAEConfig, get_vae_preset, vae_preset_names
from dcvg_wan.vae_tiling import TileSpec, stitch, tile_starts

CACHE_T = 2  # frames of history a causal 3x3x3 convolution needs
Cache = dict  # module -> its streaming state; one per encode or decode call


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding (2 x `padding[0]` frames) is all on the past side. Given a
    cache, the frames seen in earlier calls replace that zero padding."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__(cin, cout, kernel_size, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_pad, self.space_pad = 2 * pt, (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        past_len = 0
        if self.causal_pad and cache is not None:
            past = cache.get(self)
            if past is not None:
                x, past_len = torch.cat([past, x], 2), past.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()  # clone: a view would keep the whole chunk alive
        return super().forward(F.pad(x, (*self.space_pad, self.causal_pad - past_len, 0)))


class RMSNorm(nn.Module):
    """Official `RMS_norm`: L2-normalise over channels, times sqrt(C) and a per-channel gamma.
    The normalisation runs in float32 (the official code relies on autocast for that)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).type_as(x) * self.scale * self.gamma


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x in float32 (the official bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial 2x up/down (a 2D conv per frame), with a temporal 2x for the *3d modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right/bottom by one so a stride-2 3x3 conv halves even sizes exactly
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self not in cache:  # the first latent frame gives one frame (official "Rep")
            cache[self] = True
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
        return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2i from half 0, 2i+1 from half 1

    def _halve_frames(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        last = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if last is None:  # the first frame passes through
            return x
        return self.time_conv(torch.cat([last, x], 2))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(  # index layout of the official Sequential (5 = dropout)
            RMSNorm(cin, images=False), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # as official: the block starts as the identity

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # [N, 1, HW, 3C]
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


def _run(x: torch.Tensor, cache: Cache, conv1, blocks, head) -> torch.Tensor:
    x = conv1(x, cache)
    for block in blocks:
        x = block(x, cache)
    return head[2](head[1](head[0](x)), cache)


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)  # mean and log-variance

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return _run(x, cache, self.conv1, [*self.downsamples, *self.middle], self.head)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            cin = cin // 2 if i > 0 else cin  # each upsample's 2D conv halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return _run(x, cache, self.conv1, [*self.middle, *self.upsamples], self.head)


class WanVAE(nn.Module):
    """Wan-2.1 VAE. `encode(x)`: video [B, 3, 1 + 4k, H, W] in [-1, 1] (H, W multiples of 8) ->
    normalised latent [B, 16, 1 + k, H/8, W/8] = (mu - mean) / std; `decode(z)` inverts it
    (output clamped to [-1, 1]). Both return float32 whatever the weight dtype. Run them under
    torch.no_grad() (or inference_mode) for constant memory in the clip length.
    """

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # diffusers quant_conv
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)  # diffusers post_quant_conv
        self.decoder = Decoder3d(config)
        self.tiling: TileSpec | None = None

    # ---- spatial tiling (diffusers' enable_tiling) --------------------------------------------
    def enable_tiling(self, tile_sample_min_height: int = 256, tile_sample_min_width: int = 256,
                      tile_sample_stride_height: int = 192, tile_sample_stride_width: int = 192) -> None:
        """Encode/decode frames larger than a tile as overlapping tiles blended together (same
        arguments, defaults and result as diffusers' AutoencoderKLWan.enable_tiling): bounds the
        activation memory by the tile size instead of the frame size. Exact it is not: tiles
        see zero padding at their borders, which the blending hides but does not undo."""
        self.tiling = TileSpec(tile_sample_min_height, tile_sample_min_width, tile_sample_stride_height,
                               tile_sample_stride_width).check(self.spatial_compression)

    def disable_tiling(self) -> None:
        self.tiling = None

    # ---- construction and checkpoints ------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, device: Any = None, dtype: torch.dtype | None = None, **overrides: Any) -> WanVAE:
        """A freshly initialised VAE of a named preset ("wan2.1-vae", "debug"), with config overrides."""
        with torch.device(device or "cpu"):
            model = cls(get_vae_preset(name, **overrides))
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> WanVAE:
        """Load `Wan2.1_VAE.pth`, a diffusers `vae/` directory, a ComfyUI file or our own directory
        (layout detected; see `dcvg_wan.vae_checkpoint.load_wan_vae` for the keyword arguments)."""
        from dcvg_wan.vae_checkpoint import load_wan_vae

        return load_wan_vae(path, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """config.json + diffusion_pytorch_model.safetensors, official or diffusers layout."""
        from dcvg_wan.vae_checkpoint import save_wan_vae

        save_wan_vae(self, directory, **kwargs)

    # ---- facts -----------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def preset_names(self) -> tuple[str, ...]:
        return tuple(vae_preset_names(self.config))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a valid clip of this size."""
        self._check_size(frames, height, width)
        s = self.spatial_compression
        return self.latent_channels, 1 + (frames - 1) // self.temporal_compression, height // s, width // s

    # ---- latent statistics -----------------------------------------------------------------
    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=z.device)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=z.device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean -> the latent the DiT sees: (mu - mean) * (1 / std), in float32 (official)."""
        mean, inv_std = self._stats(mu)
        return (mu.float() - mean) * inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`, written as the official decode does: z / (1 / std) + mean."""
        mean, inv_std = self._stats(z)
        return z.float() / inv_std + mean

    # ---- encode / decode -------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the posterior, unnormalised, in float32 (diffusers' latent_dist mean/logvar)."""
        x = self._check_video(x)
        spec = self.tiling
        height, width = x.shape[3:]
        if spec is None or (height <= spec.min_height and width <= spec.min_width):
            moments = self._encode_tile(x)
        else:
            s = self.spatial_compression
            (th, tw), (sh, sw) = spec.size(), spec.stride()
            grid = [[self._encode_tile(x[..., i : i + th, j : j + tw]) for j in tile_starts(width, sw)]
                    for i in tile_starts(height, sh)]
            moments = stitch(grid, spec.blend(s), spec.stride(s), (height // s, width // s))
        mu, logvar = moments.float().chunk(2, dim=1)
        return mu, logvar

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior moments [B, 2 z_dim, T', h, w] of a (tile of a) video, chunk by chunk."""
        cache: Cache = {}
        tc = self.temporal_compression
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tc] for i in range(1, x.shape[2], tc)]
        return self.conv1(torch.cat([self.encoder(chunk, cache) for chunk in chunks], 2))

    def encode(self, x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> latent [B, z_dim, 1 + k, H/8, W/8] (the posterior
        mean; normalised unless normalize=False)."""
        mu, _ = self.encode_moments(x)
        return self.normalize(mu) if normalize else mu

    def decode(self, z: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """Latent [B, z_dim, T', H', W'] -> video [B, 3, 1 + 4(T' - 1), 8H', 8W'] in [-1, 1], float32."""
        return torch.cat(list(self.decode_frames(z, normalized=normalized)), 2)

    def decode_frames(self, z: torch.Tensor, *, normalized: bool = True) -> Iterator[torch.Tensor]:
        """Stream the decoded video: one latent frame at a time, yielding [B, 3, 1, H, W] for the
        first and [B, 3, 4, H, W] for each later one. Peak memory does not depend on T'."""
        return self._decode_frames(self._check_latent(z), normalized, {})

    def _decode_frames(self, z: torch.Tensor, normalized: bool, cache: Cache) -> Iterator[torch.Tensor]:
        spec, s = self.tiling, self.spatial_compression
        height, width = z.shape[3:]
        tiled = spec is not None and (height > spec.size(s)[0] or width > spec.size(s)[1])
        if tiled:  # one streaming cache per tile; each latent frame is decoded tile by tile, then stitched
            (lh, lw), (sh, sw) = spec.size(s), spec.stride(s)
            boxes = [[(i, j) for j in tile_starts(width, sw)] for i in tile_starts(height, sh)]
            caches = {box: {} for row in boxes for box in row}
        for t in range(z.shape[2]):
            zi = z[:, :, t : t + 1]
            zi = self.conv2((self.denormalize(zi) if normalized else zi).to(self.dtype))
            if not tiled:
                yield self.decoder(zi, cache).float().clamp_(-1.0, 1.0)
                continue
            grid = [[self.decoder(zi[..., i : i + lh, j : j + lw], caches[(i, j)]).float() for i, j in row]
                    for row in boxes]
            yield stitch(grid, spec.blend(), spec.stride(), (height * s, width * s)).clamp_(-1.0, 1.0)

    # ---- input checks ----------------------------------------------------------------------
    def _check_size(self, frames: int, height: int, width: int) -> None:
        tc, s = self.temporal_compression, self.spatial_compression
        if frames < 1 or (frames - 1) % tc:
            below = 1 + (max(frames, 1) - 1) // tc * tc
            raise InputError(
                f"the Wan VAE takes 1 + {tc}k frames (1, {1 + tc}, {1 + 2 * tc}, ..., 81), got {frames}; "
                f"use {below} or {below + tc} frames"
            )
        if height < 1 or width < 1 or height % s or width % s:
            raise InputError(f"frame size {height}x{width} (HxW) must be non-zero multiples of {s}")

    def _check_video(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor(x, "a video tensor [B, 3, T, H, W]")
        if x.ndim != 5 or x.shape[1] != 3:
            raise InputError(f"expected a video tensor [B, 3, T, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"expected float pixels in [-1, 1], got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise InputError(f"the batch is empty (shape {tuple(x.shape)})")
        self._check_size(*x.shape[2:])
        _check_finite(x, "input video")
        return x.to(self.dtype)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        c = self.latent_channels
        _check_tensor(z, f"a latent tensor [B, {c}, T, H, W]")
        if z.ndim != 5 or z.shape[1] != c:
            raise InputError(f"expected a Wan VAE latent [B, {c}, T, H, W], got shape {tuple(z.shape)}")
        if 0 in z.shape:
            raise InputError(f"latent has an empty dimension: shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise InputError(f"expected a float latent, got dtype {z.dtype}")
        _check_finite(z, "latent")
        return z


def _check_tensor(x: Any, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected {expected} as a torch.Tensor, got {type(x).__name__}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"{what} contains {n} NaN/Inf value(s)")
