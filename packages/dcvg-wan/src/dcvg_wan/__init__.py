"""Wan-2.1 text-to-video and image-to-video on DC-AE-V.

    from dcvg_wan import WanModel
    model = WanModel.from_pretrained("Wan2.1-T2V-1.3B")          # official, diffusers or ComfyUI
    v = model(x, t, context)            # x [B, 16, F, H, W], t [B], context [B, L, 4096]

Done so far: the DiT (config, presets, layouts, checkpoints). The Wan VAE, the encoders,
sampling and pipelines are tracked in the dcvg-wan issue.
"""

from dcvg_wan.__about__ import __version__
from dcvg_wan.config import PRESETS, WanConfig, get_preset
from dcvg_wan.errors import CheckpointError, InputError, WanError
from dcvg_wan.model import WanModel

__all__ = [
    "WanModel",
    "WanConfig",
    "PRESETS",
    "get_preset",
    "WanError",
    "InputError",
    "CheckpointError",
    "__version__",
]
