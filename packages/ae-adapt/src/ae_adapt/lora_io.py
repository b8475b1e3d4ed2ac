"""LoRA through peft: add, save/load in peft format, merge, and export to the ComfyUI/kohya keys.

Export formats (what ComfyUI's LoRA loader accepts for a `diffusion_model.*` weight W of a Linear):
- "kohya":  `lora_unet_<name with . -> _>.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha`
- "comfy":  `diffusion_model.<name>.lora_A.weight` [r, in], `.lora_B.weight` [out, r], `.alpha`
Both mean W' = W + (alpha / r) * up @ down, the same scale peft uses (`lora_alpha / r`).
The LoRA applies on top of the *adapted* model (new embedder and head): those are full weights,
saved next to the adapter (`embedder.safetensors`, `head.safetensors`), not LoRA deltas.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ae_adapt.errors import AdaptError, ProtocolError
from ae_adapt.files import chmod_like_open, save_safetensors, staged_dir

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's parameter names
EXPORT_FORMATS = ("kohya", "comfy")


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | None) -> tuple[str, ...]:
    """The given target module names, else the model's `lora_target_modules()`."""
    if target_modules:
        return tuple(target_modules)
    hook = getattr(model, "lora_target_modules", None)
    if not callable(hook):
        raise ProtocolError(
            f"{type(model).__name__} has no lora_target_modules(): pass target_modules "
            "(module-name suffixes of the Linear layers to adapt, e.g. ('q', 'k', 'v', 'o'))"
        )
    return tuple(hook())


def _excluded(model: nn.Module) -> list[str]:
    """Names of the patch embedder's and output head's modules: trained in full, never a LoRA."""
    exclude = []
    for getter in ("get_patch_embedder", "get_output_head"):
        if callable(getattr(model, getter, None)):
            part = getattr(model, getter)()
            exclude += [name for name, m in model.named_modules() if any(m is s for s in part.modules())]
    return exclude


def check_targets(model: nn.Module, target_modules: Sequence[str] | None) -> tuple[str, ...]:
    """`resolve_targets`, and fail as `add_lora` would if they match no layer outside the embedder
    and head. Without touching the model, so that a multi-stage run can check before training
    (peft's rule: a target matches a module named `target` or ending in `.target`)."""
    targets = resolve_targets(model, target_modules)
    exclude = set(_excluded(model))
    names = [name for name, _ in model.named_modules() if name and name not in exclude]
    if not any(name == t or name.endswith(f".{t}") for name in names for t in targets):
        raise AdaptError(f"LoRA targets {list(targets)} match no layer of {type(model).__name__}")
    return targets


