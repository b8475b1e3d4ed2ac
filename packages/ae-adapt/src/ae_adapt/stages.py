"""The AE-Adapt-V stages (DC-VideoGen §3.3.2), each a resumable function over any `AdaptableDiT`.

1. `align_embedder`: the base model stays frozen; a new, randomly initialised patch embedder
   (the paper's choice) learns to map the new latent to the base embedder's tokens of the same
   clip, average-pooled onto the new token grid (MSE, eq. 2).
2. `align_head`: a new output head and the aligned embedder train on the diffusion loss with
   every other parameter frozen, until the loss plateaus.
3. `lora_finetune`: LoRA (peft) on the blocks plus the embedder and head, end to end; called
   again on higher-resolution data for the resolution-increase stages.

Defaults are Table 8 (`PRESETS`); every field can be overridden with `dataclasses.replace`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ae_adapt.errors import PresetError, ShapeError
from ae_adapt.flow import diffusion_loss
from ae_adapt.protocol import Grid, check_adaptable
from ae_adapt.trainer import DONE, TrainConfig, Trainer, TrainResult, world

# Batch keys that are latents (everything else is conditioning for forward_from_embeddings).
LATENT_KEYS = ("base", "new", "base_y", "new_y")
EMBEDDER_FILE, HEAD_FILE = "embedder.safetensors", "head.safetensors"


@dataclass(frozen=True, kw_only=True)
class AdaptPreset:
    """Hyper-parameters of all stages (Table 8 for the Wan presets)."""

    embedder: TrainConfig
    head: TrainConfig
    lora: TrainConfig
    lora_rank: int = 256
    lora_alpha: int = 512
    lora_targets: tuple[str, ...] | None = None  # None: the model's `lora_target_modules()`
    # Resolution increase: (name, optimizer steps); each runs `lora` with these steps, no warm-up.
    resolution: tuple[tuple[str, int], ...] = (("480px-720px", 1000), ("720px-1080px", 500), ("1080px-2160px", 200))
    flow_shift: float = 1.0  # timestep shift for training noise levels (not given by the paper)

    def replace(self, **overrides: Any) -> AdaptPreset:
        return dataclasses.replace(self, **overrides)

    def resolution_config(self, steps: int) -> TrainConfig:
        return self.lora.replace(steps=steps, warmup_steps=0)


_BETAS = (0.9, 0.999)
# Table 8 lists no weight decay for the two alignment stages: none is used there.
_EMBEDDER = TrainConfig(lr=1e-4, warmup_steps=0, batch_size=4, steps=20_000, betas=_BETAS)
_HEAD = TrainConfig(
    lr=1e-4, warmup_steps=0, batch_size=32, steps=4_000, betas=_BETAS, plateau_patience=200, plateau_min_delta=1e-3
)
_LORA = TrainConfig(lr=5e-5, warmup_steps=1_000, batch_size=32, steps=20_000, betas=_BETAS, weight_decay=1e-3)

PRESETS: dict[str, AdaptPreset] = {
    "wan-1.3B": AdaptPreset(embedder=_EMBEDDER, head=_HEAD, lora=_LORA),
    "wan-14B": AdaptPreset(embedder=_EMBEDDER, head=_HEAD.replace(steps=3_000), lora=_LORA.replace(steps=6_000)),
    # Tiny, for tests and smoke runs on CPU.
    "debug": AdaptPreset(
        embedder=_EMBEDDER.replace(lr=1e-2, batch_size=4, steps=20, progress=False),
        head=_HEAD.replace(lr=3e-3, batch_size=4, steps=20, plateau_patience=None, progress=False),
        lora=_LORA.replace(lr=1e-3, batch_size=4, steps=10, warmup_steps=2, progress=False),
        lora_rank=4,
        lora_alpha=8,
        resolution=(("debug-up", 2),),
    ),
}


def get_preset(name: str, **overrides: Any) -> AdaptPreset:
    if name not in PRESETS:
        raise PresetError(f"unknown ae-adapt preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ---- losses as modules (so that FSDP2 sees one forward per micro-batch) ------------------------
def _input(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    x, y = batch[key], batch.get(f"{key}_y")
    return x if y is None else torch.cat([x, y.to(x.dtype)], dim=1)


def pool_tokens(tokens: torch.Tensor, grid: Grid, target: Grid) -> torch.Tensor:
    """Average-pool tokens [B, prod(grid), D] laid out over `grid` onto the coarser `target` grid."""
    if len(grid) != len(target) or any(t > g for g, t in zip(grid, target)):
        raise ShapeError(
            f"the new token grid {tuple(target)} must not be finer than the base grid {tuple(grid)} "
            "in any dimension: the base tokens are average-pooled onto it"
        )
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    return pool(x, tuple(target)).flatten(2).transpose(1, 2)


class EmbedderAlignTask(nn.Module):
    """Stage 1 loss: MSE(new_embedder(new latent), avgpool(base_embedder(base latent)))."""

    def __init__(self, model: nn.Module, base_embedder: nn.Module):
        super().__init__()
        self.model, self.base_embedder = model, base_embedder

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            base, base_grid = self.base_embedder(_input(batch, "base"))
        new, new_grid = self.model.patch_embed(_input(batch, "new"))
        return F.mse_loss(new.float(), pool_tokens(base.float(), base_grid, new_grid))


class DiffusionTask(nn.Module):
    """Stages 2 and 3 loss: flow matching on the new latent (conditioning from the batch)."""

    def __init__(self, model: nn.Module, shift: float = 1.0):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        cond = {k: v for k, v in batch.items() if k not in LATENT_KEYS}
        return diffusion_loss(self.model, batch["new"], generator, y=batch.get("new_y"), shift=self.shift, **cond)


# ---- the stages -------------------------------------------------------------------------------
def _fresh(seed: int, build):
    """Build a new module under a seeded, forked RNG (reproducible, no side effect)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _units(model: nn.Module) -> Sequence[nn.Module]:
    units = getattr(model, "fsdp_units", None)
    return units() if callable(units) else ()


