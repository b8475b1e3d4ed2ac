"""Loading and saving Wan-2.1 VAE weights in the layouts users have on disk.

* official: `Wan2.1_VAE.pth` (a flat state dict, read with torch.load(weights_only=True)), or a
  directory holding it (the official --ckpt_dir);
* diffusers: a `vae/` directory (config.json + diffusion_pytorch_model.safetensors), or the
  pipeline directory above it;
* ComfyUI: `wan_2.1_vae.safetensors` uses the official names; all-in-one checkpoints put them
  under `first_stage_model.`;
* our own directory from `save_pretrained` (official names, config.json with `_class_name` WanVAE).

The layout is detected from the key names, the architecture comes from `preset=`, else
config.json, else the shapes. The model is built on the meta device and filled with
`load_state_dict(strict=True, assign=True)` after a check that lists missing, unexpected and
mis-shaped keys with the layout and the closest preset.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dcae_v.checkpoint import closest_preset, key_mismatch_lines, staged_file
from dcvg_wan.__about__ import __version__
from dcvg_wan.checkpoint import read_weight_file
from dcvg_wan.errors import CheckpointError
from dcvg_wan.layouts import vae_diffusers
from dcvg_wan.vae import WanVAE
from dcvg_wan.vae_config import (
    VAE_PRESETS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WanVAEConfig,
    get_vae_preset,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
OFFICIAL_NAME = "Wan2.1_VAE.pth"
COMFY_PREFIX = "first_stage_model."
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_OFFICIAL_MARKERS = (".downsamples.", ".upsamples.", ".middle.", ".residual.")


def load_wan_vae(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> WanVAE:
    """Load a Wan VAE (see the module docstring for what `path` may be).

    preset: architecture to expect ("wan2.1-vae"); by default from config.json or the shapes.
    dtype: cast while loading (default: as stored; the official model runs in float32).
    """
    path = Path(path)
    file, json_config = _locate(path)
    raw = read_weight_file(file, dtype)
    layout = detect_vae_layout(raw)
    sd = to_official(raw, layout)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    config = get_vae_preset(preset) if preset is not None else json_config or infer_vae_config(sd, file)
    with torch.device("meta"):
        model = WanVAE(config)
    check_vae_state_dict(model, sd, layout=layout, path=file)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()


# ---- layouts -------------------------------------------------------------------------------
def detect_vae_layout(keys: Iterable[str]) -> str:
    """"comfy" (official names under `first_stage_model.`), "diffusers" or "official"."""
    keys = list(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    is_diffusers = vae_diffusers.matches(keys)
    is_official = any(m in k for k in keys for m in _OFFICIAL_MARKERS)
    if is_diffusers and is_official:
        raise CheckpointError(f"the VAE checkpoint mixes official and diffusers key names (e.g. {sorted(keys)[:5]})")
    if is_diffusers or is_official:
        return "diffusers" if is_diffusers else "official"
    hint = ""
    if any(".self_attn." in k or ".attn1." in k for k in keys):
        hint = " This looks like a Wan DiT (transformer) checkpoint; pass the VAE file (Wan2.1_VAE.pth or vae/)."
    raise CheckpointError(
        f"not a Wan VAE checkpoint: no key has official {_OFFICIAL_MARKERS} or diffusers {vae_diffusers.MARKERS} "
        f"names; {len(keys)} keys, e.g. {sorted(keys)[:5]}.{hint}"
    )


def to_official(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "comfy":
        return {k.removeprefix(COMFY_PREFIX): v for k, v in sd.items()}
    if layout == "diffusers":
        return vae_diffusers.to_official(sd)
    if layout == "official":
        return dict(sd)
    raise ValueError(f"unknown VAE layout {layout!r}; valid: official, diffusers, comfy")


def from_official(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "comfy":
        return {COMFY_PREFIX + k: v for k, v in sd.items()}
    if layout == "diffusers":
        return vae_diffusers.from_official(sd)
    if layout == "official":
        return dict(sd)
    raise ValueError(f"unknown VAE layout {layout!r}; valid: official, diffusers, comfy")


# ---- finding files and configs ---------------------------------------------------------------
def _locate(path: Path) -> tuple[Path, WanVAEConfig | None]:
    """(weights file, config from config.json or None)."""
    if not path.exists():
        raise CheckpointError(f"no Wan VAE checkpoint at {path}: the path does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            sibling = path.parent / CONFIG_NAME
            return path, read_vae_config(sibling) if path.name == WEIGHTS_NAME and sibling.is_file() else None
        if path.suffix in _TORCH_SUFFIXES:
            return path, None
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected {OFFICIAL_NAME} (.pth), a .safetensors "
            f"file or a directory with {CONFIG_NAME} + {WEIGHTS_NAME}"
        )
    if (path / WEIGHTS_NAME).is_file():
        config = path / CONFIG_NAME
        return path / WEIGHTS_NAME, read_vae_config(config) if config.is_file() else None
    if (path / OFFICIAL_NAME).is_file():
        return path / OFFICIAL_NAME, None
    if (path / "vae").is_dir():
        return _locate(path / "vae")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    raise CheckpointError(
        f"no Wan VAE weights in {path}: looked for {WEIGHTS_NAME}, {OFFICIAL_NAME} and a vae/ subfolder; "
        f"found {found[:12] or 'nothing'}"
    )


def read_vae_config(path: Path) -> WanVAEConfig:
    """A WanVAEConfig from our config.json or diffusers' AutoencoderKLWan one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("_class_name")
    try:
        if kind == "WanVAE":
            return WanVAEConfig.from_dict({k: v for k, v in data.items() if not k.startswith(("_", "dcvg_wan"))})
        if kind == "AutoencoderKLWan" or "base_dim" in data:
            return _diffusers_config(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a supported Wan-2.1 VAE config: {e}") from None
    raise CheckpointError(
        f"{path} is not a Wan VAE config (_class_name {kind!r}; expected WanVAE or AutoencoderKLWan); "
        f"keys: {sorted(data)[:12]}"
    )


def _diffusers_config(d: dict[str, Any]) -> WanVAEConfig:
    """AutoencoderKLWan fields (its defaults where absent); the Wan-2.2 variants are refused."""
    if d.get("is_residual") or d.get("patch_size") not in (None, 1) or d.get("z_dim", 16) == 48:
        raise ValueError("this is a Wan-2.2 VAE (is_residual / patch_size / z_dim 48); only Wan-2.1's is supported")
    if d.get("attn_scales"):
        raise ValueError(f"attn_scales={d['attn_scales']} is not supported (Wan-2.1 has attention only in the middle)")
    base = d.get("base_dim", 96)
    if d.get("decoder_base_dim") not in (None, base):
        raise ValueError(f"decoder_base_dim={d['decoder_base_dim']} differs from base_dim={base}")
    if d.get("in_channels", 3) != 3 or d.get("out_channels", 3) != 3:
        raise ValueError(f"in/out_channels must be 3 (RGB), got {d.get('in_channels')}/{d.get('out_channels')}")
    return WanVAEConfig(
        dim=base,
        z_dim=d.get("z_dim", 16),
        dim_mult=d.get("dim_mult", (1, 2, 4, 4)),
        num_res_blocks=d.get("num_res_blocks", 2),
        temperal_downsample=d.get("temperal_downsample", (False, True, True)),
        latents_mean=d.get("latents_mean", WAN21_LATENTS_MEAN),
        latents_std=d.get("latents_std", WAN21_LATENTS_STD),
    )


def diffusers_vae_config_json(cfg: WanVAEConfig) -> dict[str, Any]:
    """A config diffusers' AutoencoderKLWan.from_pretrained accepts."""
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temperal_downsample),
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "dcvg_wan_version": __version__,
    }


