"""Wan-2.1 VAE hyper-parameters: one frozen dataclass and its named presets.

Field names follow the official `WanVAE_` (wan/modules/vae.py), `temperal_downsample` spelling
included; `latents_mean`/`latents_std` are diffusers' names for the 16 per-channel statistics the
official `WanVAE` wrapper hard-codes. The official model has no attention outside the middle
blocks (`attn_scales=[]`) and 3 RGB channels; neither is a field here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Per-channel statistics of the f8t4c16 latent (official WanVAE; diffusers AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """Architecture of a Wan-2.1 causal video VAE (encoder, 1x1x1 quant convs, decoder)."""

    dim: int  # base width (diffusers `base_dim`); stage i has dim * dim_mult[i] channels
    z_dim: int  # latent channels
    dim_mult: tuple[int, ...]
    num_res_blocks: int  # per encoder stage; the decoder has one more
    temperal_downsample: tuple[bool, ...]  # per encoder downsample; the decoder upsamples in reverse
    latents_mean: tuple[float, ...]  # normalised latent = (mu - mean) / std, per channel
    latents_std: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        for name in ("dim", "z_dim", "num_res_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if len(self.dim_mult) < 1 or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult must be non-empty positive integers, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs one entry per downsample (len(dim_mult) - 1 = {len(self.dim_mult) - 1}), "
                f"got {self.temperal_downsample}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} needs z_dim={self.z_dim} values, got {len(getattr(self, name))}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def replace(self, **overrides: Any) -> WanVAEConfig:
        names = [f.name for f in dataclasses.fields(self)]
        unknown = set(overrides) - set(names)
        if unknown:
            raise ValueError(f"unknown WanVAEConfig field(s) {sorted(unknown)}; valid: {names}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown WanVAEConfig field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


WAN21_VAE = WanVAEConfig(
    dim=96,
    z_dim=16,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    temperal_downsample=(False, True, True),
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
)

VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1-vae": WAN21_VAE,  # Wan2.1_VAE.pth, shared by every Wan-2.1 model (126.9M parameters)
    # Same code at toy size for tests: f8t4 like the real one, 4 latent channels, 8-32 wide.
    "debug": WAN21_VAE.replace(
        dim=8, z_dim=4, latents_mean=WAN21_LATENTS_MEAN[:4], latents_std=WAN21_LATENTS_STD[:4]
    ),
}


def get_vae_preset(name: str, **overrides: Any) -> WanVAEConfig:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown Wan VAE preset {name!r}; valid presets: {', '.join(VAE_PRESETS)}")
    return VAE_PRESETS[name].replace(**overrides) if overrides else VAE_PRESETS[name]


def vae_preset_names(config: WanVAEConfig) -> list[str]:
    """Presets with exactly this config."""
    return [name for name, preset in VAE_PRESETS.items() if preset == config]
