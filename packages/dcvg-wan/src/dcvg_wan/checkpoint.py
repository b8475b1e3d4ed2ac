"""Loading and saving Wan-2.1 DiT weights in the layouts users have on disk.

* official directory (Wan-AI/Wan2.1-*): `config.json` + `diffusion_pytorch_model.safetensors`,
  or shards listed by `diffusion_pytorch_model.safetensors.index.json` (its `weight_map`);
* diffusers `transformer/` directory: the same file names, diffusers key names and config;
* a single file: ComfyUI / official `.safetensors` (with or without `model.diffusion_model.`),
  or an official `.pth`.

The layout is detected from the key names. The architecture comes from `preset=`, else from
config.json (either dialect; fields the official config omits are read from shapes), else from
shapes alone. The model is built on the meta device and filled with
`load_state_dict(assign=True, strict=True)` after a check that lists every missing, unexpected
and mis-shaped key with the layout and the best-fitting preset.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dcae_v.checkpoint import closest_preset, key_mismatch_lines, staged_file
from dcvg_wan.__about__ import __version__
from dcvg_wan.config import PRESETS, WanConfig, architecture, get_preset, preset_names
from dcvg_wan.config_json import (
    diffusers_config_json,
    official_config_json,
    read_config,
)
from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.layouts import detect_layout, from_official, to_official
from dcvg_wan.model import WanModel, keeps_fp32
from dcvg_wan.quantized import dequantize, load_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def load_wan(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> WanModel:
    """Load a Wan DiT (see the module docstring for what `path` may be).

    preset: architecture to expect (e.g. "t2v-14B"); by default from config.json or the shapes.
    dtype: cast while loading, keeping the fp32 parts in fp32 (default: as stored; an fp8 file:
    bfloat16).
    The loaded model's `preset_names` lists the presets its architecture matches.
    """
    path = Path(path)
    files, config_fields = _locate(path)
    layout = detect_layout(_keys(files))
    dtype = load_dtype(files, dtype)  # an fp8 file: bf16 throughout (the fp32 parts stay fp32)
    sd = {}
    for file in files:  # one shard at a time: renamed and cast before the next is read
        sd.update(_cast(to_official(read_weight_file(file, dtype), layout), dtype))
    config = get_preset(preset) if preset is not None else resolve_config(sd, config_fields, path)
    with torch.device("meta"):
        model = WanModel(config)
    check_state_dict(model, sd, layout=layout, path=path)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()


def read_wan_config(path: str | os.PathLike) -> WanConfig:
    """The architecture of a DiT checkpoint (config.json, else the tensor shapes) without reading its
    weights: safetensors headers only (meta tensors), an official .pth memory-mapped."""
    path = Path(path)
    files, config_fields = _locate(path)
    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with _safetensors_errors(file), safe_open(str(file), framework="pt") as handle:
                shapes.update({k: torch.empty(handle.get_slice(k).get_shape(), device="meta")
                               for k in handle.keys()})  # noqa: SIM118 - safe_open is not iterable
        else:
            shapes.update(read_weight_file(file))
    return resolve_config(to_official(shapes, detect_layout(list(shapes))), config_fields, path)


# ---- finding and reading files ---------------------------------------------------------------
def _locate(path: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """(weight files, config fields from config.json or None)."""
    if not path.exists():
        raise CheckpointError(f"no Wan checkpoint at {path}: the path does not exist")
    if path.is_dir():
        files = _directory_files(path)
        config_file = path / CONFIG_NAME
        fields = read_config(config_file) if config_file.is_file() else None
        if fields is not None and len(files) == 1 and files[0].suffix == ".safetensors":
            # our own save keeps the whole config in the weights' metadata: it supplies what a
            # diffusers config.json has no field for (text_len); config.json wins where it speaks
            stored = _metadata_config(files[0]) or {}
            fields = {**{k: v for k, v in stored.items() if k not in fields}, **fields}
        return files, fields
    if path.suffix == ".safetensors":
        sibling = path.parent / CONFIG_NAME
        fields = read_config(sibling) if path.name == WEIGHTS_NAME and sibling.is_file() else _metadata_config(path)
        return [path], fields
    if path.suffix in _TORCH_SUFFIXES:
        return [path], None
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: GGUF files (llama.cpp-style quantization, e.g. city96's Wan GGUFs) are not read "
                              "here; use the .safetensors file of the same model (bf16, fp16 or ComfyUI's fp8)")
    raise CheckpointError(
        f"{path}: unknown checkpoint type {path.suffix!r}; expected a directory ({CONFIG_NAME} + {WEIGHTS_NAME} "
        f"or {INDEX_NAME} with shards), a .safetensors file or an official .pth file"
    )


def _directory_files(path: Path) -> list[Path]:
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file() and index.is_file():
        raise CheckpointError(f"{path} holds both {WEIGHTS_NAME} and {INDEX_NAME}; remove the stale one")
    if single.is_file():
        return [single]
    if index.is_file():
        return index_shards(index)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    subdirs = [p.name + "/" for p in sorted(path.iterdir()) if (p / CONFIG_NAME).is_file() and _has_weights(p)]
    hint = f"; subfolders holding a model: {subdirs} (pass one of them)" if subdirs else ""
    raise CheckpointError(
        f"no DiT weights in {path}: looked for {WEIGHTS_NAME} or {INDEX_NAME} (+ its shards); "
        f"found {found[:12] or 'nothing'}{hint}"
    )


def _has_weights(p: Path) -> bool:
    return (p / WEIGHTS_NAME).is_file() or (p / INDEX_NAME).is_file()


def index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e!r}") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{index.name} lists {len(names)} shard(s) but {len(missing)} are missing from {index.parent}: {missing}"
        )
    return [index.parent / n for n in names]


def _keys(files: list[Path]) -> list[str]:
    """All key names, read without loading tensors where the format allows."""
    keys: list[str] = []
    for f in files:
        if f.suffix == ".safetensors":
            with _safetensors_errors(f), safe_open(str(f), framework="pt") as handle:
                keys += list(handle.keys())
        else:
            keys += list(read_weight_file(f))
    return keys


def read_weight_file(file: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one file; fp8 weights (ComfyUI's plain, scaled and comfy_quant files) come
    back dequantized to `dtype` (default bf16), other tensors as stored."""
    if file.suffix == ".safetensors":
        with _safetensors_errors(file):
            sd = load_file(str(file))
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata()
        return dequantize(sd, metadata, dtype=dtype, source=file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for corrupt or foreign pickles
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {first_line}") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a flat name -> tensor dict, got {type(obj).__name__}")
    return dequantize(obj, dtype=dtype, source=file)


