"""Loss terms of the autoencoder and its discriminator, each per sample ([N] tensors).

Per-sample values let the trainer weight every clip of a global batch equally however the batch
is split over processes and accumulation steps (images and videos of one batch included).

Perceptual term: LPIPS-alex from local weights (`dcae_v.metrics.LPIPS`). Without the weights the
trainer uses a documented substitute, 1 - SSIM per frame (11x11 Gaussian window, on [0, 1]), and
warns: it rewards local structure as LPIPS does, but its values are not LPIPS values.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dcae_v.metrics import LPIPS

log = logging.getLogger("dcae_v.train")


def pixel_loss(y: torch.Tensor, x: torch.Tensor, l1: float, mse: float) -> torch.Tensor:
    diff = (y.float() - x.float()).flatten(1)
    out = diff.new_zeros(diff.shape[0])
    if l1:
        out = out + l1 * diff.abs().mean(dim=1)
    if mse:
        out = out + mse * diff.square().mean(dim=1)
    return out


def _frames(v: torch.Tensor) -> torch.Tensor:
    """[N, C, T, H, W] -> [N*T, C, H, W]."""
    n, c, t, h, w = v.shape
    return v.transpose(1, 2).reshape(n * t, c, h, w)


class PerceptualLoss(nn.Module):
    """LPIPS (local weights) or the SSIM substitute, averaged over the frames of each clip."""

    def __init__(self, backbone: str | None = None, heads: str | None = None):
        super().__init__()
        if backbone and heads:
            self.lpips: LPIPS | None = LPIPS.from_weights(backbone, heads)
            self.kind = "lpips"
        else:
            self.lpips, self.kind = None, "ssim_substitute"
            msg = ("loss.lpips > 0 but no LPIPS weights (loss.lpips_backbone, loss.lpips_heads) were given: using the "
                   "substitute 1 - SSIM per frame instead; its values are not LPIPS values")
            warnings.warn(msg, stacklevel=2)  # the CLI prints warnings on one line; once is enough

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[0], x.shape[2]
        fy, fx = _frames(y.float()), _frames(x.float())
        if self.lpips is not None:
            d = self.lpips(fy, fx)
        else:
            d = 1 - ssim_frames((fy + 1) / 2, (fx + 1) / 2)
        return d.reshape(n, t).mean(dim=1)


_WINDOW = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
_WINDOW = _WINDOW / _WINDOW.sum()


def ssim_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable SSIM [N] of images [N, C, H, W] in [0, 1] (the same definition as
    dcae_v.metrics.ssim: Gaussian 11x11, sigma 1.5, valid region, mean over channels and pixels)."""
    c = a.shape[1]
    k = _WINDOW.to(a)
    kh, kw = k.view(1, 1, 11, 1).repeat(c, 1, 1, 1), k.view(1, 1, 1, 11).repeat(c, 1, 1, 1)

    def blur(v):
        return F.conv2d(F.conv2d(v, kh, groups=c), kw, groups=c)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.flatten(1).mean(dim=1)


# ---- adversarial -----------------------------------------------------------------------------
def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator loss per sample from logits on real and reconstructed clips."""
    if kind == "hinge":
        return F.relu(1 - real) + F.relu(1 + fake)
    return F.softplus(-real) + F.softplus(fake)


def g_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Autoencoder (generator) adversarial loss per sample."""
    return -fake if kind == "hinge" else F.softplus(-fake)


def r1_penalty(disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """|grad_x D(x)|^2 per real sample (multiply by gamma / 2)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(dim=1)


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last: torch.Tensor, max_weight: float) -> torch.Tensor:
    """VQGAN's balance: |grad_last rec| / (|grad_last adv| + 1e-4), clamped, no gradient."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, max_weight).detach()


def scheduled_weight(step: int, weight: float, start: int, ramp: int) -> float:
    """0 before `start`, then a linear ramp to `weight` over `ramp` steps."""
    if step < start:
        return 0.0
    return weight if ramp <= 0 else weight * min(1.0, (step - start + 1) / ramp)
