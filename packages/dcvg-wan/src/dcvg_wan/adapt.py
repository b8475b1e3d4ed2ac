"""Wan-2.1 under the ae-adapt protocol, and `run_adapt` for `dcvg-wan adapt`.

`WanAdaptable(model)` wraps a `WanModel` (parameter names gain a `dit.` prefix) and implements
`ae_adapt.AdaptableDiT`: the patch embedder is the Conv3d `patch_embedding`, the output head is
`head` (its 2-way modulation lives in embedding space and is kept; only the projection to the
latent is new), timesteps are 1000 * sigma and the target is noise - x0 (Wan's flow matching).
Replacing the embedder or the head updates `model.config` (in_dim / out_dim / patch), so the
adapted model saves as a `dcvg-*` preset and loads with `WanModel.from_pretrained`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ae_adapt import LatentCache, check_adaptable, get_preset, lora_io, run_all
from ae_adapt.errors import ShapeError
from ae_adapt.flow import velocity_target
from ae_adapt.trainer import world
from dcvg_wan.model import Head, WanModel

# Linear layers LoRA adapts by default (every attention projection and the FFN of each block).
LORA_TARGETS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
)
NUM_TRAIN_TIMESTEPS = 1000


class WanPatchEmbedder(nn.Module):
    """A Wan Conv3d patch embedder as a self-contained `latent -> (tokens, grid)` module."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        patch = self.conv.kernel_size
        if x.shape[1] != self.conv.in_channels or any(s % p or s == 0 for s, p in zip(x.shape[-3:], patch)):
            raise ShapeError(
                f"latent {tuple(x.shape)} does not fit the patch embedder "
                f"({self.conv.in_channels} channels, patch {tuple(patch)})"
            )
        tokens = self.conv(x.to(self.conv.weight.dtype))
        return tokens.flatten(2).transpose(1, 2), tuple(tokens.shape[2:])


class WanAdaptable(nn.Module):
    """`ae_adapt.AdaptableDiT` over a WanModel (T2V or I2V)."""

    def __init__(self, dit: WanModel):
        super().__init__()
        self.dit = dit

    @property
    def config(self):
        return self.dit.config

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return self.dit.token_grid(latent_shape)

    def patch_embed(self, x: torch.Tensor):
        return self.dit.patch_embed(x)

    def forward_from_embeddings(self, tokens, grid, t, *, context, clip_fea=None) -> torch.Tensor:
        return self.dit.forward_from_embeddings(tokens, grid, t, context, clip_fea)

    def get_patch_embedder(self) -> nn.Module:
        return WanPatchEmbedder(self.dit.patch_embedding)

    def replace_patch_embedder(self, in_channels: int, patch: Sequence[int]) -> nn.Module:
        old, cfg = self.dit.patch_embedding, self.dit.config
        patch = _patch(patch)
        conv = nn.Conv3d(in_channels, cfg.dim, kernel_size=patch, stride=patch)
        self.dit.patch_embedding = conv.to(old.weight.device, old.weight.dtype)
        # until the head is replaced too, the model is only good for patch_embed (stage 1)
        self.dit.config = cfg.replace(in_dim=in_channels, patch=patch)
        return self.get_patch_embedder()

    def get_output_head(self) -> nn.Module:
        return self.dit.head

    def replace_output_head(self, out_channels: int, patch: Sequence[int]) -> nn.Module:
        patch, cfg = _patch(patch), self.dit.config
        if patch != cfg.patch:
            raise ShapeError(
                f"Wan uses one patch for embedder and head: the embedder has {cfg.patch}, "
                f"the head was asked for {patch}"
            )
        old = self.dit.head
        new_cfg = cfg.replace(out_dim=out_channels)
        head = Head(new_cfg).to(old.head.weight.device)  # float32, like every Wan head (keeps_fp32)
        with torch.no_grad():
            head.modulation.copy_(old.modulation)
        self.dit.head = head
        self.dit.config = new_cfg
        return head

    def flow_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return velocity_target(x0, noise)

    def flow_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * NUM_TRAIN_TIMESTEPS

    # ---- optional hooks ---------------------------------------------------------------------
    def lora_target_modules(self) -> tuple[str, ...]:
        return LORA_TARGETS if self.dit.config.image_dim is not None else LORA_TARGETS[:8] + LORA_TARGETS[10:]

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.dit.blocks)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in backward (instance-level forward, so weight names are unchanged)."""
        for block in self.dit.blocks:
            if not getattr(block, "_ae_adapt_checkpointed", False):
                block.forward = functools.partial(_checkpointed, block.forward)
                block._ae_adapt_checkpointed = True

    def forward(self, x, t, context, clip_fea=None, y=None):
        return self.dit(x, t, context, clip_fea, y)


def _checkpointed(forward, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def _patch(patch: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) < 1:
        raise ShapeError(f"patch must be three positive sizes (t, h, w), got {patch}")
    return patch


def run_adapt(
    model: WanModel | str | os.PathLike,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_ae: str,
    new_ae: str,
    new_channels: int = 32,
    patch: Sequence[int] = (1, 1, 1),
    preset: str = "wan-14B",
    resolution_caches: Sequence[str | os.PathLike] = (),
    overrides: dict[str, Any] | None = None,
) -> WanModel | None:
    """All AE-Adapt-V stages for Wan on a latent cache (built with `ae_adapt.build_cache`), then
    `out_dir/model` (merged weights, `WanModel.from_pretrained`-loadable), `out_dir/adapter` (peft)
    and `out_dir/lora_comfy.safetensors` (ComfyUI keys, applies on top of the aligned model).
    Under torchrun each launch trains one stage and returns None; the launch that finds every
    stage finished writes the outputs and returns the adapted model.

    The new embedder takes `new_channels` (+ the I2V conditioning channels of the base model's
    in_dim - out_dim: mask 4 + image latent) and the head predicts `new_channels`."""
    dit = WanModel.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
    wrapped = check_adaptable(WanAdaptable(dit))
    cond_channels = dit.config.in_dim - dit.config.out_dim
    in_channels = new_channels + (cond_channels and 4 + new_channels)
    cache = LatentCache(cache_dir, base_ae=base_ae, new_ae=new_ae, new_patch=patch)
    res = [LatentCache(d, base_ae=base_ae, new_ae=new_ae, new_patch=patch) for d in resolution_caches]
    cfg = get_preset(preset, **(overrides or {}))
    finished = run_all(
        wrapped,
        cache,
        cfg,
        out_dir,
        in_channels=in_channels,
        out_channels=new_channels,
        patch=patch,
        resolution_data=res,
        fingerprint=cache.fingerprint(),
    )
    if not finished:  # under torchrun: one stage per launch
        return None
    out = Path(out_dir)
    lora_io.save_lora(wrapped, out / "adapter")
    if world()[0] == 0:
        lora_io.save_export(wrapped, out / "lora_comfy.safetensors", "comfy", strip_prefix="dit.")
        lora_io.merge_lora(wrapped)
        dit.save_pretrained(out / "model")
    return dit
