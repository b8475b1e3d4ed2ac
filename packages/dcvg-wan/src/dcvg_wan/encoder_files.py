"""Finding, reading and strictly loading the weights of the text and image encoders.

Both encoders are transformers models filled from a state dict in transformers' key names:
built on the meta device, checked key by key (the same report as the DiT loader), then loaded
with `assign=True`, so a 5 B-parameter umT5 is never initialised twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from dcae_v.checkpoint import key_mismatch_lines
from dcvg_wan.checkpoint import index_shards, read_weight_file
from dcvg_wan.errors import CheckpointError
from dcvg_wan.quantized import load_dtype

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def hf_weight_files(directory: Path) -> list[Path] | None:
    """The weight files of a transformers `save_pretrained` directory, or None if it has none."""
    for index in HF_INDEXES:
        if (directory / index).is_file():
            return index_shards(directory / index)
    for name in HF_WEIGHTS:
        if (directory / name).is_file():
            return [directory / name]
    return None


def is_hf_directory(directory: Path) -> bool:
    return (directory / HF_CONFIG).is_file() and hf_weight_files(directory) is not None


def read_weights(files: Iterable[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of `files`, floating ones cast to `dtype` file by file (peak memory: one shard).
    Without `dtype`, an fp8 file loads in bf16 throughout (its dequantized weights' dtype)."""
    files = [Path(f) for f in files]
    dtype = load_dtype(files, dtype)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(cast(read_weight_file(f, dtype), dtype))
    return sd


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop the first of `prefixes` that every key carries (wrappers such as `module.`)."""
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def locate_weights(path: Path, *, what: str, subfolder: str, official_file: str, official_dir: str):
    """(weight files, directory holding a transformers config.json or None) for an encoder given as
    a weights file, a transformers directory, a diffusers pipeline directory (`subfolder/`) or an
    official Wan2.1 checkpoint directory (`official_file` inside)."""
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        return [path], None
    if path.is_dir():
        for d in (path, path / subfolder):
            if is_hf_directory(d):
                return hf_weight_files(d), d
        if (path / official_file).is_file():
            return [path / official_file], None
    raise not_found(
        what,
        path,
        [
            f"a weights file ({', '.join(WEIGHT_SUFFIXES)}), e.g. the official {official_file}",
            "a transformers directory: config.json + model.safetensors (or its index + shards) or pytorch_model.bin",
            f"the same in the {subfolder}/ subfolder (diffusers pipeline directory)",
            f"{official_file} inside the directory ({official_dir})",
        ],
    )


def not_found(what: str, path: Path, looked_for: Iterable[str]) -> CheckpointError:
    """The error for a path that holds none of the files an encoder can load."""
    where = f"in {path}" if path.is_dir() else f"at {path}"
    found = ""
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        found = f"; the directory holds {names[:12] or 'nothing'}"
    elif not path.exists():
        found = "; the path does not exist"
    items = "\n  ".join(looked_for)
    return CheckpointError(f"no {what} {where}{found}. Looked for:\n  {items}")


def load_strict(
    build: Callable[[], torch.nn.Module],
    sd: dict[str, torch.Tensor],
    *,
    what: str,
    path: Path,
    layout: str,
    tied: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build with `build()` on meta, check `sd` against it, load with `assign=True`.

    tied: {alias key: source key} for weights the model shares (e.g. umT5's token embedding);
    the alias is neither required nor allowed in `sd` and is re-tied after loading.
    """
    tied = dict(tied or {})
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    lines = key_mismatch_lines(expected, sd)
    if lines:
        head = f"{path} ({layout} layout) does not fit the expected {what} (key names in transformers' layout):"
        raise CheckpointError("\n".join([head, *lines]))
    full = dict(sd)
    for alias, source in tied.items():
        full[alias] = sd[source]
    model.load_state_dict(full, strict=True, assign=True)
    for alias, source in tied.items():
        _set_param(model, alias, model.get_parameter(source))
    _materialize_buffers(model)
    return model.to(device).eval().requires_grad_(False)


def _set_param(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, param)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers are not in any file: rebuild the ones transformers uses (position ids)."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} was left on the meta device and has no rule to rebuild it")
        owner, _, leaf = name.rpartition(".")
        ids = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
        model.get_submodule(owner).register_buffer(leaf, ids, persistent=False)
