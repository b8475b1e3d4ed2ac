"""The two config.json dialects of a Wan DiT: official `WanModel` and diffusers
`WanTransformer3DModel`, read into WanConfig fields and written back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcvg_wan.__about__ import __version__
from dcvg_wan.config import WanConfig
from dcvg_wan.errors import CheckpointError

OFFICIAL_IMAGE_DIM = 1280  # official MLPProj(1280, dim): CLIP ViT-H/14 width
OFFICIAL_FLF_POS_LEN = 514  # 2 x 257 CLIP tokens
_OFFICIAL_NAMES = (
    "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len", "eps"
)


def read_config(path: Path) -> dict[str, Any]:
    """WanConfig fields present in an official or a diffusers config.json."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        if data.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in data:
            return _diffusers_fields(data)
        if data.get("_class_name") == "WanModel" or "num_heads" in data:
            return _official_fields(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(
        f"{path} is not a Wan DiT config (_class_name {data.get('_class_name')!r}; expected WanModel or "
        f"WanTransformer3DModel); keys: {sorted(data)[:12]}"
    )


def _official_fields(d: dict[str, Any]) -> dict[str, Any]:
    model_type = d.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "flf2v"):
        raise ValueError(f"model_type {model_type!r} is not supported (t2v, i2v, flf2v)")
    if tuple(d.get("window_size", (-1, -1))) != (-1, -1):
        raise ValueError(f"local attention (window_size {d['window_size']}) is not supported")
    out = {k: d[k] for k in _OFFICIAL_NAMES if k in d}
    # The official WanModel leaves these out of config.json (ignore_for_config); we write them.
    out |= {k: d[k] for k in ("cross_attn_norm", "qk_norm", "image_dim", "flf_pos_len") if k in d}
    if "patch_size" in d:
        out["patch"] = tuple(d["patch_size"])
    if "model_type" in d:  # else the weights tell whether there is an image path
        out.setdefault("image_dim", None if model_type == "t2v" else OFFICIAL_IMAGE_DIM)
        out.setdefault("flf_pos_len", OFFICIAL_FLF_POS_LEN if model_type == "flf2v" else None)
    return out


def _diffusers_fields(d: dict[str, Any]) -> dict[str, Any]:
    heads, head_dim = d.get("num_attention_heads", 40), d.get("attention_head_dim", 128)
    dim = heads * head_dim
    if d.get("added_kv_proj_dim") not in (None, dim):
        raise ValueError(f"added_kv_proj_dim={d['added_kv_proj_dim']} differs from the model width {dim}")
    if d.get("rope_max_seq_len", 1024) != 1024:
        raise ValueError(f"rope_max_seq_len={d['rope_max_seq_len']} is not supported (Wan uses 1024)")
    if d.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise ValueError(f"qk_norm={d['qk_norm']!r} is not supported (rms_norm_across_heads or null)")
    out = {"dim": dim, "num_heads": heads, "qk_norm": d.get("qk_norm", "rms_norm_across_heads") is not None}
    renames = {"in_channels": "in_dim", "out_channels": "out_dim", "pos_embed_seq_len": "flf_pos_len"}
    for src in ("ffn_dim", "num_layers", "text_dim", "freq_dim", "eps", "cross_attn_norm", "image_dim", *renames):
        if src in d:
            out[renames.get(src, src)] = d[src]
    if "patch_size" in d:
        out["patch"] = tuple(d["patch_size"])
    if out.get("out_dim") is None:
        out["out_dim"] = out.get("in_dim")  # diffusers: out_channels or in_channels
    return out


def official_config_json(cfg: WanConfig) -> dict[str, Any]:
    """The official WanModel config, plus the fields it omits (its loader ignores them with a warning)."""
    d = cfg.to_dict()
    patch = d.pop("patch")
    head = {"_class_name": "WanModel", "model_type": cfg.model_type}
    return head | d | {"patch_size": patch, "dcvg_wan_version": __version__}


def diffusers_config_json(cfg: WanConfig) -> dict[str, Any]:
    """A config diffusers' WanTransformer3DModel.from_pretrained accepts (text_len is not one of its fields)."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.dim if cfg.image_dim is not None else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": cfg.flf_pos_len,
    }
