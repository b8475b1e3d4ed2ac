"""Flow matching as Wan trains it: x_t = (1 - s) x0 + s noise, the model regresses noise - x0.

The target itself comes from the model (`AdaptableDiT.flow_target`), so a DiT with another
convention plugs in; the helpers here give the Wan one.

Two ways to pick the training noise level (`timesteps=`):

- "uniform": sigma ~ U(0, 1) (or logit-normal), shifted; the model sees `flow_timestep(sigma)`.
- "dcgen": NVIDIA's DC-Gen `FlowMatchScheduler` (dc_ai/videogencore/schedulers/
  flow_match_scheduler.py, used by their Wan trainer): an integer t ~ U{0..999}; sigma is the
  point of the shifted `grid_steps`-point grid (linspace(1, 0, N+1)[:-1]) whose timestep is
  nearest to t; the model is fed t itself (not the grid timestep); each sample's squared error
  is weighted by a Gaussian bump of its grid timestep, exp(-2 ((T - 500) / 1000)^2), shifted to
  a minimum of 0 and normalised to mean 1 over the grid.

`cond_dropout` (DC-Gen: 0.1) replaces a sample's conditioning by `null_cond` (DC-Gen: the text
embedding of Wan's negative prompt) with that probability, as their `forward_without_cfg` does
in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000  # DC-Gen / Wan: integer training timesteps 0..999, sigma = t / 1000
TIMESTEP_SAMPLINGS = ("uniform", "dcgen")


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


def dcgen_grid(shift: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps], loss weights [steps]) of DC-Gen's training grid: sigma_k = shift(1 - k/N),
    k = 0..N-1 (sigma_min 0, one extra step dropped), weights exp(-2 ((1000 s - 500)/1000)^2)
    minus their minimum, scaled to sum to N."""
    if steps < 2:
        raise ValueError(f"the dcgen timestep grid needs at least 2 points, got {steps}")
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift)
    t = sigmas * NUM_TRAIN_TIMESTEPS
    bump = torch.exp(-2 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    bump = bump - bump.min()
    return sigmas, bump * (steps / bump.sum())


def sample_dcgen(
    batch: int, generator: torch.Generator, *, shift: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma [B], the timestep the model is fed [B] in 0..999, loss weight [B]) as DC-Gen draws
    them: t ~ U{0..999}, sigma = the grid point whose timestep is nearest t (first on a tie)."""
    sigmas, weights = dcgen_grid(shift, steps)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    idx = torch.argmin((sigmas[None, :] * NUM_TRAIN_TIMESTEPS - t[:, None]).abs(), dim=1)
    return sigmas[idx], t.float(), weights[idx]


def drop_conditioning(
    cond: dict[str, Any], null_cond: dict[str, torch.Tensor], p: float, generator: torch.Generator
) -> dict[str, Any]:
    """Replace, per sample with probability p, each conditioning entry named in `null_cond` by it
    (one sample's worth, e.g. context [L, D]); other entries (e.g. Wan I2V's clip_fea) are kept.
    A null and batch entry that differ only in their row count (text of another cache) are both
    zero-padded to the longer."""
    if p <= 0:
        return cond
    missing = [k for k in null_cond if k not in cond]
    if missing:
        raise ValueError(f"null conditioning for {missing}, which the batch does not have ({sorted(cond)})")
    first = cond[next(iter(null_cond))]
    drop = torch.rand(first.shape[0], generator=generator) < p
    out = dict(cond)
    for key, null in null_cond.items():
        value = cond[key]
        if tuple(null.shape) != tuple(value.shape[1:]) and _same_but_length(null, value):
            # text rows: each LatentCache zero-pads its prompts to its own longest, so the null
            # embedding of one cache (run_all uses it for every stage) and the batch of another
            # (e.g. a resolution stage's) differ in length: zero-pad the shorter, as the cache does
            rows = max(null.shape[0], value.shape[1])
            null = F.pad(null, (0, 0) * (null.ndim - 1) + (0, rows - null.shape[0]))
            value = F.pad(value, (0, 0) * (null.ndim - 1) + (0, rows - value.shape[1]))
        if tuple(null.shape) != tuple(value.shape[1:]):
            raise ValueError(
                f"null {key} has shape {tuple(null.shape)}, the batch's rows {tuple(value.shape[1:])}: "
                "pad both to the same length (LatentCache does)"
            )
        mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(mask, null.to(value.device, value.dtype).unsqueeze(0), value)
    return out


def _same_but_length(null: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether null [L, ...] and the batch value [B, L', ...] differ at most in L."""
    return null.ndim >= 2 and value.ndim == null.ndim + 1 and tuple(null.shape[1:]) == tuple(value.shape[2:])


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
    timesteps: str = "uniform",
    grid_steps: int = 50,
    cond_dropout: float = 0.0,
    null_cond: dict[str, torch.Tensor] | None = None,
    **cond: Any,
) -> torch.Tensor:
    """MSE between the model's prediction on x_t and `model.flow_target(x0, noise)` (weighted per
    sample under `timesteps="dcgen"`, see the module docstring).

    `y` (conditioning latent, e.g. Wan I2V's mask + image chunk) is concatenated after x_t on
    channels before patch embedding; `cond` goes to `forward_from_embeddings`. Noise, noise level
    and condition dropout come from `generator` (CPU), in that order, so a run is reproducible
    whatever the device."""
    if timesteps not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timesteps must be one of {TIMESTEP_SAMPLINGS}, got {timesteps!r}")
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    weight = None
    if timesteps == "dcgen":
        sigma, t_raw, weight = sample_dcgen(x0.shape[0], generator, shift=shift, steps=grid_steps)
        # t / 1000 * 1000 in float32 misses some integers (127, 251, ...) by an ulp; in float64 it
        # is exact, so a Wan-like flow_timestep (1000 sigma) hands the model the integer t itself
        t = model.flow_timestep(t_raw.double() / NUM_TRAIN_TIMESTEPS).float().to(x0.device)
        sigma = sigma.to(x0.device)
    else:
        sigma = sample_sigma(x0.shape[0], generator, shift=shift, logit_normal=logit_normal).to(x0.device)
        t = model.flow_timestep(sigma)
    if cond_dropout > 0:
        if not null_cond:
            raise ValueError("cond_dropout > 0 needs null_cond (e.g. the text embedding of the negative prompt)")
        cond = drop_conditioning(cond, null_cond, cond_dropout, generator)
    x_t = add_noise(x0, noise, sigma)
    if y is not None:
        x_t = torch.cat([x_t, y.to(x_t.dtype)], dim=1)
    tokens, grid = model.patch_embed(x_t)
    pred = model.forward_from_embeddings(tokens, grid, t, **cond)
    target = model.flow_target(x0, noise).float()
    if weight is None:
        return F.mse_loss(pred.float(), target)
    err = (pred.float() - target) ** 2
    return (err * weight.to(err.device).reshape(-1, *([1] * (err.ndim - 1)))).mean()
