"""CLIP ViT-H/14 image encoder (Wan-2.1 I2V) through transformers' CLIP vision model.

Weights come from the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (its
`visual.*` tower, converted here; the XLM-RoBERTa text tower `textual.*` and `log_scale` are not
needed for I2V and are skipped), a diffusers/transformers `image_encoder/` directory, or a single
file in transformers' names (e.g. ComfyUI's `clip_vision_h.safetensors`).

Official behaviour reproduced (`wan/modules/clip.py` `CLIPModel.visual`): images in [-1, 1] are
resized with bicubic interpolation to exactly 224 x 224 (squashed, not cropped), mapped to [0, 1],
normalised with the CLIP mean/std, and the features are the tokens after all blocks but the last
(`use_31_block=True`), without the post-norm: [B, 257, 1280].

NVIDIA's DC-VideoGen I2V (DC-Gen `pipeline_dc_videogen.py`) preprocesses otherwise, and
`preprocessing="center-crop"` reproduces it: transformers' `CLIPImageProcessor` with
`size={"shortest_edge": 224}`, `crop_size` 224 x 224, bicubic (resample=3), i.e. the 8-bit image
resized so that its shorter edge is 224 (the longer one int(224 * long / short)), then the central
224 x 224, then /255 and the CLIP mean/std.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dcvg_wan.encoder_files import (
    cast,
    load_strict,
    locate_weights,
    read_weights,
    strip_prefix,
)
from dcvg_wan.errors import CheckpointError, InputError

OFFICIAL_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SKIPPED = ("textual.", "log_scale")  # the text tower of the official file, unused for I2V


@dataclass(frozen=True, kw_only=True)
class ImageEncoderConfig:
    """Architecture of a CLIP vision tower (pre-norm ViT with a class token)."""

    image_size: int
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    projection_dim: int | None = None  # the pooled-token projection (`head`); unused by Wan
    eps: float = 1e-5
    activation: str = "gelu"  # exact GELU in ViT-H/14 (not quick_gelu)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not value > 0:
                raise ValueError(f"{f.name} must be positive, got {value}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def num_tokens(self) -> int:
        """Class token + patches: 257 for ViT-H/14 at 224 px."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_hf(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp_dim,
            projection_dim=self.projection_dim or self.width,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_channels=3,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.activation,
            layer_norm_eps=self.eps,
            attention_dropout=0.0,
        )

    @classmethod
    def from_hf(cls, c: CLIPVisionConfig, *, with_projection: bool) -> ImageEncoderConfig:
        return cls(
            image_size=c.image_size,
            patch_size=c.patch_size,
            width=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            mlp_dim=c.intermediate_size,
            projection_dim=c.projection_dim if with_projection else None,
            eps=c.layer_norm_eps,
            activation=c.hidden_act,
        )


IMAGE_PRESETS: dict[str, ImageEncoderConfig] = {
    "vit-h-14": ImageEncoderConfig(
        image_size=224, patch_size=14, width=1280, num_layers=32, num_heads=16, mlp_dim=5120, projection_dim=1024
    ),
    "debug": ImageEncoderConfig(
        image_size=28, patch_size=7, width=32, num_layers=3, num_heads=4, mlp_dim=64, projection_dim=16
    ),
}


def build_image_model(config: ImageEncoderConfig | str) -> CLIPVisionModelWithProjection:
    """An untrained tower; instant under meta. Without a projection in the config the projection
    layer is an Identity (files such as ComfyUI's clip_vision_h may omit it; Wan never uses it)."""
    config = _config(config)
    model = CLIPVisionModelWithProjection(config.to_hf())
    if not config.projection_dim:
        model.visual_projection = torch.nn.Identity()
    return model.eval()


def _config(config: ImageEncoderConfig | str) -> ImageEncoderConfig:
    if isinstance(config, ImageEncoderConfig):
        return config
    if config not in IMAGE_PRESETS:
        raise ValueError(f"unknown image encoder preset {config!r}; valid: {', '.join(IMAGE_PRESETS)}")
    return IMAGE_PRESETS[config]


# ---- official (open-clip as re-implemented by Wan) <-> transformers key names ------------------------
_V, _HF = "visual.", "vision_model."
_BARE = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")
_TOP = {
    "visual.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",  # no bias (pre-norm ViT)
    "visual.pre_norm.weight": "vision_model.pre_layrnorm.weight",  # transformers' spelling
    "visual.pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "visual.post_norm.weight": "vision_model.post_layernorm.weight",
    "visual.post_norm.bias": "vision_model.post_layernorm.bias",
}
_BLOCK = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_OFFICIAL_BLOCK = re.compile(r"^visual\.transformer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")  # to_qkv rows: [q | k | v]
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def clip_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `visual.*` names -> transformers names; the text tower is dropped, unknown keys kept."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_SKIPPED):
            continue
        m = _OFFICIAL_BLOCK.match(k)
        if m and m[2] == "attn.to_qkv":
            for name, part in zip(_QKV, v.chunk(3, dim=0), strict=True):
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}.{m[3]}"] = part
        elif m and m[2] in _BLOCK:
            out[f"vision_model.encoder.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"] = v
        elif k == "visual.cls_embedding":  # [1, 1, W] -> [W]
            out["vision_model.embeddings.class_embedding"] = v.reshape(-1)
        elif k == "visual.pos_embedding":  # [1, N, W] -> [N, W]
            out["vision_model.embeddings.position_embedding.weight"] = v.reshape(v.shape[-2], v.shape[-1])
        elif k == "visual.head":  # open-clip multiplies x @ head: [W, P] -> Linear weight [P, W]
            out["visual_projection.weight"] = v.t()
        else:
            out[_TOP.get(k, k)] = v
    return out


