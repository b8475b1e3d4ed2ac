"""Loading and saving DC-AE-V weights in the two layouts users have on disk.

* NVIDIA's release: a `torch.save` dict (`dc-ae-v-f32t4c32-1.0-bf16.pt`) holding
  `ema_model_state_dict` = {ema_decay: state_dict} (the first entry is used, as NVIDIA's loader
  does) or `model_state_dict`. Read with `torch.load(weights_only=True)` only. Files written by
  `save_nvidia_checkpoint(..., config=)` (e.g. `dcae-v train`'s export) also hold
  `dcae_v_config`, the config as JSON text: NVIDIA's loader ignores the extra key, ours uses it
  (chunk size and scaling factor included, which the weights cannot tell).
* Ours: a directory with `config.json` + `model.safetensors` (diffusers-style), or a bare
  `.safetensors` file. Key names are the same in both layouts.

Without a config the architecture is inferred from the keys and shapes. The model is built on
the meta device and filled with `load_state_dict(..., assign=True)`: no double allocation, no
leftover key accepted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dcae_v.__about__ import __version__
from dcae_v.config import PRESETS, DCAEVConfig, get_preset
from dcae_v.errors import CheckpointError, InputError
from dcae_v.model import DCAEV

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "dcae-v-tiny-default"
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
NVIDIA_CONFIG_KEY = "dcae_v_config"  # extra top-level key in our NVIDIA-layout .pt: DCAEVConfig as JSON text
_RUNTIME_FIELDS = ("temporal", "chunk_size", "scaling_factor")  # do not change keys or shapes


def load_dcaev(
    path: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | str | None = None,
    **overrides: Any,
) -> DCAEV:
    """Load a DC-AE-V checkpoint (see module docstring for the layouts).

    path: None for the embedded default; a `.pt`/`.pth`, a `.safetensors` file, or a directory.
    preset: architecture to expect (e.g. "f32t4c32"); by default taken from config.json or
        inferred from the weights.
    dtype: cast after loading (default: as stored, e.g. bf16 for NVIDIA's file; fp16 weights, like
        the embedded default's, load as fp32: DC-AE-V's activations overflow fp16's range, so an
        fp16 model decodes to NaN; pass dtype=torch.float16 to keep it anyway).
    torch_dtype: diffusers' name for `dtype` (either may be a torch.dtype or its name, "bfloat16"/"bf16").
    overrides: runtime config fields (`temporal`, `chunk_size`, `scaling_factor`).
    """
    dtype = as_torch_dtype(dtype, torch_dtype)
    path = Path(path) if path is not None else _default_checkpoint()
    bad = set(overrides) - set(_RUNTIME_FIELDS)
    if bad:
        raise CheckpointError(f"cannot override {sorted(bad)} when loading weights; allowed: {list(_RUNTIME_FIELDS)}")
    state_dict, config, layout = read_checkpoint(path)
    if preset is not None:
        config = get_preset(preset).replace(**_runtime(config)) if config else get_preset(preset)
    if config is None:
        config = infer_config(state_dict)
    config = config.replace(**overrides) if overrides else config
    with torch.device("meta"):
        model = DCAEV(config)
    check_state_dict(model, state_dict, layout=layout, path=path, preset=preset)
    model.load_state_dict(state_dict, assign=True, strict=True)
    if dtype is None and any(v.dtype == torch.float16 for v in state_dict.values()):
        dtype = torch.float32  # stored in fp16 to halve the file; fp16 arithmetic overflows here
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_torch_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None = None) -> torch.dtype | None:
    """`dtype` or diffusers' `torch_dtype` (not both), as a torch.dtype; names are accepted."""
    dtype, torch_dtype = _one_dtype(dtype), _one_dtype(torch_dtype)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise InputError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
    return dtype if dtype is not None else torch_dtype


def _one_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower().removeprefix("torch.")]
    raise InputError(f"dtype {value!r} is not one of torch.float32, torch.float16, torch.bfloat16 (or their names)")


def _default_checkpoint() -> Path:
    if not (DEFAULT_CHECKPOINT / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"the embedded default checkpoint is missing from {DEFAULT_CHECKPOINT}; reinstall dcae-v "
            f"or pass --checkpoint with NVIDIA's dc-ae-v-*.pt or a save_pretrained directory"
        )
    return DEFAULT_CHECKPOINT


def _runtime(config: DCAEVConfig | None) -> dict[str, Any]:
    return {} if config is None else {k: getattr(config, k) for k in _RUNTIME_FIELDS}


