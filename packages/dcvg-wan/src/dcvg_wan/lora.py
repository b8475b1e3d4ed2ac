"""Wan-2.1 LoRA files (ComfyUI, kohya/musubi, diffusers, peft) merged into a `WanModel`.

People who run Wan today apply LoRAs from several trainers; each writes other key names for the
same layers. A file is read into (official module name -> parts) and merged into the weights as
ComfyUI does: W += strength * alpha / rank * up @ down, plus `.diff` (a full weight delta) and
`.diff_b` (a bias delta) that step-distillation LoRAs carry. Merging (not a peft wrapper) keeps
sampling at the base model's speed and works with offloading and FSDP. Every key must land on a
layer of the model: a LoRA for another model is an error that names the keys, never a partial
silent load.

Names understood (after an optional `diffusion_model.`, `model.diffusion_model.`, `transformer.`,
`base_model.model.` or `dit.` prefix): official/ComfyUI module paths (`blocks.0.self_attn.q`),
diffusers paths (`blocks.0.attn1.to_q`, via `layouts.diffusers`) and kohya's flattened ones
(`lora_unet_blocks_0_self_attn_q`); parts `lora_A`/`lora_down`/`lora.down`, `lora_B`/`lora_up`/
`lora.up`, `alpha`, `diff`, `diff_b`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.layouts import diffusers as diffusers_layout

PARTS = {
    ".lora_A.weight": "down", ".lora_down.weight": "down", ".lora.down.weight": "down",
    ".lora_B.weight": "up", ".lora_up.weight": "up", ".lora.up.weight": "up",
    ".lora_B.bias": "up_bias",  # diffusers/peft `lora_bias` (diffusers' form of ComfyUI's diff_b)
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "dit.")
KOHYA = "lora_unet_"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors header with the peft config
DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


@dataclass
class LoraReport:
    """What a merge changed: for the CLI's note."""

    path: str
    strength: float
    layers: list[str] = field(default_factory=list)  # modules given a low-rank update
    diffs: list[str] = field(default_factory=list)  # modules given a full weight/bias delta
    skipped: list[str] = field(default_factory=list)  # all-zero norm deltas (as diffusers skips them)

    def note(self) -> str:
        extra = f", {len(self.diffs)} weight/bias deltas" if self.diffs else ""
        return f"LoRA {self.path or '(a state dict)'} (strength {self.strength:g}): {len(self.layers)} layers{extra}"


