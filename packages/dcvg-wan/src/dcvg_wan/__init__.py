"""Wan-2.1 text-to-video and image-to-video on DC-AE-V.

    from dcvg_wan import WanModel
    model = WanModel.from_pretrained("Wan2.1-T2V-1.3B")          # official, diffusers or ComfyUI
    v = model(x, t, context)            # x [B, 16, F, H, W], t [B], context [B, L, 4096]

    from dcvg_wan.pipelines import T2VPipeline
    pipe = T2VPipeline.from_pretrained("Wan2.1-T2V-1.3B", task="t2v-1.3B")    # or ae="dcae-v"
    pipe("a cat surfing", size="832*480", seed=42).save("cat.mp4")

Parts: the DiT (`model`), the Wan VAE (`vae`), umT5 and CLIP (`text_encoder`, `image_encoder`),
flow-matching solvers (`sampling`), the pipelines over either latent space (`pipelines`,
`latent_spaces`), Ulysses sequence parallelism (`parallel`), the cost model (`cost`).
"""

from dcvg_wan.__about__ import __version__
from dcvg_wan.config import PRESETS, WanConfig, get_preset
from dcvg_wan.errors import CheckpointError, InputError, WanError
from dcvg_wan.model import WanModel
from dcvg_wan.vae import WanVAE
from dcvg_wan.vae_config import VAE_PRESETS, WanVAEConfig, get_vae_preset

__all__ = [
    "IMAGE_PRESETS",
    "PRESETS",
    "TEXT_PRESETS",
    "VAE_PRESETS",
    "CheckpointError",
    "ImageEncoder",
    "ImageEncoderConfig",
    "InputError",
    "TextEncoder",
    "TextEncoderConfig",
    "WanConfig",
    "WanError",
    "WanModel",
    "WanVAE",
    "WanVAEConfig",
    "__version__",
    "get_preset",
    "get_vae_preset",
    "pad_context",
]

# The encoders pull in transformers (~3 s), so they are imported on first use.
_LAZY = {name: "dcvg_wan.text_encoder" for name in ("TextEncoder", "TextEncoderConfig", "TEXT_PRESETS", "pad_context")}
_LAZY |= {name: "dcvg_wan.image_encoder" for name in ("ImageEncoder", "ImageEncoderConfig", "IMAGE_PRESETS")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcvg_wan' has no attribute {name!r}")
