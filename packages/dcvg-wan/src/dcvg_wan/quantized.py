"""fp8 checkpoints as ComfyUI and the community publish them, dequantized while they are read.

Many Wan users hold only fp8 files (a 14B DiT is 14 GB in fp8, 28 GB in bf16), in three forms:

* plain (`*_fp8_e4m3fn.safetensors`): float8 weights without a scale; the value is the weight;
* scaled, ComfyUI's first form (`*_fp8_scaled.safetensors`, `umt5_xxl_fp8_e4m3fn_scaled`): a
  `scaled_fp8` marker tensor and, per quantized layer, `<layer>.scale_weight` (multiplies the
  weight) and optionally `<layer>.scale_input` (the activation scale of an fp8 matmul);
* comfy_quant, its current form: per layer `<layer>.comfy_quant` (JSON bytes such as
  `{"format": "float8_e4m3fn"}`) or the same map in the file's `_quantization_metadata` header,
  with `<layer>.weight_scale` and optionally `<layer>.input_scale`.

A weight becomes `weight.float() * scale` (in fp32), cast to the compute dtype (bf16 unless
another is asked for). Activation scales are dropped: a dequantized matmul needs none, as in ComfyUI when
fp8 compute is off. Other formats (nvfp4, int8, mxfp8) are refused by name, never loaded as raw
bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcvg_wan.errors import CheckpointError

FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
DEFAULT_DTYPE = torch.bfloat16
METADATA_KEY = "_quantization_metadata"
MARKER = "scaled_fp8"
_WEIGHT_SCALES = (".weight_scale", ".scale_weight")
_INPUT_SCALES = (".input_scale", ".scale_input")
_CONFIG_SUFFIX = ".comfy_quant"


def _is_quantization_key(key: str) -> bool:
    return _is_marker(key) or key.endswith(_WEIGHT_SCALES + _INPUT_SCALES + (_CONFIG_SUFFIX,))


def is_quantized(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bool:
    """Whether `sd` holds fp8 weights or any of the quantization keys above."""
    if metadata and METADATA_KEY in metadata:
        return True
    return any(_is_quantization_key(k) or v.dtype in FP8_DTYPES for k, v in sd.items())


def file_is_quantized(path: str | os.PathLike) -> bool:
    """Whether a safetensors file holds fp8 weights or quantization keys, from its header only."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as f:
        if METADATA_KEY in (f.metadata() or {}):
            return True
        return any(_is_quantization_key(k) or f.get_slice(k).get_dtype().startswith("F8")
                   for k in f.keys())  # noqa: SIM118


def load_dtype(files: Sequence[str | os.PathLike], dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype to load `files` in: `dtype`, else bf16 for fp8 files (the file's other tensors,
    often fp16, follow the dequantized weights, so the model has one compute dtype), else None
    (as stored)."""
    if dtype is None and any(file_is_quantized(f) for f in files):
        return DEFAULT_DTYPE
    return dtype


def dequantize(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    source: Any = "checkpoint",
) -> dict[str, torch.Tensor]:
    """`sd` with every fp8 weight dequantized to `dtype` (default bf16) and the quantization keys
    removed; a state dict without them comes back unchanged. `metadata` is the safetensors header."""
    if not is_quantized(sd, metadata):
        return dict(sd)
    dtype = dtype or DEFAULT_DTYPE
    if not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise CheckpointError(f"{source}: fp8 weights dequantize to a float dtype (bf16, fp16, fp32), not {dtype}")
    out = {k: v for k, v in sd.items() if not _is_marker(k)}
    for layer, fmt in _layer_formats(out, metadata, source).items():
        if fmt not in FP8_FORMATS:
            raise CheckpointError(
                f"{source}: layer {layer!r} is quantized as {fmt!r}; only fp8 ({', '.join(FP8_FORMATS)}) "
                "checkpoints are read here. Use a bf16/fp16 or fp8 file of the same model."
            )
        weight = out.get(f"{layer}.weight")
        if weight is None:
            raise CheckpointError(f"{source}: layer {layer!r} is marked {fmt} but has no {layer}.weight")
        scale = _pop_first(out, layer, _WEIGHT_SCALES)
        for suffix in (*_INPUT_SCALES, _CONFIG_SUFFIX):
            out.pop(layer + suffix, None)
        out[f"{layer}.weight"] = _scaled(weight, scale, dtype, f"{source}: {layer}")
    for key, value in out.items():  # plain fp8 files: no scale, the stored value is the weight
        if value.dtype in FP8_DTYPES:
            out[key] = value.to(dtype)
    return out


def _is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def _layer_formats(sd: dict[str, torch.Tensor], metadata: Mapping[str, str] | None, source: Any) -> dict[str, str]:
    """{layer: format} from the header, the `.comfy_quant` tensors and the legacy scale keys."""
    formats: dict[str, str] = {}
    if metadata and METADATA_KEY in metadata:
        try:
            layers = json.loads(metadata[METADATA_KEY])["layers"]
            formats |= {name: _format_of(conf) for name, conf in layers.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{source}: unreadable {METADATA_KEY} header ({e!r})") from None
    for key in [k for k in sd if k.endswith(_CONFIG_SUFFIX)]:
        conf = sd.pop(key)
        try:
            formats[key.removesuffix(_CONFIG_SUFFIX)] = _format_of(json.loads(bytes(conf.tolist()).decode("utf-8")))
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{source}: unreadable {key} ({e!r})") from None
    for key in sd:
        for suffix in _WEIGHT_SCALES:
            if key.endswith(suffix):
                formats.setdefault(key.removesuffix(suffix), "float8_e4m3fn")  # ComfyUI reads them as e4m3fn
    # a header may name layers without the file's `model.diffusion_model.` prefix
    return {_with_prefix(sd, layer): fmt for layer, fmt in formats.items()}


def _format_of(conf: Any) -> str:
    fmt = conf.get("format") if isinstance(conf, Mapping) else conf
    if not isinstance(fmt, str):
        raise TypeError(f"no 'format' in {conf!r}")
    return fmt


def _with_prefix(sd: Mapping[str, torch.Tensor], layer: str) -> str:
    if f"{layer}.weight" in sd:
        return layer
    matches = [k.removesuffix(".weight") for k in sd if k.endswith(f".{layer}.weight")]
    return matches[0] if len(matches) == 1 else layer


def _pop_first(sd: dict[str, torch.Tensor], layer: str, suffixes: tuple[str, ...]) -> torch.Tensor | None:
    found = [sd.pop(layer + s) for s in suffixes if layer + s in sd]
    return found[0] if found else None


def _scaled(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, where: str) -> torch.Tensor:
    """weight * scale in fp32, then cast; a scale is one number or one per output row."""
    value = weight.to(torch.float32)
    if scale is None:
        return value.to(dtype)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return (value * scale.reshape(())).to(dtype)
    if weight.ndim >= 1 and scale.numel() == weight.shape[0]:
        return (value * scale.reshape(-1, *([1] * (weight.ndim - 1)))).to(dtype)
    raise CheckpointError(
        f"{where}: weight scale of shape {tuple(scale.shape)} fits neither the whole tensor nor its "
        f"{weight.shape[0]} output rows (weight {tuple(weight.shape)}); block-wise scales are not supported"
    )


__all__ = ["FP8_DTYPES", "dequantize", "file_is_quantized", "is_quantized", "load_dtype"]
