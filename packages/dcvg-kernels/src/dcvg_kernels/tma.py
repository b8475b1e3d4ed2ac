"""What the kernels' TMA (tensor descriptor) configs share: the descriptor class where this triton
has it, whether a tensor may be read by one, and dropping the configs a launch cannot run.

Import-safe without a GPU; `interpret` is the importing module's interpreter flag (descriptors
run in the Triton interpreter too, which is how they are tested on CPU).
"""

from __future__ import annotations

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: pointer loads only
    TensorDescriptor = None


def can_use_tma(tensor: torch.Tensor, interpret: bool) -> bool:
    """Descriptors exist (triton >= 3.4) and the tensor is on Hopper or newer, or interpreted."""
    if TensorDescriptor is None:
        return False
    if interpret:
        return True
    return tensor.device.type == "cuda" and torch.cuda.get_device_capability(tensor.device)[0] >= 9


def runnable_configs(configs, nargs: dict, kwargs: dict, needs: dict[str, str]) -> list:
    """The configs a launch can run: one whose flag (a key of `needs`, e.g. "USE_TMA") is set needs
    the descriptors the launch signals with the matching argument (e.g. "TMA_OK"); an
    early_config_prune helper (triton passes the launch's constexprs in kwargs, older ones only nargs)."""
    def built(ok: str) -> bool:
        return bool(kwargs.get(ok, nargs.get(ok)))

    return [c for c in configs if all(built(ok) for flag, ok in needs.items() if c.kwargs.get(flag))]
