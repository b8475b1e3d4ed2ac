"""DC-AE-V: the deep-compression chunk-causal video autoencoder of DC-VideoGen.

    from dcae_v import DCAEV
    model = DCAEV.from_pretrained("dc-ae-v-f32t4c32-1.0-bf16.pt")   # NVIDIA's release
    z = model.encode(x)            # x [B, 3, T, H, W] in [-1, 1] -> [B, 32, T/4, H/32, W/32]
    y = model.decode(z)
"""

from dcae_v.__about__ import __version__
from dcae_v.config import PRESETS, DCAEVConfig, get_preset
from dcae_v.errors import CheckpointError, DCAEVError, InputError
from dcae_v.model import DCAEV

__all__ = [
    "DCAEV",
    "PRESETS",
    "CheckpointError",
    "DCAEVConfig",
    "DCAEVError",
    "InputError",
    "__version__",
    "get_preset",
]