def clip_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers names -> official `visual.*` names (the inverse of `clip_from_official`)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _HF_BLOCK.match(k)
        if m and m[2].startswith("self_attn.") and m[2].removeprefix("self_attn.") in _QKV:
            qkv.setdefault((m[1], m[3]), {})[m[2].removeprefix("self_attn.")] = v
        elif m and m[2] in _BLOCK_INV:
            out[f"visual.transformer.{m[1]}.{_BLOCK_INV[m[2]]}.{m[3]}"] = v
        elif k == "vision_model.embeddings.class_embedding":
            out["visual.cls_embedding"] = v.reshape(1, 1, -1)
        elif k == "vision_model.embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = v.unsqueeze(0)
        elif k == "visual_projection.weight":
            out["visual.head"] = v.t()
        else:
            out[_TOP_INV.get(k, k)] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise CheckpointError(f"layer {layer}: q/k/v {kind} incomplete ({sorted(parts)}); cannot fuse to_qkv")
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts[n] for n in _QKV])
    return out


def clip_layout(keys: Sequence[str]) -> str:
    if any(k.startswith(_V) for k in keys):
        return "official"
    if any(k.startswith(_HF) for k in keys):
        return "transformers"
    if any(k.startswith(_BARE) for k in keys):  # transformers 5 `CLIPVisionModel.save_pretrained`
        return "transformers (no prefix)"
    raise CheckpointError(
        f"not a CLIP vision tower: no official (visual.*) or transformers (vision_model.*, embeddings.*) key names; "
        f"{len(keys)} keys, e.g. {sorted(keys)[:5]}"
    )


def config_from_shapes(sd: Mapping[str, torch.Tensor]) -> ImageEncoderConfig:
    """Architecture of a transformers-named tower. Head count is not stored: taken from the preset
    whose other fields match, else an error asking for config=."""
    try:
        width = sd["vision_model.embeddings.class_embedding"].shape[0]
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        mlp = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"cannot read the CLIP vision architecture from the weights: key {e} is missing"
        ) from None
    proj = sd.get("visual_projection.weight")
    fields: dict[str, Any] = {
        "image_size": math.isqrt(positions - 1) * patch,
        "patch_size": patch,
        "width": width,
        "num_layers": 1 + max(int(m[1]) for k in sd if (m := _HF_BLOCK.match(k))),
        "mlp_dim": mlp,
        "projection_dim": None if proj is None else proj.shape[0],
    }
    for preset in IMAGE_PRESETS.values():
        if all(getattr(preset, k) == v for k, v in fields.items()):
            return preset
        if all(getattr(preset, k) == v for k, v in fields.items() if k != "projection_dim"):
            return dataclasses.replace(preset, projection_dim=fields["projection_dim"])
    raise CheckpointError(
        f"CLIP vision weights of an unknown architecture {fields}: the head count is not stored in the weights; "
        f"pass config= (an ImageEncoderConfig) or use a directory with config.json"
    )