# ---- reading -------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], DCAEVConfig | None, str]:
    """(state_dict, config or None, layout name) from any supported checkpoint path."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if path.is_dir():
        return _read_directory(path)
    if path.suffix == ".safetensors":
        config_file = path.parent / CONFIG_NAME
        if path.name == WEIGHTS_NAME and config_file.is_file():
            config = _read_config(config_file)
        else:
            config = _config_from_metadata(path)
        return _read_safetensors(path), config, "safetensors file"
    if path.suffix in _TORCH_SUFFIXES:
        obj = _load_torch(path)
        if is_training_state(obj):
            return training_state_weights(obj, path)
        config = _config_from_torch(obj, path)
        return extract_state_dict(obj, path), config, "NVIDIA .pt" + (" with dcae_v_config" if config else "")
    raise CheckpointError(
        f"{path}: unknown checkpoint type {path.suffix!r}; expected a .pt/.pth file (NVIDIA), "
        f"a .safetensors file, or a directory with {CONFIG_NAME} + {WEIGHTS_NAME}"
    )


def _read_directory(path: Path) -> tuple[dict[str, torch.Tensor], DCAEVConfig, str]:
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(
            f"{path} is not a DC-AE-V checkpoint directory: missing {', '.join(missing)} (found: {found or 'nothing'})"
        )
    return _read_safetensors(path / WEIGHTS_NAME), _read_config(path / CONFIG_NAME), "dcae-v directory"


def _read_config(path: Path) -> DCAEVConfig:
    try:
        data = json.loads(path.read_text())
        return DCAEVConfig.from_dict(data)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid DC-AE-V config: {e}") from None


def _config_from_metadata(path: Path) -> DCAEVConfig | None:
    """`save_pretrained` also stores the config in the weights file, so a copied file keeps it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("config")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); the file may be truncated or not safetensors") from None
    if not text:
        return None
    try:
        return DCAEVConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the config stored in its metadata is invalid: {e}") from None


def _config_from_torch(obj: Any, path: Path) -> DCAEVConfig | None:
    text = obj.get(NVIDIA_CONFIG_KEY) if isinstance(obj, Mapping) else None
    if text is None:
        return None
    try:
        return DCAEVConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the config stored under {NVIDIA_CONFIG_KEY!r} is invalid: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); the file may be truncated or not safetensors") from None


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for corrupt/foreign pickles
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {str(e).splitlines()[0]}. "
            f"Only plain tensor checkpoints such as NVIDIA's dc-ae-v-*.pt are supported."
        ) from None


def is_training_state(obj: Any) -> bool:
    """A `dcae-v train` full-state checkpoint (`checkpoints/step_N.pt`)."""
    return isinstance(obj, Mapping) and {"model", "optimizer", "config", "step"} <= set(obj)


def training_state_weights(obj: Mapping, path: Path) -> tuple[dict[str, torch.Tensor], DCAEVConfig, str]:
    """The EMA weights of a training checkpoint (the model's when EMA is off), with the
    architecture its run config names (chunk size included, which weights alone do not tell)."""
    from dcae_v.train.config import from_dict

    try:
        config = from_dict(dict(obj["config"])).model.build_config()
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the run config stored in this training checkpoint is invalid: {e}") from None
    ema = obj.get("ema")
    which = "EMA" if ema else "model"
    return extract_state_dict(ema or obj["model"], path), config, f"dcae-v train step {obj['step']} ({which} weights)"


