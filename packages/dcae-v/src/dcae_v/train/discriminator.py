"""A StyleGAN2-style discriminator extended to video (the paper's A.2.1: "we extend the StyleGAN2
discriminator to process video inputs").

Residual blocks of two 3x3x3 convs with leaky ReLU and a 1x1x1 skip, summed and scaled by 1/sqrt(2),
each halving H and W (and T while T > 1) by average pooling; then StyleGAN2's epilogue:
minibatch standard deviation as an extra channel, a conv, a mean over time, two linear layers.
Simplifications against StyleGAN2: no equalised learning rate and no blur filter before pooling.
Images (one-frame clips) and videos go through the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _pool(x: torch.Tensor) -> torch.Tensor:
    kt = 2 if x.shape[2] >= 2 else 1
    return F.avg_pool3d(x, (kt, 2, 2), ceil_mode=True)


class DiscriminatorBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv3d(cin, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(_pool(x))
        x = _pool(_act(self.conv2(_act(self.conv1(x)))))
        return (x + skip) / math.sqrt(2)


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append StyleGAN2's minibatch-std channel: std over groups of `group` clips (the largest
    divisor of the batch not above it), averaged over features, broadcast to every position."""
    n, c, t, h, w = x.shape
    g = min(group, n)
    while n % g:
        g -= 1
    y = x.float().reshape(g, n // g, c, t, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3, 4))  # [n // g]
    y = y.to(x.dtype).reshape(-1, 1, 1, 1, 1).repeat(g, 1, t, h, w)
    return torch.cat([x, y], dim=1)


class VideoDiscriminator(nn.Module):
    """Logits [N] for clips [N, 3, T, H, W] in [-1, 1] (H = W = `size`)."""

    def __init__(self, size: int, channels: int = 32, max_channels: int = 256, mbstd_group: int = 4, in_channels: int = 3):
        super().__init__()
        if size < 8:
            raise ValueError(f"the discriminator needs crops of at least 8 pixels, got {size}")
        n_blocks = int(math.log2(size / 4))  # halvings down to about 4x4
        widths = [min(channels * 2**i, max_channels) for i in range(n_blocks + 1)]
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.Conv3d(in_channels, widths[0], 1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(widths[i], widths[i + 1]) for i in range(n_blocks))
        self.conv = nn.Conv3d(widths[-1] + 1, widths[-1], 3, padding=1)
        self.fc = nn.Linear(widths[-1] * 16, widths[-1])
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act(self.from_rgb(x))
        for block in self.blocks:
            x = block(x)
        x = _act(self.conv(minibatch_std(x, self.mbstd_group))).mean(dim=2)
        x = F.adaptive_avg_pool2d(x, 4)  # [N, C, 4, 4]; a no-op for power-of-two sizes
        return self.out(_act(self.fc(x.flatten(1)))).squeeze(1)