# ---- loading -----------------------------------------------------------------------------------
def load_image_model(
    path: str | os.PathLike,
    *,
    config: ImageEncoderConfig | str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> CLIPVisionModelWithProjection:
    """A transformers CLIP vision model from any supported layout, checked strictly."""
    path = Path(path)
    files, json_dir = _locate_weights(path)
    sd = strip_prefix(read_weights(files), ("module.", "model."))  # .pth files are memory-mapped
    layout = clip_layout(list(sd))
    if layout == "official":
        sd = clip_from_official(sd)  # drops the text tower before anything is cast or copied
    elif layout == "transformers (no prefix)":
        sd = {_HF + k if k.startswith(_BARE) else k: v for k, v in sd.items()}
    sd = cast(sd, dtype)
    if config is not None:
        cfg = _config(config)
    elif json_dir is not None:
        hf = CLIPVisionConfig.from_pretrained(str(json_dir), local_files_only=True)
        cfg = ImageEncoderConfig.from_hf(hf, with_projection="visual_projection.weight" in sd)
    else:
        cfg = config_from_shapes(sd)
    return load_strict(
        lambda: build_image_model(cfg), sd, what=f"CLIP vision tower {cfg}", path=path, layout=layout, device=device
    )


def _locate_weights(path: Path) -> tuple[list[Path], Path | None]:
    return locate_weights(path, what="CLIP image encoder weights", subfolder="image_encoder", official_file=OFFICIAL_FILE,
                          official_dir="official Wan2.1 I2V checkpoint directory")


# ---- preprocessing ---------------------------------------------------------------------------
def _as_signed(image: Any) -> torch.Tensor:
    """One image -> float [1, 3, H, W] in [-1, 1]. Tensors must already be in [-1, 1] (Wan's
    convention); PIL images and uint8 HWC arrays are converted."""
    if isinstance(image, torch.Tensor):
        x = image.float()
    else:
        if hasattr(image, "convert"):  # PIL.Image, without importing PIL
            image = image.convert("RGB")
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(f"expected an RGB image (uint8 H x W x 3), got dtype {arr.dtype} shape {arr.shape}")
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"expected image tensors [3, H, W] or [B, 3, H, W], got shape {tuple(x.shape)}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1.001 or hi > 1.001:
        raise InputError(f"image values must lie in [-1, 1] (Wan's convention), got [{lo:.3g}, {hi:.3g}]")
    return x


PREPROCESSING = ("wan", "center-crop")


def _as_uint8(image: Any) -> torch.Tensor:
    """One image -> uint8 [1, 3, H, W] (tensors in [-1, 1] are rounded to the nearest 8-bit level)."""
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        x = image if image.ndim == 4 else image.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected uint8 image tensors [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
        return x.cpu()
    signed = _as_signed(image)
    return ((signed.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def preprocess_center_crop(images: Any, size: int) -> torch.Tensor:
    """Images -> normalised [B, 3, size, size] float32 as transformers' `CLIPImageProcessor`
    configured by NVIDIA (shortest edge `size`, PIL bicubic, center crop `size`, /255, CLIP mean/std)."""
    from dcvg_wan.pil_resize import pil_resize

    items = list(images) if isinstance(images, list | tuple) else [images]
    out = []
    for im in items:
        for x in _as_uint8(im):
            h, w = x.shape[-2:]
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(size * long / short)
            new_h, new_w = (new_long, size) if w <= h else (size, new_long)
            if (new_h, new_w) != (h, w):
                x = pil_resize(x, new_h, new_w)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            out.append(x[:, top : top + size, left : left + size].float() / 255)
    x = torch.stack(out)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(images: Any, size: int) -> torch.Tensor:
    """Images -> normalised [B, 3, size, size] float32: bicubic squash to size x size (each image on
    its own, as official), [-1, 1] -> [0, 1], CLIP mean/std."""
    items = list(images) if isinstance(images, list | tuple) else [images]
    x = torch.cat(
        [F.interpolate(_as_signed(im), size=(size, size), mode="bicubic", align_corners=False) for im in items]
    )
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


class ImageEncoder:
    """Images -> CLIP features [B, num_tokens, width] from the penultimate block (Wan I2V `clip_fea`)."""

    def __init__(self, model: CLIPVisionModelWithProjection, *, preprocessing: str = "wan"):
        """preprocessing: "wan" (official Wan2.1: squash to 224 x 224) or "center-crop" (NVIDIA's
        DC-VideoGen I2V: shortest edge 224, then the central 224 x 224)."""
        if preprocessing not in PREPROCESSING:
            raise InputError(f"unknown CLIP preprocessing {preprocessing!r}; choose one of {', '.join(PREPROCESSING)}")
        self.model = model
        self.preprocessing = preprocessing
        self.config = ImageEncoderConfig.from_hf(
            model.config, with_projection=isinstance(model.visual_projection, torch.nn.Linear)
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: ImageEncoderConfig | str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        preprocessing: str = "wan",
    ) -> ImageEncoder:
        """path: official .pth, transformers/diffusers directory, or a Wan/diffusers checkpoint root.
        dtype: cast while loading (default: as stored). preprocessing: see `__init__`."""
        return cls(load_image_model(path, config=config, dtype=dtype, device=device), preprocessing=preprocessing)

    @property
    def device(self) -> torch.device:
        return self.model.vision_model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.model.to(device)
        return self

    def preprocess(self, images: Any) -> torch.Tensor:
        if self.preprocessing == "center-crop":
            return preprocess_center_crop(images, self.config.image_size)
        return preprocess(images, self.config.image_size)

    @torch.no_grad()
    def encode(self, images: Any) -> torch.Tensor:
        """images: a [B, 3, H, W] or [3, H, W] tensor in [-1, 1], or a list of those / PIL images /
        uint8 arrays. Returns [B, num_tokens, width] in the model's dtype."""
        pixels = self.preprocess(images).to(self.device, self.dtype)
        out = self.model.vision_model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]  # after all blocks but the last, no post-norm (official use_31_block)
