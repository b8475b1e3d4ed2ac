"""DC-AE-V building blocks.

Module and attribute names are chosen so that `state_dict()` keys equal those of NVIDIA's
released checkpoints (`...main.conv1.conv.weight`, `...main.conv2.norm.bias`, `op_list.i`).

Every block's forward takes an optional streaming `cache` (a dict owned by the caller, keyed
by the conv module) holding each temporal conv's trailing input frames between calls.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dcae_v import kernels
from dcae_v.temporal import TemporalRule, next_context

StreamCache = dict[nn.Module, torch.Tensor]


class RMSNorm3d(nn.Module):
    """RMS norm over channels (dim 1) with weight and bias; no mean subtraction, eps 1e-5.

    Computed as NVIDIA does (x / sqrt(.), in the input dtype) so bf16 outputs round identically.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / torch.sqrt(x.square().mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class TemporalConv3d(nn.Module):
    """3x3x3 stride-1 conv whose temporal padding follows a `TemporalRule`, then optional norm/act."""

    def __init__(self, cin: int, cout: int, rule: TemporalRule, *, bias: bool = True, norm: bool = False, act: bool = False):
        super().__init__()
        self.rule = rule
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=0, bias=bias)
        self.norm = RMSNorm3d(cout) if norm else None
        self.act = nn.SiLU() if act else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        context = None
        if cache is not None:
            if self.rule.mode == "non_causal":
                raise ValueError("a non_causal DC-AE-V cannot stream (tile in time); run it on the whole clip")
            context = cache.get(self)
            cache[self] = next_context(x, context, self.rule.context_frames(self.conv.kernel_size[0]))
        y = self._conv(x, context)
        if self.norm is not None:
            y = self.norm(y)
        if self.act is not None:
            y = self.act(y)
        return y

    def _conv(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The temporal conv; a final partial chunk runs on its own, as in NVIDIA's DC-AE-V.

        NVIDIA encodes/decodes in tiles of one chunk with a cache; a short last tile (T % L != 0)
        falls back to a plain zero-padded conv that neither reads the cache nor sees the previous
        chunk. Running that tail without context reproduces it, so one shot, our tiles and
        NVIDIA's tiles agree for every frame count (and causality is kept).
        """
        w, b, rule = self.conv.weight, self.conv.bias, self.rule
        rem = x.shape[2] % rule.chunk if rule.mode == "chunk_causal" else 0
        if not rem:
            return kernels.conv3d(x, w, b, rule, context)
        cut = x.shape[2] - rem
        tail = kernels.conv3d(x[:, :, cut:], w, b, rule, None)
        return tail if cut == 0 else torch.cat([kernels.conv3d(x[:, :, :cut], w, b, rule, context), tail], dim=2)

    def extra_repr(self) -> str:
        return f"rule={self.rule}"


class ResBlockMain(nn.Module):
    """conv(+bias) -> SiLU -> conv(no bias) -> RMSNorm; the identity is added by `Residual`."""

    def __init__(self, channels: int, rule: TemporalRule):
        super().__init__()
        self.conv1 = TemporalConv3d(channels, channels, rule, bias=True, act=True)
        self.conv2 = TemporalConv3d(channels, channels, rule, bias=False, norm=True)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.conv2(self.conv1(x, cache), cache)


def space_time_to_channel(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """3D pixel-unshuffle; channel order (c, dt, dh, dw) as in the reference."""
    return rearrange(x, "b c (t dt) (h dh) (w dw) -> b (c dt dh dw) t h w", dt=t, dh=s, dw=s)


def channel_to_space_time(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """Exact inverse of `space_time_to_channel`."""
    return rearrange(x, "b (c dt dh dw) t h w -> b c (t dt) (h dh) (w dw)", dt=t, dh=s, dw=s)


class ConvUnshuffle(nn.Module):
    """Conv to cout / (s*s*t) channels, then space/time-to-channel."""

    def __init__(self, cin: int, cout: int, s: int, t: int, rule: TemporalRule):
        super().__init__()
        self.s, self.t = s, t
        self.conv = TemporalConv3d(cin, cout // (s * s * t), rule)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return space_time_to_channel(self.conv(x, cache), self.s, self.t)


class ConvShuffle(nn.Module):
    """Conv to cout * s*s*t channels, then channel-to-space/time."""

    def __init__(self, cin: int, cout: int, s: int, t: int, rule: TemporalRule):
        super().__init__()
        self.s, self.t = s, t
        self.conv = TemporalConv3d(cin, cout * s * s * t, rule)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return channel_to_space_time(self.conv(x, cache), self.s, self.t)


class AveragingShortcut(nn.Module):
    """Residual-autoencoding down shortcut: unshuffle, then average consecutive channel groups."""

    def __init__(self, cin: int, cout: int, s: int, t: int):
        super().__init__()
        self.s, self.t, self.cout = s, t, cout
        self.group = cin * s * s * t // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = space_time_to_channel(x, self.s, self.t)
        return u.unflatten(1, (self.cout, self.group)).mean(dim=2)


class DuplicatingShortcut(nn.Module):
    """Residual-autoencoding up shortcut: repeat each channel (interleaved), then shuffle."""

    def __init__(self, cin: int, cout: int, s: int, t: int):
        super().__init__()
        self.s, self.t = s, t
        self.repeats = cout * s * s * t // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_to_space_time(x.repeat_interleave(self.repeats, dim=1), self.s, self.t)


class Residual(nn.Module):
    """main(x) + shortcut(x); the shortcut has no parameters."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.main(x, cache) + (x if self.shortcut is None else self.shortcut(x))


class Stage(nn.Module):
    """A sequence of blocks (ResBlocks and one resampling block)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        for block in self.op_list:
            x = block(x, cache)
        return x


class DecoderHead(nn.Module):
    """RMSNorm -> SiLU -> conv + 2x channel-to-space. No output activation or clamp."""

    def __init__(self, cin: int, cout: int, rule: TemporalRule):
        super().__init__()
        self.op_list = nn.ModuleList([RMSNorm3d(cin), nn.SiLU(), ConvShuffle(cin, cout, 2, 1, rule)])

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        norm, act, conv = self.op_list
        return conv(act(norm(x)), cache)