@contextlib.contextmanager
def _safetensors_errors(file: Path):
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file} as safetensors ({e}); the file may be truncated") from None


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(torch.float32 if keeps_fp32(k) else dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _metadata_config(path: Path) -> dict[str, Any] | None:
    """`save_pretrained` also stores our config in the weights file, so a copied file keeps it."""
    with _safetensors_errors(path), safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("dcvg_wan_config")
    if not text:
        return None
    try:
        return WanConfig.from_dict(json.loads(text)).to_dict()
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the config stored in its metadata is invalid: {e}") from None


# ---- architecture from shapes ----------------------------------------------------------------
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def shape_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The WanConfig fields that official-named weights determine (those present)."""
    out: dict[str, Any] = {}
    shape = {k: tuple(v.shape) for k, v in sd.items()}
    if len(shape.get("patch_embedding.weight", ())) == 5:
        out["dim"], out["in_dim"], *patch = shape["patch_embedding.weight"]
        out["patch"] = tuple(patch)
        if "head.head.weight" in shape:
            out["out_dim"] = shape["head.head.weight"][0] // max(1, patch[0] * patch[1] * patch[2])
    layers = {int(m[1]) for k in sd if (m := _BLOCK_INDEX.match(k))}
    if layers:
        out["num_layers"] = max(layers) + 1
    for key, field, axis in (
        ("blocks.0.ffn.0.weight", "ffn_dim", 0),
        ("text_embedding.0.weight", "text_dim", 1),
        ("time_embedding.0.weight", "freq_dim", 1),
        ("img_emb.proj.1.weight", "image_dim", 1),
        ("img_emb.emb_pos", "flf_pos_len", 1),
    ):
        if len(shape.get(key, ())) > axis:
            out[field] = shape[key][axis]
    out.setdefault("image_dim", None)
    out.setdefault("flf_pos_len", None)
    out["qk_norm"] = "blocks.0.self_attn.norm_q.weight" in sd or not layers
    out["cross_attn_norm"] = "blocks.0.norm3.weight" in sd or not layers
    return out


def resolve_config(sd: Mapping[str, torch.Tensor], json_fields: dict[str, Any] | None, path: Any) -> WanConfig:
    """config.json fields over shape-derived ones; without num_heads, the preset whose
    architecture the shapes match, else head_dim 128 as in every released Wan model."""
    fields = shape_fields(sd) | (json_fields or {})
    if "num_heads" not in fields:
        match = next((p for p in PRESETS.values() if _same_except_heads(p, fields)), None)
        if match is not None and json_fields is None:
            return match
        if match is not None:
            fields["num_heads"] = match.num_heads
        elif fields.get("dim", 1) % 128:
            raise CheckpointError(
                f"{path}: cannot infer num_heads from the weights (dim={fields.get('dim')} is not a multiple of "
                f"Wan's head_dim 128) and no config.json says it; pass preset=. {best_preset_message(sd)}"
            )
        else:
            fields["num_heads"] = fields["dim"] // 128
    try:
        return WanConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: no valid Wan architecture from config.json and shapes ({e}). {best_preset_message(sd)}"
        ) from None


def _same_except_heads(preset: WanConfig, fields: dict[str, Any]) -> bool:
    arch = architecture(preset)
    arch.pop("num_heads")
    arch["patch"] = tuple(arch["patch"])
    return all(fields.get(k, object()) == v for k, v in arch.items())


@functools.lru_cache(maxsize=32)
def expected_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}


def check_state_dict(model: WanModel, sd: Mapping[str, torch.Tensor], *, layout: str, path: Any) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys."""
    lines = key_mismatch_lines({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if not lines:
        return
    names = preset_names(model.config)
    expected_name = f"preset {' / '.join(names)}" if names else f"custom {architecture(model.config)}"
    head = (
        f"checkpoint {path} ({layout} layout) does not fit the expected Wan DiT, {expected_name} "
        f"(key names below in the official layout):"
    )
    raise CheckpointError("\n".join([head, *lines, f"  {best_preset_message(sd)}"]))


def best_preset_message(sd: Mapping[str, torch.Tensor]) -> str:
    """The preset with the largest share of keys matching in name and shape."""
    return closest_preset(sd, {name: expected_shapes(preset) for name, preset in PRESETS.items()})


# ---- writing -------------------------------------------------------------------------------
def save_pretrained(
    model: WanModel, directory: str | os.PathLike, *, layout: str = "official", dtype: torch.dtype | None = None
) -> None:
    """Write config.json (official or diffusers dialect) + diffusion_pytorch_model.safetensors.

    Both files go to temp names first and are renamed at the end, so an interruption while writing
    leaves the previous pair intact (the two renames are separate steps). The weights file also
    carries our config in its metadata.
    """
    if layout not in ("official", "diffusers"):
        hint = "; ComfyUI's layout is one file: dcvg_wan.checkpoint.save_single_file(model, 'x.safetensors')"
        raise InputError(f"save_pretrained writes the 'official' or 'diffusers' layout, got {layout!r}"
                         f"{hint if layout == 'comfy' else ''}")
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        raise CheckpointError(f"{directory} holds a sharded checkpoint ({INDEX_NAME}); save into another directory")
    directory.mkdir(parents=True, exist_ok=True)
    sd = _cast({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, dtype)
    config = official_config_json(model.config) if layout == "official" else diffusers_config_json(model.config)
    meta = {"format": "pt", "dcvg_wan_version": __version__, "dcvg_wan_config": model.config.to_json()}
    with staged_file(directory / WEIGHTS_NAME) as weights_tmp, staged_file(directory / CONFIG_NAME) as config_tmp:
        save_file(from_official(sd, layout), weights_tmp, metadata=meta)
        Path(config_tmp).write_text(json.dumps(config, indent=2) + "\n")


def save_single_file(
    model: WanModel, path: str | os.PathLike, *, layout: str = "comfy", dtype: torch.dtype | None = None
) -> None:
    """One `.safetensors` file in the ComfyUI layout (`model.diffusion_model.` + official names)
    or bare official names, with our config in its metadata; written atomically."""
    if layout not in ("comfy", "official"):
        raise ValueError(f"a single file is written in the 'comfy' or 'official' layout, got {layout!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: a single-file checkpoint must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = _cast({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, dtype)
    meta = {"format": "pt", "dcvg_wan_version": __version__, "dcvg_wan_config": model.config.to_json()}
    with staged_file(path) as tmp:
        save_file(from_official(sd, layout), tmp, metadata=meta)


def convert_checkpoint(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    layout: str,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
) -> WanModel:
    """Read a DiT in any layout and write it in `layout`: "official" or "diffusers" (a directory
    with config.json) or "comfy" (a single .safetensors file). Returns the loaded model."""
    model = load_wan(source, preset=preset, dtype=dtype)
    if layout == "comfy":
        save_single_file(model, target, layout="comfy")
    else:
        save_pretrained(model, target, layout=layout)
    return model
