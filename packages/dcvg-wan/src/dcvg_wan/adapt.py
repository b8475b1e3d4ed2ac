"""Wan-2.1 under the ae-adapt protocol, and `run_adapt` for `dcvg-wan adapt`.

`WanAdaptable(model)` wraps a `WanModel` (parameter names gain a `dit.` prefix) and implements
`ae_adapt.AdaptableDiT`: the patch embedder is the Conv3d `patch_embedding`, the output head is
`head` (its 2-way modulation lives in embedding space and is kept; only the projection to the
latent is new), timesteps are 1000 * sigma and the target is noise - x0 (Wan's flow matching).
Replacing the embedder or the head updates `model.config` (in_dim / out_dim / patch), so the
adapted model saves as a `dcvg-*` preset and loads with `WanModel.from_pretrained`.

Initialisation as in NVIDIA's DC-Gen code (dc_ai/dc_adapt/models/wan_video.py,
dc_ai/videogencore/models/wan_t2v.py `initialize_weights`, applications/dc_videogen/
wan_t2v_assemble.py): the new embedder's weight is Xavier-uniform over [dim, in * prod(patch)],
its bias U(+-1/sqrt(c * prod(patch))) with c the latent's channels (for I2V, as in DC-Gen's
code, not counting the mask and image-latent channels); the new head's projection starts at
zero (weight and bias) with the base model's modulation.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ae_adapt import LatentCache, check_adaptable, get_preset, lora_io, run_all
from ae_adapt.errors import CacheError, ShapeError
from ae_adapt.flow import velocity_target
from ae_adapt.trainer import world
from dcvg_wan.lora import record_merged_loras
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
# NVIDIA's DC-Gen default (`only_apply_lora_to_backbone=False` in WanT2V.lora_wrap): every Linear
# of the model except the head, i.e. also the text/time embeddings and I2V's CLIP projection.
LORA_TARGETS_ALL_LINEAR = LORA_TARGETS + (
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "img_emb.proj.1",
    "img_emb.proj.3",
)
LORA_SCOPES = ("blocks", "all-linear")
NUM_TRAIN_TIMESTEPS = 1000
I2V_MASK_CHANNELS = 4  # Wan I2V's y: 4 first-frame mask channels + the image latent


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
    """`ae_adapt.AdaptableDiT` over a WanModel (T2V or I2V). `lora_scope`: "blocks" (attention
    and FFN Linears of every block, our default, which fits the paper's Figure 8 parameter
    count) or "all-linear" (DC-Gen's code default: also the text/time embeddings and I2V's CLIP
    projection)."""

    def __init__(self, dit: WanModel, *, lora_scope: str = "blocks"):
        super().__init__()
        if lora_scope not in LORA_SCOPES:
            raise ValueError(f"lora_scope must be one of {LORA_SCOPES}, got {lora_scope!r}")
        self.dit = dit
        self.lora_scope = lora_scope

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
        with torch.no_grad():  # DC-Gen: Xavier over the flattened kernel, bias U(+-1/sqrt(fan_in))
            nn.init.xavier_uniform_(conv.weight.view(cfg.dim, -1))
            bound = 1 / math.sqrt(_latent_channels(in_channels, i2v=cfg.image_dim is not None) * math.prod(patch))
            nn.init.uniform_(conv.bias, -bound, bound)
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
        with torch.no_grad():  # DC-Gen: zero projection, the base model's modulation
            head.head.weight.zero_()
            head.head.bias.zero_()
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
        targets = LORA_TARGETS_ALL_LINEAR if self.lora_scope == "all-linear" else LORA_TARGETS
        if self.dit.config.image_dim is None:  # T2V: no image cross-attention, no CLIP projection
            targets = tuple(t for t in targets if "_img" not in t and not t.startswith("img_emb."))
        return targets

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


def _latent_channels(in_channels: int, *, i2v: bool) -> int:
    """The fan-in channels of DC-Gen's embedder bias bound: `cfg.in_channels`, the latent's
    channels only, also for I2V, whose conv takes latent + 4 mask + image latent channels
    (dc_adapt/models/wan_video.py `WanI2VPatchEmbedding`, videogencore `WanI2V`)."""
    if i2v and in_channels > I2V_MASK_CHANNELS and (in_channels - I2V_MASK_CHANNELS) % 2 == 0:
        return (in_channels - I2V_MASK_CHANNELS) // 2
    return in_channels


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
    lora_scope: str = "blocks",
) -> WanModel | None:
    """All AE-Adapt-V stages for Wan on a latent cache (built with `ae_adapt.build_cache`), then
    `out_dir/model` (merged weights, `WanModel.from_pretrained`-loadable), `out_dir/adapter` (peft)
    and `out_dir/lora_comfy.safetensors` (ComfyUI keys). The LoRA files are the deltas of the
    adapted model: `out_dir/model` already holds them (its merged_loras.json says so, and
    `generate --lora` refuses them there); they apply to the aligned model without LoRA, i.e.
    the base DiT with the new embedder/head of `out_dir/adapter` (`ae_adapt.lora_io.load_lora`).
    Under torchrun each launch trains one stage and returns None; the launch that finds every
    stage finished writes the outputs and returns the adapted model.

    The new embedder takes `new_channels` (+ the I2V conditioning channels of the base model's
    in_dim - out_dim: mask 4 + image latent) and the head predicts `new_channels`. With the
    preset's `cond_dropout` > 0 (the Wan presets: DC-Gen's 0.1) the cache must hold the null
    (negative-prompt) embedding: `build_cache(..., null_prompt=)`, as `dcvg-wan adapt` does."""
    dit = WanModel.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
    wrapped = check_adaptable(WanAdaptable(dit, lora_scope=lora_scope))
    cond_channels = dit.config.in_dim - dit.config.out_dim
    in_channels = new_channels + (cond_channels and I2V_MASK_CHANNELS + new_channels)
    cache = LatentCache(cache_dir, base_ae=base_ae, new_ae=new_ae, new_patch=patch)
    res = [LatentCache(d, base_ae=base_ae, new_ae=new_ae, new_patch=patch) for d in resolution_caches]
    cfg = get_preset(preset, **(overrides or {}))
    null_cond = cache.null_cond()
    if cfg.cond_dropout > 0 and null_cond is None:
        raise CacheError(
            f"{cache_dir} holds no null-prompt embedding, which the preset's text dropout "
            f"(cond_dropout={cfg.cond_dropout}) trains on: rebuild the cache with `dcvg-wan adapt` (it stores "
            "Wan's negative prompt) or build_cache(..., null_prompt=...), or override cond_dropout=0"
        )
    finished = run_all(
        wrapped,
        cache,
        cfg,
        out_dir,
        in_channels=in_channels,
        out_channels=new_channels,
        patch=patch,
        resolution_data=res,
        null_cond=null_cond,
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
        # the LoRA files are already in OUT/model: `generate --dit OUT/model --lora ...` refuses them
        record_merged_loras(out / "model", [out / "adapter", out / "lora_comfy.safetensors"])
    return dit