def lora_weights_file(path: str | os.PathLike) -> Path:
    """The weights file of a LoRA given as a file or as diffusers'/peft's folder."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in DIFFUSERS_FILES if (p / name).is_file()]
        if not found:
            raise InputError(f"--lora {p}: a folder must hold one of {', '.join(DIFFUSERS_FILES)}")
        p = found[0]
    return p


# `dcvg-wan adapt` writes its merged DiT with the digests of the LoRA files it also writes, so that
# `generate --dit OUT/model --lora OUT/adapter` is refused instead of applying the LoRA twice
MERGED_RECORD = "merged_loras.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_merged_loras(dit_dir: str | os.PathLike, loras: Iterable[str | os.PathLike]) -> None:
    """Note in `dit_dir` that its weights already hold these LoRAs (by content digest)."""
    files = [lora_weights_file(p) for p in loras]
    record = {"note": "these LoRAs are merged into this DiT's weights; do not apply them again",
              "sha256": {str(f): file_digest(f) for f in files}}
    (Path(dit_dir) / MERGED_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def check_not_merged(dit_path: str | os.PathLike, lora_path: str | os.PathLike) -> None:
    """Refuse a LoRA whose file is recorded as already merged into the DiT at `dit_path`."""
    record_file = Path(dit_path) / MERGED_RECORD
    if not record_file.is_file():
        return
    try:
        merged = json.loads(record_file.read_text()).get("sha256", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    if file_digest(lora_weights_file(lora_path)) in set(merged.values()):
        raise InputError(f"--lora {lora_path} is already merged into the DiT {dit_path} (its {MERGED_RECORD} records "
                         "it: dcvg-wan adapt writes the merged model and the LoRA); drop --lora, or apply it to the "
                         "model without it")


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors LoRA file, or a folder holding diffusers'/peft's weights file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    p = lora_weights_file(path)
    if not p.is_file():
        raise InputError(f"--lora {p}: no such file")
    if p.suffix != ".safetensors":
        raise InputError(f"--lora {p}: LoRAs are read from .safetensors files (convert a .pt/.ckpt first)")
    try:
        state = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"--lora {p}: cannot read it as safetensors ({e})") from None
    if not state:
        raise CheckpointError(f"--lora {p}: the file holds no tensors")
    config = p.parent / "adapter_config.json"
    if p.name == "adapter_model.safetensors" and config.is_file():
        try:
            peft_config = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"--lora: cannot read {config}: {e}") from None
        state = _with_alpha(state, peft_config, str(config))
    elif metadata.get(DIFFUSERS_METADATA):  # diffusers' save_lora_weights(..., *_lora_adapter_metadata=)
        try:
            raw = json.loads(metadata[DIFFUSERS_METADATA])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"--lora {p}: unreadable {DIFFUSERS_METADATA} header ({e})") from None
        state = _with_alpha(state, {k.rpartition(".")[2] if k.startswith("transformer.") else k: v
                                    for k, v in raw.items()}, f"{p} ({DIFFUSERS_METADATA})")
    return state


def _with_alpha(state: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, torch.Tensor]:
    """peft (adapter_config.json) and diffusers (the file's lora_adapter_metadata) keep lora_alpha
    and r beside the weights, not in them: add the alpha per layer (else the update would be off by
    alpha / rank)."""
    if config.get("use_rslora") or config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_dora"):
        raise CheckpointError(f"--lora {source}: rsLoRA, DoRA and per-layer rank/alpha patterns are not supported; "
                              "merge the adapter with peft (merge_and_unload) first")
    if "lora_alpha" not in config:
        return state
    alpha = torch.tensor(float(config["lora_alpha"]))
    out = dict(state)
    for key in state:
        if key.endswith(".lora_A.weight"):
            out[key.removesuffix(".lora_A.weight") + ".alpha"] = alpha
    return out


def _split(key: str) -> tuple[str, str]:
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise CheckpointError(f"unrecognised LoRA key {key!r}: expected a module name followed by one of "
                          f"{', '.join(PARTS)}")


def _module_name(raw: str, kohya_names: dict[str, str], modules: set[str]) -> str | None:
    """The official module path of a LoRA key's module part, or None."""
    name = raw
    for prefix in PREFIXES:
        name = name.removeprefix(prefix)
    if name.startswith(KOHYA):
        return kohya_names.get(name[len(KOHYA):])
    if name in modules:
        return name
    official = diffusers_layout.to_official({name + ".weight": None})
    renamed = next(iter(official)).removesuffix(".weight")
    return renamed if renamed in modules else None


def group_lora(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{official module name: {"down", "up", "alpha", "diff", "diff_b"}} for a LoRA state dict.
    Raises CheckpointError naming the keys that match no layer of `model`."""
    modules = {name for name, _ in model.named_modules() if name}
    kohya_names = {name.replace(".", "_"): name for name in modules}
    for name in modules:  # kohya-flattened diffusers names too ("blocks_0_attn1_to_q")
        theirs = next(iter(diffusers_layout.from_official({name + ".weight": None}))).removesuffix(".weight")
        kohya_names.setdefault(theirs.replace(".", "_"), name)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        raw, part = _split(key)
        name = _module_name(raw, kohya_names, modules)
        if name is None:
            unknown.append(key)
            continue
        if part in groups.setdefault(name, {}):
            raise CheckpointError(f"LoRA key {key!r}: layer {name} has its {part} twice (two naming schemes mixed)")
        groups[name][part] = value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"{len(unknown)} LoRA keys match no layer of this {type(model).__name__} "
                              f"(a LoRA for another model?): {shown}")
    for name, parts in groups.items():
        if ("down" in parts) != ("up" in parts):
            raise CheckpointError(f"LoRA layer {name} has {'down' if 'down' in parts else 'up'} but not its pair")
        if "alpha" in parts and "down" not in parts:
            raise CheckpointError(f"LoRA layer {name} has an alpha but no down/up matrices")
    return groups


@torch.no_grad()
def merge_lora(model: nn.Module, state: dict[str, torch.Tensor], strength: float = 1.0,
               path: str = "") -> LoraReport:
    """Merge a LoRA state dict into `model`'s weights (in place; see the module docstring). Every
    layer is checked before any weight changes: a refused LoRA leaves the model as it was."""
    report, updates = _plan(model, state, strength, path)
    for param, a, b, factor in updates:
        delta = a.to(param.device) if b is None else a.to(param.device) @ b.to(param.device)
        param.copy_((param.float() + factor * delta).to(param.dtype))
    return report


def check_lora(model: nn.Module, state: dict[str, torch.Tensor], path: str = "") -> LoraReport:
    """Every check of `merge_lora` without changing anything; works on a model built on the meta
    device, so that a LoRA for another model is refused before a large checkpoint loads."""
    return _plan(model, state, 1.0, path)[0]


def _plan(model: nn.Module, state: dict[str, torch.Tensor], strength: float, path: str):
    """(report, updates) of a merge: every layer checked, nothing written."""
    if not math.isfinite(strength):
        raise InputError(f"LoRA strength must be a finite number, got {strength}")
    report = LoraReport(path, strength)
    updates = []  # (parameter, delta) once everything is checked
    for name, parts in sorted(group_lora(state, model).items()):
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        scale = 1.0  # alpha / rank of the low-rank update (also scales a lora_B.bias)
        if "down" in parts:
            down, up = parts["down"].float(), parts["up"].float()
            if not isinstance(module, nn.Linear) or down.ndim != 2 or up.ndim != 2:
                raise CheckpointError(f"LoRA layer {name}: only Linear layers take a low-rank update here "
                                      f"(got {type(module).__name__}, down {tuple(down.shape)})")
            if (up.shape[0], down.shape[1]) != tuple(weight.shape) or up.shape[1] != down.shape[0]:
                raise CheckpointError(f"LoRA layer {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not "
                                      f"fit the weight {tuple(weight.shape)} (a LoRA for another model size?)")
            scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
            updates.append((weight, up, down, strength * scale))
            report.layers.append(name)
        for part, param in (("diff", weight), ("diff_b", getattr(module, "bias", None)),
                            ("up_bias", getattr(module, "bias", None))):
            if part not in parts:
                continue
            delta = parts[part].float() * (scale if part == "up_bias" else 1.0)
            if param is None or tuple(delta.shape) != tuple(param.shape):
                raise CheckpointError(f"LoRA {name}.{part}: shape {tuple(delta.shape)} does not fit "
                                      f"{None if param is None else tuple(param.shape)}")
            if not delta.any():
                report.skipped.append(f"{name}.{part}")
                continue
            updates.append((param, delta, None, strength))
            report.diffs.append(f"{name}.{part}")
    return report, updates
