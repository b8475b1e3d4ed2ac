"""Wan-2.1 DiT hyper-parameters: one frozen dataclass and a registry of named presets.

Field names follow the official `WanModel` (wan/modules/model.py), so an official config.json
maps one to one; `patch` is the official `patch_size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from dcvg_wan.errors import InputError

# Fields that do not change any key or shape: ignored when matching weights to a preset.
RUNTIME_FIELDS = ("text_len", "eps")
_POSITIVE = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len")


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Architecture of a Wan-2.1 DiT. T2V when `image_dim` is None, I2V (CLIP image
    cross-attention) otherwise, FLF2V when `flf_pos_len` is also set."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int  # channels entering the patch embedder (noise + I2V conditioning y)
    out_dim: int
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    text_dim: int = 4096  # umT5-xxl width
    freq_dim: int = 256  # sinusoidal timestep features
    text_len: int = 512  # text rows the DiT attends to; shorter context is zero-padded
    eps: float = 1e-6  # LayerNorm and q/k RMSNorm
    cross_attn_norm: bool = True  # affine LayerNorm `norm3` before cross-attention
    qk_norm: bool = True  # RMSNorm over the whole dim on q and k
    image_dim: int | None = None  # CLIP ViT-H/14 feature width (1280) for I2V/FLF2V
    flf_pos_len: int | None = None  # FLF2V: learned positions over first+last CLIP tokens (514)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if len(self.patch) != 3:
            raise ValueError(f"patch must have 3 entries (t, h, w), got {self.patch}")
        for name in _POSITIVE:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if min(self.patch) < 1:
            raise ValueError(f"patch entries must be positive, got {self.patch}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        hd = self.head_dim
        if hd % 2 or hd < 6:
            raise ValueError(
                f"head_dim={hd} (dim {self.dim} / {self.num_heads} heads) must be even and >= 6: 3D RoPE splits it "
                f"into t/h/w parts of head_dim - 4*(head_dim//6), 2*(head_dim//6), 2*(head_dim//6) channels"
            )
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.image_dim is not None and self.image_dim < 1:
            raise ValueError(f"image_dim must be a positive integer or None (T2V), got {self.image_dim}")
        if self.flf_pos_len is not None and (self.image_dim is None or self.flf_pos_len < 1):
            raise ValueError(f"flf_pos_len={self.flf_pos_len} needs an image path (image_dim) and a positive length")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        """The official `model_type`: "t2v", "i2v" or "flf2v"."""
        if self.image_dim is None:
            return "t2v"
        return "i2v" if self.flf_pos_len is None else "flf2v"

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    # ---- (de)serialisation -----------------------------------------------------------------
    def replace(self, **overrides: Any) -> WanConfig:
        names = [f.name for f in dataclasses.fields(self)]
        unknown = set(overrides) - set(names)
        if unknown:
            raise ValueError(f"unknown WanConfig field(s) {sorted(unknown)}; valid: {names}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown WanConfig field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16)
_I2V_14B = _T2V_14B.replace(in_dim=36, image_dim=1280)  # in = noise 16 + mask 4 + image latent 16
_DEBUG_T2V = WanConfig(
    dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=32, freq_dim=16, text_len=16
)

PRESETS: dict[str, WanConfig] = {
    "t2v-1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16),
    "t2v-14B": _T2V_14B,
    # 480P and 720P I2V share the architecture; only the weights (and sampling defaults) differ.
    "i2v-14B-480p": _I2V_14B,
    "i2v-14B-720p": _I2V_14B,
    # FLF2V-14B-720P: the I2V-14B architecture plus learned positions over the first- and last-frame
    # CLIP tokens (official wan/configs: flf2v_14B = i2v_14B; model_type "flf2v": img_emb.emb_pos [1, 514, 1280]).
    "flf2v-14B": _I2V_14B.replace(flf_pos_len=514),
    # DC-VideoGen (DC-AE-V f32t4c32 latents): same blocks, new patch embedder and head. Patch
    # (1,1,1) is read from the paper's Table 2 and in_dim 68 = noise 32 + mask 4 + image chunk 32
    # is derived; neither is confirmed by NVIDIA's released config (wan21.md "Not established").
    "dcvg-t2v-14B": _T2V_14B.replace(patch=(1, 1, 1), in_dim=32, out_dim=32),
    "dcvg-i2v-14B": _I2V_14B.replace(patch=(1, 1, 1), in_dim=68, out_dim=32),
    # Same code at toy size, for tests. debug-i2v keeps text_len 512 because diffusers'
    # WanTransformer3DModel hard-codes 512 text rows when splitting image from text context.
    "debug-t2v": _DEBUG_T2V,
    "debug-i2v": _DEBUG_T2V.replace(in_dim=12, image_dim=16, text_len=512),
}


def get_preset(name: str, **overrides: Any) -> WanConfig:
    if name not in PRESETS:
        raise InputError(f"unknown Wan preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def architecture(config: WanConfig) -> dict[str, Any]:
    """The fields that fix keys and shapes (num_heads included: it changes no shape, but the maths)."""
    return {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}


def preset_names(config: WanConfig) -> list[str]:
    """Names of the presets with exactly this architecture (both I2V-14B names for one)."""
    arch = architecture(config)
    return [name for name, preset in PRESETS.items() if architecture(preset) == arch]