def add_lora(
    model: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str], dropout: float = 0.0
) -> nn.Module:
    """Inject peft LoRA layers in place (B = 0: the model's output is unchanged). The patch
    embedder and output head never get one: they are trained in full."""
    exclude = _excluded(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        exclude_modules=exclude or None,
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise AdaptError(
            f"LoRA targets {list(target_modules)} match no layer of {type(model).__name__}: {err}"
        ) from err
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def set_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.requires_grad_(True)


def _peft_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        raise AdaptError(f"{type(model).__name__} has no LoRA adapter to save (run lora_finetune or add_lora first)")
    return config


def _gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, FSDP2 DTensors gathered (a collective: call on every rank)."""
    out = {}
    for k, v in state.items():
        full = getattr(v, "full_tensor", None)
        out[k] = (full() if callable(full) else v).detach().cpu().contiguous().clone()
    return out


def _base_model_class(model: nn.Module) -> type:
    """The model's own class, not the subclass FSDP2's `fully_shard` swaps in."""
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    return next(c for c in type(model).__mro__ if fsdp_module is None or not issubclass(c, fsdp_module))


def save_lora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """What peft's `PeftModel.save_pretrained` writes (so `PeftModel.from_pretrained` loads it:
    keys under `base_model.model.`, `inference_mode` true, `auto_mapping` naming the model class),
    plus the new embedder/head as full weights (`embedder.safetensors`, `head.safetensors`: load
    them into the model before `PeftModel.from_pretrained`; `load_lora` does both).
    Under torchrun call it on every rank (sharded weights are gathered); rank 0 writes."""
    from ae_adapt.trainer import world

    out = Path(directory)
    config = copy.deepcopy(_peft_config(model))
    # as peft does: the model's `name_or_path` if it has one; task_type stays None (peft's task
    # types are transformers heads), which makes peft record the class in auto_mapping instead
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    adapter = _gathered(get_peft_model_state_dict(model))
    files = {ADAPTER_WEIGHTS: {PEFT_PREFIX + k: v for k, v in adapter.items()}}
    if callable(getattr(model, "get_patch_embedder", None)):
        files["embedder.safetensors"] = _gathered(model.get_patch_embedder().state_dict())
        files["head.safetensors"] = _gathered(model.get_output_head().state_dict())
    if world()[0] == 0:
        # written into a hidden folder that then takes `out`'s place: an interrupt leaves the old
        # adapter (or none), never a partial one
        with staged_dir(out) as tmp:
            for name, state in files.items():
                save_file(state, str(tmp / name), metadata={"format": "pt"})
                chmod_like_open(tmp / name)  # safetensors writes 0600 files
            cls = _base_model_class(model)
            auto_mapping = None if config.task_type else {"base_model_class": cls.__name__, "parent_library": cls.__module__}
            config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
    return out


def _adapter_weights(src: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own names: files from peft's `save_pretrained` (and
    from `save_lora`) put them under `base_model.model.`, the first `save_lora` did not."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(src / ADAPTER_WEIGHTS)).items()}


def load_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the saved adapter to `model` (whose embedder/head already have the new shapes) and load
    the adapter, embedder and head weights. Reads peft's layout and the older one without the
    `base_model.model.` prefix."""
    src = Path(directory)
    if not (src / ADAPTER_CONFIG).is_file():
        raise AdaptError(f"{src} is not a saved adapter: {ADAPTER_CONFIG} is missing")
    config = LoraConfig.from_pretrained(str(src))
    # peft saves inference_mode=True, which would freeze the injected LoRA: keep it trainable as
    # before (a later stage trains it further)
    config.inference_mode = False
    ends = _saved_ends(model, src)  # checked before anything is injected: a refusal leaves the model as it was
    if not has_lora(model):
        inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, _adapter_weights(src))
    if getattr(result, "unexpected_keys", None):
        raise AdaptError(f"adapter keys not in the model: {result.unexpected_keys[:5]}")
    missing = [k for k in getattr(result, "missing_keys", ()) if ".lora_A." in k or ".lora_B." in k]
    if missing:
        raise AdaptError(f"{src / ADAPTER_WEIGHTS} lacks LoRA weights of the model, e.g. {missing[:5]}")
    for module, state in ends:
        module.load_state_dict(state)
    return model


def _saved_ends(model: nn.Module, src: Path) -> list[tuple[nn.Module, dict]]:
    """(the model's embedder/head, the adapter's saved weights for it), refusing shapes that differ:
    the LoRA was trained on the new ends, so the model must have them first."""
    out = []
    for name, getter in (("embedder", "get_patch_embedder"), ("head", "get_output_head")):
        if not ((src / f"{name}.safetensors").is_file() and callable(getattr(model, getter, None))):
            continue
        module, state = getattr(model, getter)(), load_file(str(src / f"{name}.safetensors"))
        have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in state.items()}
        if have != saved:
            diff = next(k for k in sorted(set(have) | set(saved)) if have.get(k) != saved.get(k))
            raise AdaptError(
                f"{src / f'{name}.safetensors'} is the {name} of the adapted model ({diff}: {saved.get(diff)}), the "
                f"model's {name} has {have.get(diff)}: give the model its new ends first "
                "(model.replace_patch_embedder(in_channels, patch) and replace_output_head(out_channels, patch), or "
                "ae_adapt.stages.restore_new_ends), then load the LoRA"
            )
        out.append((module, state))
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight and put the plain layer back (in place)."""
    for name, layer in list(lora_layers(model).items()):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def _export_keys(
    name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, fmt: str, strip_prefix: str
) -> dict[str, torch.Tensor]:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown LoRA export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not name.startswith(strip_prefix):
        raise AdaptError(f"LoRA layer {name!r} does not start with strip_prefix {strip_prefix!r}")
    key = name[len(strip_prefix) :]
    base = f"lora_unet_{key.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{key}"
    names = (".lora_down.weight", ".lora_up.weight") if fmt == "kohya" else (".lora_A.weight", ".lora_B.weight")
    return {
        base + names[0]: down.detach().cpu().contiguous(),
        base + names[1]: up.detach().cpu().contiguous(),
        base + ".alpha": torch.tensor(float(alpha)),
    }


def export_lora(model: nn.Module, fmt: str = "kohya", *, strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's LoRA as a ComfyUI-loadable state dict. `strip_prefix` removes a wrapper's
    prefix so that names match the checkpoint the LoRA is applied to (Wan: "dit.")."""
    out = {}
    for name, layer in lora_layers(model).items():
        if "default" in layer.lora_A:
            out.update(
                _export_keys(
                    name,
                    layer.lora_A["default"].weight,
                    layer.lora_B["default"].weight,
                    layer.lora_alpha["default"],
                    fmt,
                    strip_prefix,
                )
            )
    return out


