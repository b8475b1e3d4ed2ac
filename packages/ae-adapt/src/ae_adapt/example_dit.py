"""A small DiT/PixArt-style video model that implements `AdaptableDiT` without any Wan code.

It differs from Wan on purpose: per-frame 2D patches through a Linear (not a Conv3d), additive
3D sinusoidal positions (not RoPE), gated adaLN blocks with a fused qkv, a final adaLN layer, and
timesteps in [0, 1] (not [0, 1000]). Shipped as the reference for implementing the protocol, and
used by the tests to show that ae-adapt does not depend on Wan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ae_adapt.errors import ShapeError
from ae_adapt.flow import velocity_target
from ae_adapt.protocol import Grid


@dataclass(frozen=True, kw_only=True)
class ExampleDiTConfig:
    dim: int
    depth: int
    num_heads: int
    in_channels: int
    out_channels: int
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); t must be 1: patches are per frame
    text_dim: int = 16
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into {self.num_heads} heads of even width")
        if self.dim % 6:
            raise ValueError(f"dim={self.dim} must be a multiple of 6 (3D sinusoidal positions)")
        _check_patch(self.patch)


def _check_patch(patch: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or patch[0] != 1 or min(patch) < 1:
        raise ShapeError(f"the example DiT patches frames one by one: patch must be (1, ph, pw), got {patch}")
    return patch


# Linear layers LoRA adapts by default, as in the Wan binding: every attention projection (self and
# cross) and the MLP of each block; not the adaLN modulation or the time/text embedders.
# ("proj" also names the patch embedder's Linear; `lora_io.add_lora` never adapts the embedder.)
LORA_TARGETS = ("qkv", "proj", "cross_q", "cross_kv", "cross_proj", "fc1", "fc2")

PRESETS = {"tiny": ExampleDiTConfig(dim=48, depth=2, num_heads=4, in_channels=4, out_channels=4, text_dim=16)}


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = scale * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def positions_3d(grid: Grid, dim: int, device: torch.device) -> torch.Tensor:
    """[L, dim] fixed sin/cos features of the (f, h, w) index, a third of the width each."""
    part = dim // 3
    axes = [timestep_features(torch.arange(n, device=device), part, scale=1.0) for n in grid]
    f, h, w = torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij")
    return torch.cat([axes[0][f.flatten()], axes[1][h.flatten()], axes[2][w.flatten()]], dim=1)


class FramePatchEmbed(nn.Module):
    """[B, C, F, H, W] -> tokens [B, F*(H/ph)*(W/pw), dim]: per-frame patches, flattened, Linear."""

    def __init__(self, in_channels: int, dim: int, patch: Sequence[int]):
        super().__init__()
        self.patch = _check_patch(patch)
        self.in_channels = in_channels
        self.proj = nn.Linear(in_channels * self.patch[1] * self.patch[2], dim)

    def grid(self, latent_shape: Sequence[int]) -> Grid:
        f, h, w = (int(s) for s in latent_shape[-3:])
        _, ph, pw = self.patch
        if h % ph or w % pw or 0 in (f, h, w):
            raise ShapeError(f"latent frames/height/width {(f, h, w)} cannot be tiled by patches {self.patch}")
        return (f, h // ph, w // pw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"the patch embedder takes {self.in_channels} channels, got {x.shape[1]}")
        grid = self.grid(x.shape)
        b, c = x.shape[:2]
        _, ph, pw = self.patch
        x = x.reshape(b, c, grid[0], grid[1], ph, grid[2], pw).permute(0, 2, 3, 5, 1, 4, 6)
        return self.proj(x.reshape(b, math.prod(grid), c * ph * pw)), grid


class Block(nn.Module):
    """Gated adaLN (DiT): x += g1*Attn(mod(LN x)); x += CrossAttn(LN x, text); x += g2*MLP(mod(LN x))."""

    def __init__(self, cfg: ExampleDiTConfig):
        super().__init__()
        d, self.heads = cfg.dim, cfg.num_heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.cross_q, self.cross_kv, self.cross_proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm_cross = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, int(d * cfg.mlp_ratio)), nn.Linear(int(d * cfg.mlp_ratio), d)
        self.ada = nn.Linear(d, 6 * d)

    def _attn(self, q, k, v):
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale1) + shift1
        x = x + gate1 * self.proj(self._attn(*self.qkv(h).chunk(3, dim=-1)))
        k, v = self.cross_kv(text).chunk(2, dim=-1)
        x = x + self.cross_proj(self._attn(self.cross_q(self.norm_cross(x)), k, v))
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from the time embedding) + Linear to ph*pw*C per token, then unpatchify."""

    def __init__(self, dim: int, out_channels: int, patch: Sequence[int]):
        super().__init__()
        self.patch, self.out_channels = _check_patch(patch), out_channels
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, self.patch[1] * self.patch[2] * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: Grid) -> torch.Tensor:
        shift, scale = self.ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        x = self.linear(F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift)
        (f, gh, gw), (_, ph, pw), co = grid, self.patch, self.out_channels
        x = x.reshape(x.shape[0], f, gh, gw, co, ph, pw).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(x.shape[0], co, f, gh * ph, gw * pw)


class ExampleDiT(nn.Module):
    """`model(x, t, context)`: x [B, C, F, H, W], t [B] in [0, 1], context [B, L, text_dim]."""

    def __init__(self, cfg: ExampleDiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.x_embedder = FramePatchEmbed(cfg.in_channels, d, cfg.patch)
        self.t_embedder = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.out_channels, cfg.patch)
        self.gradient_checkpointing = False

    # ---- the AdaptableDiT protocol ------------------------------------------------------------
    def token_grid(self, latent_shape: Sequence[int]) -> Grid:
        return self.x_embedder.grid(latent_shape)

    def patch_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        return self.x_embedder(x)

    def forward_from_embeddings(self, tokens: torch.Tensor, grid: Grid, t: torch.Tensor, *, context: torch.Tensor):
        c = self.t_embedder(timestep_features(t, self.config.dim))
        text = self.y_embedder(context)
        x = tokens + positions_3d(grid, self.config.dim, tokens.device).to(tokens.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, text, use_reentrant=False)
            else:
                x = block(x, c, text)
        return self.final_layer(x, c, grid)

    def get_patch_embedder(self) -> nn.Module:
        return self.x_embedder

    def replace_patch_embedder(self, in_channels: int, patch: Sequence[int]) -> nn.Module:
        device = self.x_embedder.proj.weight.device
        self.x_embedder = FramePatchEmbed(in_channels, self.config.dim, patch).to(device)
        return self.x_embedder

    def get_output_head(self) -> nn.Module:
        return self.final_layer

    def replace_output_head(self, out_channels: int, patch: Sequence[int]) -> nn.Module:
        device = self.final_layer.linear.weight.device
        self.final_layer = FinalLayer(self.config.dim, out_channels, patch).to(device)
        return self.final_layer

    def flow_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return velocity_target(x0, noise)

    def flow_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    # ---- optional hooks ---------------------------------------------------------------------
    def lora_target_modules(self) -> tuple[str, ...]:
        """Suffixes of the Linear layers LoRA adapts when the preset names none (`LORA_TARGETS`)."""
        return LORA_TARGETS

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def fsdp_units(self) -> list[nn.Module]:
        """Modules to wrap one by one with `fully_shard` before the root."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)
        return self.forward_from_embeddings(tokens, grid, t, context=context)