# ---- architecture from shapes ----------------------------------------------------------------
_ENC_BLOCK = re.compile(r"^encoder\.downsamples\.(\d+)\.(.+)$")


def infer_vae_config(sd: Mapping[str, torch.Tensor], path: Any = "checkpoint") -> WanVAEConfig:
    """The config official-named weights imply: a preset when the shapes match one exactly, else
    read from the encoder (the latent statistics are Wan-2.1's, so z_dim must be 16)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for preset in VAE_PRESETS.values():
        if expected_shapes(preset) == shapes:
            return preset
    try:
        dim, z_dim = shapes["encoder.conv1.weight"][0], shapes["conv2.weight"][0]
        stages: list[list[int]] = [[]]
        temporal: list[bool] = []
        blocks: dict[int, set[str]] = {}
        for k in shapes:
            if m := _ENC_BLOCK.match(k):
                blocks.setdefault(int(m[1]), set()).add(m[2])
        for i in sorted(blocks):
            if "residual.2.weight" in blocks[i]:
                stages[-1].append(shapes[f"encoder.downsamples.{i}.residual.2.weight"][0])
            elif "resample.1.weight" in blocks[i]:
                temporal.append("time_conv.weight" in blocks[i])
                stages.append([])
        fields = {
            "dim": dim, "z_dim": z_dim, "num_res_blocks": len(stages[0]),
            "dim_mult": tuple(s[-1] // dim for s in stages), "temperal_downsample": tuple(temporal),
        }  # fmt: skip
    except (KeyError, IndexError) as e:
        raise CheckpointError(
            f"{path}: cannot read the VAE architecture from its weights (missing {e}); pass preset=. "
            f"{best_vae_preset_message(sd)}"
        ) from None
    if z_dim != 16:
        raise CheckpointError(
            f"{path}: a {z_dim}-channel VAE without a config.json has no latent mean/std; pass preset= or "
            f"save it with a config. {best_vae_preset_message(sd)}"
        )
    try:
        return WanVAEConfig(**fields, latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
    except ValueError as e:
        raise CheckpointError(f"{path}: no valid Wan VAE architecture from the shapes ({e}). "
                              f"{best_vae_preset_message(sd)}") from None


@functools.lru_cache(maxsize=16)
def expected_shapes(config: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanVAE(config).state_dict().items()}


def best_vae_preset_message(sd: Mapping[str, torch.Tensor]) -> str:
    return closest_preset(sd, {name: expected_shapes(p) for name, p in VAE_PRESETS.items()})


def check_vae_state_dict(model: WanVAE, sd: Mapping[str, torch.Tensor], *, layout: str, path: Any) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys."""
    lines = key_mismatch_lines({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if not lines:
        return
    names = model.preset_names
    expected = f"preset {' / '.join(names)}" if names else f"custom {model.config.to_dict()}"
    head = (
        f"checkpoint {path} ({layout} layout) does not fit the expected Wan VAE, {expected} "
        f"(key names below in the official layout):"
    )
    raise CheckpointError("\n".join([head, *lines, f"  {best_vae_preset_message(sd)}"]))


# ---- writing -------------------------------------------------------------------------------
def save_wan_vae(
    model: WanVAE, directory: str | os.PathLike, *, layout: str = "official", dtype: torch.dtype | None = None
) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors, both staged to temp names and
    renamed at the end. layout "diffusers" writes a directory AutoencoderKLWan.from_pretrained reads."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"save_pretrained writes the 'official' or 'diffusers' layout, got {layout!r}")
    directory = Path(directory)
    sd = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout == "official":
        config = {"_class_name": "WanVAE", **model.config.to_dict(), "dcvg_wan_version": __version__}
    else:
        config = diffusers_vae_config_json(model.config)
    meta = {"format": "pt", "dcvg_wan_version": __version__}
    with staged_file(directory / WEIGHTS_NAME) as weights_tmp, staged_file(directory / CONFIG_NAME) as config_tmp:
        save_file(from_official(sd, layout), weights_tmp, metadata=meta)
        Path(config_tmp).write_text(json.dumps(config, indent=2) + "\n")
