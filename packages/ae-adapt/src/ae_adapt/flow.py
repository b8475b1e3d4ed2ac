"""Flow matching as Wan trains it: x_t = (1 - s) x0 + s noise, the model regresses noise - x0.

The target itself comes from the model (`AdaptableDiT.flow_target`), so a DiT with another
convention plugs in; the helpers here give the Wan one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3/Wan: s' = shift s / (1 + (shift - 1) s) (shift > 1: noisier)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigma(
    batch: int, generator: torch.Generator, *, shift: float = 1.0, logit_normal: bool = False
) -> torch.Tensor:
    """[batch] noise levels in (0, 1): uniform (or logit-normal), then shifted."""
    if logit_normal:
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        sigma = torch.rand(batch, generator=generator)
    return shift_sigma(sigma, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s noise, sigma [B] broadcast over the latent dimensions."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d s = noise - x0: the Wan (rectified-flow) target."""
    return noise - x0


def diffusion_loss(
    model: Any,
    x0: torch.Tensor,
    generator: torch.Generator,
    *,
    y: torch.Tensor | None = None,
    shift: float = 1.0,
    logit_normal: bool = False,
    **cond: Any,
) -> torch.Tensor:
    """MSE between the model's prediction on x_t and `model.flow_target(x0, noise)`.

    `y` (conditioning latent, e.g. Wan I2V's mask + image chunk) is concatenated after x_t on
    channels before patch embedding; `cond` goes to `forward_from_embeddings`. Noise and sigma
    come from `generator` (CPU), so a run is reproducible whatever the device."""
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    sigma = sample_sigma(x0.shape[0], generator, shift=shift, logit_normal=logit_normal).to(x0.device)
    x_t = add_noise(x0, noise, sigma)
    if y is not None:
        x_t = torch.cat([x_t, y.to(x_t.dtype)], dim=1)
    tokens, grid = model.patch_embed(x_t)
    pred = model.forward_from_embeddings(tokens, grid, model.flow_timestep(sigma), **cond)
    return F.mse_loss(pred.float(), model.flow_target(x0, noise).float())