def align_embedder(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    in_channels: int,
    patch: Sequence[int],
    fingerprint: dict[str, Any] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Stage 1. Replaces `model`'s patch embedder by one for the new latent and aligns it; writes
    `run_dir/embedder.safetensors`. `data` yields "base" and "new" latents of the same clips."""
    check_adaptable(model)
    base_embedder = copy.deepcopy(model.get_patch_embedder()).requires_grad_(False).eval()
    model.requires_grad_(False)
    embedder = _fresh(cfg.seed, lambda: model.replace_patch_embedder(in_channels, tuple(patch)))
    embedder.requires_grad_(True)
    fp = {"in_channels": in_channels, "patch": list(patch), **(fingerprint or {})}
    trainer = Trainer(
        EmbedderAlignTask(model, base_embedder),
        data,
        cfg,
        run_dir,
        stage="align_embedder",
        fingerprint=fp,
        fsdp_units=_units(model),
    )
    result = trainer.fit(stop_at=stop_at)
    _save_module(embedder, Path(run_dir) / EMBEDDER_FILE, trainer.rank)
    return result


def align_head(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    out_channels: int,
    patch: Sequence[int],
    shift: float = 1.0,
    fingerprint: dict[str, Any] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Stage 2. Replaces the output head and trains it with the (aligned) embedder on the diffusion
    loss; every other parameter stays frozen. Stops at `cfg.steps` or on a loss plateau."""
    check_adaptable(model)
    model.requires_grad_(False)
    head = _fresh(cfg.seed + 1, lambda: model.replace_output_head(out_channels, tuple(patch)))
    embedder = model.get_patch_embedder()
    embedder.requires_grad_(True)
    head.requires_grad_(True)
    fp = {"out_channels": out_channels, "patch": list(patch), "shift": shift, **(fingerprint or {})}
    trainer = Trainer(
        DiffusionTask(model, shift), data, cfg, run_dir, stage="align_head", fingerprint=fp, fsdp_units=_units(model)
    )
    result = trainer.fit(stop_at=stop_at)
    _save_module(embedder, Path(run_dir) / EMBEDDER_FILE, trainer.rank)
    _save_module(head, Path(run_dir) / HEAD_FILE, trainer.rank)
    return result


def lora_finetune(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    rank: int = 256,
    alpha: int = 512,
    target_modules: Sequence[str] | None = None,
    train_embedder_and_head: bool = True,
    shift: float = 1.0,
    stage: str = "lora",
    fingerprint: dict[str, Any] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Stage 3 (and each resolution increase, with another `stage` name and data). Adds LoRA
    adapters through peft unless the model has them already; trains them plus the embedder and
    head; saves the adapter in peft format under `run_dir/adapter`."""
    from ae_adapt import lora_io

    check_adaptable(model)
    targets = lora_io.resolve_targets(model, target_modules)
    if not lora_io.has_lora(model):
        _fresh(cfg.seed + 2, lambda: lora_io.add_lora(model, rank=rank, alpha=alpha, target_modules=targets))
    model.requires_grad_(False)
    lora_io.set_lora_trainable(model)
    if train_embedder_and_head:
        model.get_patch_embedder().requires_grad_(True)
        model.get_output_head().requires_grad_(True)
    fp = {
        "rank": rank,
        "alpha": alpha,
        "targets": list(targets),
        "shift": shift,
        "embedder_and_head": train_embedder_and_head,
        **(fingerprint or {}),
    }
    trainer = Trainer(
        DiffusionTask(model, shift), data, cfg, run_dir, stage=stage, fingerprint=fp, fsdp_units=_units(model)
    )
    result = trainer.fit(stop_at=stop_at)
    lora_io.save_lora(model, Path(run_dir) / "adapter")
    return result


def restore_new_ends(
    model: nn.Module, run_dir: str | os.PathLike, *, in_channels: int, out_channels: int, patch: Sequence[int]
) -> nn.Module:
    """Install the aligned embedder and head saved by stage 2 (e.g. to sample or resume later)."""
    check_adaptable(model)
    embedder = model.replace_patch_embedder(in_channels, tuple(patch))
    head = model.replace_output_head(out_channels, tuple(patch))
    embedder.load_state_dict(load_file(str(Path(run_dir) / EMBEDDER_FILE)))
    head.load_state_dict(load_file(str(Path(run_dir) / HEAD_FILE)))
    return model


def is_done(run_dir: str | os.PathLike) -> bool:
    """Whether the stage trained in `run_dir` has finished."""
    return (Path(run_dir) / DONE).is_file()


def run_all(
    model: nn.Module,
    data: Any,
    preset: AdaptPreset,
    out_dir: str | os.PathLike,
    *,
    in_channels: int,
    out_channels: int,
    patch: Sequence[int],
    resolution_data: Sequence[Any] = (),
    fingerprint: dict[str, Any] | None = None,
) -> bool:
    """Stages 1, 2, 3 and the resolution increases (one `resolution_data` per preset.resolution
    entry, possibly fewer), each in its own sub-directory. A finished stage is restored from its
    files, an unfinished one resumes from its checkpoint. Under torchrun (world size > 1) a model
    can be sharded once per process, so this trains one stage and returns: launch the same
    command again for the next. Returns True when every stage has finished."""
    from ae_adapt import lora_io

    out, distributed = Path(out_dir), world()[1] > 1
    d1, d2, d3 = out / "1-align-embedder", out / "2-align-head", out / "3-lora"
    # the LoRA stage comes after hours of stages 1 and 2: a model without targets fails now
    targets = lora_io.check_targets(check_adaptable(model), preset.lora_targets)
    lora = {
        "rank": preset.lora_rank,
        "alpha": preset.lora_alpha,
        "target_modules": targets,
        "shift": preset.flow_shift,
        "fingerprint": fingerprint,
    }
    if is_done(d1):
        model.replace_patch_embedder(in_channels, tuple(patch)).load_state_dict(load_file(str(d1 / EMBEDDER_FILE)))
    else:
        align_embedder(model, data, preset.embedder, d1, in_channels=in_channels, patch=patch, fingerprint=fingerprint)
        if distributed:
            return False
    if is_done(d2):
        restore_new_ends(model, d2, in_channels=in_channels, out_channels=out_channels, patch=patch)
    else:
        align_head(
            model,
            data,
            preset.head,
            d2,
            out_channels=out_channels,
            patch=patch,
            shift=preset.flow_shift,
            fingerprint=fingerprint,
        )
        if distributed:
            return False
    stages = [("lora", d3, preset.lora, data)] + [
        (name, out / f"4-{name}", preset.resolution_config(steps), res_data)
        for (name, steps), res_data in zip(preset.resolution, resolution_data)
    ]
    for name, run_dir, cfg, stage_data in stages:
        if is_done(run_dir):
            _load_adapter(model, run_dir / "adapter")
            continue
        lora_finetune(model, stage_data, cfg, run_dir, stage=name, **lora)
        if distributed:
            return False
    return True


def _load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """peft is imported only when a LoRA stage needs it (`import ae_adapt` stays light)."""
    from ae_adapt import lora_io

    lora_io.load_lora(model, adapter_dir)


def _save_module(module: nn.Module, path: Path, rank: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in _full_state(module).items()}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    # the other ranks may read the file next (restore_new_ends): not before rank 0 has replaced it
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with FSDP2 DTensors gathered (plain tensors pass through)."""
    out = {}
    for k, v in module.state_dict().items():
        full = getattr(v, "full_tensor", None)
        out[k] = full() if callable(full) else v
    return out
