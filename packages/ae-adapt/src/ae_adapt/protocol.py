"""What a DiT must offer so that AE-Adapt-V can move it to a new latent space.

AE-Adapt-V only touches the two latent-facing ends of a DiT: the patch embedder (latent -> tokens)
and the output head (tokens -> latent). Everything between them (blocks, time and text embedders)
is reused as is. A model implements `AdaptableDiT` (structurally: no base class needed) and
`check_adaptable(model)` tells which member is missing.

Token order and grid are the model's own business; the only rule is that `patch_embed` returns
tokens laid out over `grid` in row-major (f, h, w) order, so that stage 1 can average-pool the base
model's tokens onto the new grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ae_adapt.errors import ProtocolError

Grid = tuple[int, ...]


@runtime_checkable
class AdaptableDiT(Protocol):
    """A DiT that AE-Adapt-V can adapt. Shapes: latent [B, C, F, H, W], tokens [B, L, D]."""

    def token_grid(self, latent_shape: Sequence[int]) -> Grid:
        """The token grid (f, h, w) the current embedder makes of a latent of this shape
        (trailing F, H, W). Raises when the shape cannot be tiled by the embedder's patch."""
        ...

    def patch_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Latent (plus channel-concatenated conditioning, e.g. Wan I2V's y) -> (tokens, grid),
        with the current patch embedder."""
        ...

    def forward_from_embeddings(self, tokens: torch.Tensor, grid: Grid, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Blocks + output head + unpatchify: tokens [B, L, D] -> prediction [B, C_out, F, H, W].
        `t` is in the model's own timestep units (see `flow_timestep`); `cond` holds the rest of
        the conditioning (text embeddings `context`, Wan I2V's `clip_fea`, ...)."""
        ...

    def get_patch_embedder(self) -> nn.Module:
        """The current patch embedder as a self-contained module: `embedder(x) -> (tokens, grid)`
        (a deep copy keeps working after the model's embedder is replaced)."""
        ...

    def replace_patch_embedder(self, in_channels: int, patch: Sequence[int]) -> nn.Module:
        """Install a freshly initialised embedder for latents with `in_channels` channels, tiled by
        `patch` (pt, ph, pw); return it. `token_grid`/`patch_embed` use it from then on."""
        ...

    def get_output_head(self) -> nn.Module:
        """The module holding every parameter of the output head (replaced together)."""
        ...

    def replace_output_head(self, out_channels: int, patch: Sequence[int]) -> nn.Module:
        """Install a freshly initialised head that predicts `out_channels` per latent position for
        tokens of `patch`; return it. `forward_from_embeddings` uses it from then on."""
        ...

    def flow_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching regression target for x_t = (1-s) x0 + s noise (Wan: noise - x0)."""
        ...

    def flow_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Noise level sigma in [0, 1] -> the `t` the model takes (Wan: 1000 * sigma)."""
        ...


REQUIRED_MEMBERS = (
    "token_grid",
    "patch_embed",
    "forward_from_embeddings",
    "get_patch_embedder",
    "replace_patch_embedder",
    "get_output_head",
    "replace_output_head",
    "flow_target",
    "flow_timestep",
)


def check_adaptable(model: Any) -> AdaptableDiT:
    """Return `model` if it is an nn.Module with every `AdaptableDiT` member, else raise
    ProtocolError naming what is missing."""
    if not isinstance(model, nn.Module):
        raise ProtocolError(f"an adaptable DiT must be a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in REQUIRED_MEMBERS if not callable(getattr(model, name, None))]
    if missing:
        raise ProtocolError(
            f"{type(model).__name__} does not implement the AE-Adapt-V protocol: missing "
            f"{', '.join(missing)} (see ae_adapt.protocol.AdaptableDiT)"
        )
    return model


def module_names(model: nn.Module, part: nn.Module) -> list[str]:
    """Qualified parameter names of `part` inside `model` (to freeze, save or compare them)."""
    ids = {id(p) for p in part.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]