def wrapper_prefix(layer_names: Sequence[str]) -> str:
    """The leading module name that every LoRA layer name shares when it is a wrapper's attribute
    rather than part of the model's own layout (e.g. "dit." of dcvg-wan's `WanAdaptable`), else "".

    The rule: all names start with the same component, which is followed by a named module in
    every name (never by an index: "blocks.0..." is the model's own block list) and leaves at least
    two components. DiT layouts keep their LoRA'd Linears under numbered block lists or several
    top-level modules, so one shared named top module is a wrapper."""
    parts = [name.split(".") for name in layer_names]
    if not parts or any(len(p) < 3 for p in parts) or len({p[0] for p in parts}) != 1:
        return ""
    if any(p[1].isdigit() for p in parts):
        return ""
    return parts[0][0] + "."


def adapter_layer_names(directory: str | os.PathLike) -> list[str]:
    """The names of the LoRA'd layers of a saved adapter (model names, peft's prefix removed)."""
    from safetensors import safe_open

    src = _check_adapter_dir(directory)
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as f:
        stored = list(f.keys())  # names only: no tensor is read
    keys = [k.removeprefix(PEFT_PREFIX) for k in stored]
    return sorted(k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))


def _check_adapter_dir(directory: str | os.PathLike) -> Path:
    src = Path(directory)
    if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        raise AdaptError(f"{src} is not a saved adapter: {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} are needed")
    return src


def convert_peft_adapter(
    directory: str | os.PathLike, fmt: str = "kohya", *, strip_prefix: str | None = ""
) -> dict[str, torch.Tensor]:
    """`export_lora` from a saved peft adapter directory alone (no model needed).
    `strip_prefix=None` strips the `wrapper_prefix` of the adapter's layer names, if any."""
    src = _check_adapter_dir(directory)
    if strip_prefix is None:
        strip_prefix = wrapper_prefix(adapter_layer_names(src))
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise AdaptError(f"{src}: per-layer rank/alpha patterns and rsLoRA are not supported by the export")
    weights = _adapter_weights(src)
    out = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        name = key[: -len(".lora_A.weight")]
        out.update(
            _export_keys(name, weights[key], weights[f"{name}.lora_B.weight"], config["lora_alpha"], fmt, strip_prefix)
        )
    return out


def save_export(model: nn.Module, path: str | os.PathLike, fmt: str = "kohya", *, strip_prefix: str = "") -> Path:
    """`export_lora` written to `path` (atomically, with ordinary permissions)."""
    return save_safetensors(export_lora(model, fmt, strip_prefix=strip_prefix), path)


def apply_exported_lora(
    model: nn.Module, state: dict[str, torch.Tensor], *, strength: float = 1.0, add_prefix: str = ""
) -> list[str]:
    """Merge an exported (kohya or comfy keys) LoRA into `model`'s Linear weights, as ComfyUI does:
    W += strength * alpha / r * up @ down. Returns the module names changed; unknown keys raise."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_key = {}
    for name in linears:
        if name.startswith(add_prefix):
            key = name[len(add_prefix) :]
            by_key[f"lora_unet_{key.replace('.', '_')}"] = name
            by_key[f"diffusion_model.{key}"] = name
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        for suffix, role in (
            (".lora_down.weight", "down"),
            (".lora_A.weight", "down"),
            (".lora_up.weight", "up"),
            (".lora_B.weight", "up"),
            (".alpha", "alpha"),
        ):
            if k.endswith(suffix):
                groups.setdefault(k[: -len(suffix)], {})[role] = v
                break
        else:
            raise AdaptError(f"unrecognised LoRA key {k!r} (expected kohya lora_down/lora_up or lora_A/lora_B)")
    changed = []
    for base, parts in groups.items():
        if base not in by_key:
            raise AdaptError(f"LoRA key {base!r} matches no Linear layer of {type(model).__name__}")
        if "down" not in parts or "up" not in parts:
            raise AdaptError(f"LoRA {base!r} lacks its down/up (A/B) matrix")
        layer = linears[by_key[base]]
        down, up = parts["down"].float(), parts["up"].float()
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        with torch.no_grad():
            delta = strength * scale * (up @ down)
            layer.weight.add_(delta.to(layer.weight.device, layer.weight.dtype))
        changed.append(by_key[base])
    return changed