def extract_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """NVIDIA layout -> flat state dict: EMA weights first, then model weights, then a bare dict."""
    if isinstance(obj, Mapping) and "ema_model_state_dict" in obj:
        ema = obj["ema_model_state_dict"]
        if not isinstance(ema, Mapping) or not ema:
            raise CheckpointError(f"{path}: ema_model_state_dict is empty or not a dict")
        sd = next(iter(ema.values()))  # {ema_decay: state_dict}; NVIDIA takes the first entry
    elif isinstance(obj, Mapping) and "model_state_dict" in obj:
        sd = obj["model_state_dict"]
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no state dict found (expected 'ema_model_state_dict' or 'model_state_dict' "
            f"or a flat name->tensor dict; top level has {keys})"
        )
    return _strip_prefix(dict(sd))


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (`module.`, `_orig_mod.`, `model.`) shared by every key."""
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# ---- architecture inference and key checks -------------------------------------------------
_STAGE_KEY = re.compile(r"^encoder\.stages\.(\d+)\.op_list\.(\d+)\.main\.conv1\.conv\.weight$")


def infer_config(sd: Mapping[str, torch.Tensor]) -> DCAEVConfig:
    """Architecture from key names and shapes; a known preset when one matches exactly."""
    try:
        depths_by_stage: dict[int, int] = {}
        widths_by_stage: dict[int, int] = {}
        for key, value in sd.items():
            m = _STAGE_KEY.match(key)
            if m:
                stage, block = int(m[1]), int(m[2])
                depths_by_stage[stage] = max(depths_by_stage.get(stage, 0), block + 1)
                widths_by_stage[stage] = value.shape[0]
        n = max(depths_by_stage) + 1
        depths = tuple(depths_by_stage.get(i, 0) for i in range(n))
        widths = tuple(widths_by_stage.get(i, widths_by_stage[min(widths_by_stage)]) for i in range(n))
        latent = sd["encoder.project_out.conv.weight"].shape[0]
        config = DCAEVConfig(latent_channels=latent, widths=widths, depths=depths)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(
            f"could not infer a DC-AE-V architecture from the checkpoint keys ({e}); "
            f"{_best_preset_message(sd)}. Pass preset= explicitly."
        ) from None
    for preset in PRESETS.values():
        if preset.latent_channels == latent and preset.depths == depths and _active(preset) == _active(config):
            return preset
    return config


def _active(cfg: DCAEVConfig) -> tuple[int, ...]:
    return tuple(cfg.widths[i] for i in cfg.active_stages)


def expected_shapes(config: DCAEVConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DCAEV(config).state_dict().items()}


def check_state_dict(
    model: DCAEV, sd: Mapping[str, torch.Tensor], *, layout: str = "", path: Any = "", preset: str | None = None
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys, with the best preset.

    preset: the name the user asked for, shown as typed (several presets share an fXtYcZ name).
    """
    lines = key_mismatch_lines({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if lines:
        name = model.config.name if preset in (None, model.config.name) else f"preset {preset!r} ({model.config.name})"
        head = f"checkpoint {path} ({layout}) does not fit DC-AE-V {name}:"
        raise CheckpointError("\n".join([head, *lines, f"  {_best_preset_message(sd)}"]))


def key_mismatch_lines(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor], shown: int = 8) -> list[str]:
    """Readable lines on missing, unexpected and mis-shaped keys (empty when the keys fit).
    Shared with dcvg-wan's loader, so every package reports a bad checkpoint the same way."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {s}" for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f"\n    ... and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"  {len(items)} {title} key(s):\n    " + "\n    ".join(items[:shown]) + more)
    return lines


def closest_preset(sd: Mapping[str, torch.Tensor], candidates: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
    """'closest preset: NAME (...)': the candidate with the largest share of keys matching in
    name and shape (ties go to the first listed)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    scores = []
    for i, (name, exp) in enumerate(candidates.items()):
        hits = sum(1 for k, s in exp.items() if shapes.get(k) == s)
        scores.append((hits / max(len(exp), len(shapes), 1), -i, name, hits, len(exp)))
    _, _, name, hits, total = max(scores)
    return f"closest preset: {name} ({hits}/{total} of its keys match in name and shape; the checkpoint has {len(shapes)} keys)"


def _best_preset_message(sd: Mapping[str, torch.Tensor]) -> str:
    return closest_preset(sd, {name: expected_shapes(p) for name, p in PRESETS.items()})


def describe_checkpoint(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Layout, architecture, parameter count and dtypes of a checkpoint, and whether it loads."""
    path = Path(path) if path is not None else _default_checkpoint()
    sd, config, layout = read_checkpoint(path)
    config = config or infer_config(sd)
    preset = next((n for n, p in PRESETS.items() if expected_shapes(p) == expected_shapes(config)), None)
    with torch.device("meta"):
        model = DCAEV(config)
    try:
        check_state_dict(model, sd, layout=layout, path=path)
        fits = "yes: every key matches in name and shape"
    except CheckpointError as e:
        fits = str(e)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    return {
        "path": str(path), "layout": layout, "architecture": config.name, "preset": preset,
        "parameters": sum(v.numel() for v in sd.values()), "keys": len(sd), "dtypes": dtypes,
        "loads": fits, "config": config.to_dict(),
    }


# ---- writing -------------------------------------------------------------------------------
def save_pretrained(model: DCAEV, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors: both are written to temp names first, then renamed, so an
    interruption while writing leaves the previous pair intact (the two renames at the end are
    separate steps; the weights also carry the config in their metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "dcae_v_version": __version__, "config": model.config.to_json()}
    config = model.config.to_dict() | {"_class_name": "DCAEV", "_library_version": __version__}
    with staged_file(directory / WEIGHTS_NAME) as weights_tmp, staged_file(directory / CONFIG_NAME) as config_tmp:
        save_file(sd, weights_tmp, metadata=meta)
        Path(config_tmp).write_text(json.dumps(config, indent=2) + "\n")


def save_nvidia_checkpoint(
    path: str | os.PathLike,
    model_state_dict: Mapping[str, torch.Tensor],
    ema_state_dict: Mapping[str, torch.Tensor] | None = None,
    ema_decay: float = 0.9999,
    config: DCAEVConfig | None = None,
) -> None:
    """Write NVIDIA's `.pt` layout (loadable by their loader and by `load_dcaev`).

    config: stored as JSON text under `dcae_v_config` (a plain string, so `weights_only=True`
    loads it and NVIDIA's loader, which reads only the state-dict keys, is unaffected); `load_dcaev`
    then builds this exact architecture (chunk size, temporal mode, scaling factor) instead of
    inferring a preset from the weights."""
    obj: dict[str, Any] = {"model_state_dict": dict(model_state_dict)}
    if ema_state_dict is not None:
        obj["ema_model_state_dict"] = {ema_decay: dict(ema_state_dict)}
    if config is not None:
        obj[NVIDIA_CONFIG_KEY] = config.to_json()
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def staged_file(target: Path):
    """Yield a temp path next to `target`; on success it replaces `target`, on error it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic(target: Path, write) -> None:
    """Write `target` through `write(temp_path)` so readers never see a partial file."""
    with staged_file(target) as tmp:
        write(tmp)
