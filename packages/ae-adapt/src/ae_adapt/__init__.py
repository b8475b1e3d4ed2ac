"""AE-Adapt-V for any DiT (DC-VideoGen §3.3): move a pre-trained DiT to a new autoencoder.

    from ae_adapt import LatentCache, check_adaptable, get_preset, run_all
    cache = LatentCache("cache/", base_ae="wan-vae", new_ae="dc-ae-v-f32t4c32")
    run_all(check_adaptable(model), cache, get_preset("wan-14B"), "runs/adapt",
            in_channels=32, out_channels=32, patch=(1, 1, 1))

A model takes part through the `AdaptableDiT` protocol (see `ae_adapt.example_dit`).
"""

from ae_adapt.__about__ import __version__
from ae_adapt.cache import LatentCache, build_cache
from ae_adapt.errors import (
    AdaptError,
    CacheError,
    DivergedError,
    OutputError,
    PresetError,
    ProtocolError,
    ResumeError,
    ShapeError,
)
from ae_adapt.protocol import AdaptableDiT, check_adaptable
from ae_adapt.stages import (
    PRESETS,
    AdaptPreset,
    EmbedderAlign,
    align_embedder,
    align_head,
    get_preset,
    lora_finetune,
    restore_new_ends,
    run_all,
)
from ae_adapt.trainer import TrainConfig, Trainer

__all__ = [
    "PRESETS",
    "AdaptError",
    "AdaptPreset",
    "AdaptableDiT",
    "CacheError",
    "DivergedError",
    "EmbedderAlign",
    "LatentCache",
    "OutputError",
    "PresetError",
    "ProtocolError",
    "ResumeError",
    "ShapeError",
    "TrainConfig",
    "Trainer",
    "__version__",
    "align_embedder",
    "align_head",
    "build_cache",
    "check_adaptable",
    "get_preset",
    "lora_finetune",
    "restore_new_ends",
    "run_all",
]
