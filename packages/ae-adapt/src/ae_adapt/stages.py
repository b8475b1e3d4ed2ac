"""The AE-Adapt-V stages (DC-VideoGen §3.3.2), each a resumable function over any `AdaptableDiT`.

1. `align_embedder`: the base model stays frozen; a new, randomly initialised patch embedder
   (the paper's choice) learns to map the new latent to the base embedder's tokens of the same
   clip, average-pooled onto the new token grid (MSE, eq. 2). `EmbedderAlign` selects the other
   losses of NVIDIA's DC-Gen trainer (upsample, global average, mixed).
2. `align_head`: a new output head and the aligned embedder train on the diffusion loss with
   every other parameter frozen, until the loss plateaus.
3. `lora_finetune`: LoRA (peft) on the blocks plus the embedder and head, end to end; called
   again on higher-resolution data for the resolution-increase stages.

Defaults are Table 8 (`PRESETS`) plus what NVIDIA's DC-Gen training code fixes and the paper
does not (noise-level sampling, condition dropout, no weight decay on norms and biases); every
field can be overridden with `dataclasses.replace`.

With a stage's `TrainConfig.ema_decay` > 0, the trainer leaves the EMA of the trained weights in
the model, so the files a stage writes (embedder, head, adapter) and whatever is merged from the
model afterwards are the EMA; the raw weights stay in the stage's checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ae_adapt.errors import PresetError, ResumeError, ShapeError
from ae_adapt.files import save_safetensors
from ae_adapt.flow import TIMESTEP_SAMPLINGS, diffusion_loss
from ae_adapt.protocol import Grid, check_adaptable
from ae_adapt.trainer import CHECKPOINT, DONE, TrainConfig, Trainer, TrainResult, finished_changes, world

# Batch keys that are latents (everything else is conditioning for forward_from_embeddings).
LATENT_KEYS = ("base", "new", "base_y", "new_y")
EMBEDDER_FILE, HEAD_FILE = "embedder.safetensors", "head.safetensors"


ALIGN_LOSSES = ("downsample", "upsample", "avgpool", "mixed")
UPSAMPLE_MODES = ("nearest", "bilinear", "trilinear")


@dataclass(frozen=True, kw_only=True)
class EmbedderAlign:
    """Stage 1 loss between base tokens e_b and new tokens e_n (NVIDIA's DC-Gen `DCAdaptTrainer`).

    Both token maps first get the same frame count (the longer one average-pooled in time), then:
    "downsample": MSE(e_n, avgpool(e_b)) on the coarser spatial grid (paper eq. 2);
    "upsample": MSE of the coarser map interpolated (`upsample_mode`) up to the finer one;
    "avgpool": MSE of the per-frame spatial means; "mixed": the sum of the three.
    `base_left_pad` / `base_right_trim` replicate-pad / cut latent frames of the base input
    (latent and conditioning) before the base embedder, to make the frame counts divide."""

    loss: str = "downsample"
    upsample_mode: str = "trilinear"  # "bilinear"/"trilinear": multilinear over the grid's spatial dims
    base_left_pad: int = 0
    base_right_trim: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ALIGN_LOSSES:
            raise PresetError(f"embedder alignment loss must be one of {ALIGN_LOSSES}, got {self.loss!r}")
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise PresetError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {self.upsample_mode!r}")
        if self.base_left_pad < 0 or self.base_right_trim < 0:
            raise PresetError("base_left_pad and base_right_trim count frames: they must be >= 0")

    def replace(self, **overrides: Any) -> EmbedderAlign:
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True, kw_only=True)
class AdaptPreset:
    """Hyper-parameters of all stages (Table 8 + NVIDIA's DC-Gen code for the Wan presets)."""

    embedder: TrainConfig
    head: TrainConfig
    lora: TrainConfig
    lora_rank: int = 256
    lora_alpha: int = 512
    lora_targets: tuple[str, ...] | None = None  # None: the model's `lora_target_modules()`
    # Resolution increase: (name, optimizer steps); each runs `lora` with these steps, no warm-up.
    resolution: tuple[tuple[str, int], ...] = (("480px-720px", 1000), ("720px-1080px", 500), ("1080px-2160px", 200))
    flow_shift: float = 1.0  # timestep shift for training noise levels
    timesteps: str = "uniform"  # noise-level sampling of stages 2-3: "uniform" or "dcgen" (see ae_adapt.flow)
    timestep_grid: int = 50  # grid points of "dcgen" sampling
    cond_dropout: float = 0.0  # probability of training a sample on the null conditioning
    embedder_align: EmbedderAlign = EmbedderAlign()

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise PresetError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float) or self.lora_alpha <= 0:
            raise PresetError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.timesteps not in TIMESTEP_SAMPLINGS:
            raise PresetError(f"timesteps must be one of {TIMESTEP_SAMPLINGS}, got {self.timesteps!r}")
        if isinstance(self.embedder_align, dict):  # from JSON overrides
            object.__setattr__(self, "embedder_align", EmbedderAlign(**self.embedder_align))
        if not 0 <= self.cond_dropout < 1:
            raise PresetError(f"cond_dropout is a probability in [0, 1), got {self.cond_dropout}")
        # checked here, not at the first step of stage 2 after hours of stage 1
        if self.flow_shift <= 0:
            raise PresetError(f"flow_shift must be positive, got {self.flow_shift}")
        if self.timesteps == "dcgen" and self.timestep_grid < 2:
            raise PresetError(
                f"the dcgen timestep grid needs at least 2 points, got timestep_grid={self.timestep_grid}"
            )

    def replace(self, **overrides: Any) -> AdaptPreset:
        return dataclasses.replace(self, **overrides)

    def resolution_config(self, steps: int) -> TrainConfig:
        return self.lora.replace(steps=steps, warmup_steps=0)

    def diffusion(self) -> dict[str, Any]:
        """The diffusion-loss settings of stages 2 and 3 (keyword arguments of align_head / lora_finetune)."""
        return {
            "shift": self.flow_shift,
            "timesteps": self.timesteps,
            "grid_steps": self.timestep_grid,
            "cond_dropout": self.cond_dropout,
        }


_BETAS = (0.9, 0.999)
# NVIDIA's DC-Gen BaseTrainer: AdamW without weight decay on parameters named *norm.weight or
# *bias (`no_wd_keys`), linear warm-up starting at `warmup_lr` (default 6.4e-6).
_NO_WD = ("norm.weight", "bias")
# Table 8 lists no weight decay for the two alignment stages: none is used there.
_EMBEDDER = TrainConfig(lr=1e-4, warmup_steps=0, batch_size=4, steps=20_000, betas=_BETAS, no_decay_keys=_NO_WD)
_HEAD = TrainConfig(
    lr=1e-4,
    warmup_steps=0,
    batch_size=32,
    steps=4_000,
    betas=_BETAS,
    plateau_patience=200,
    plateau_min_delta=1e-3,
    no_decay_keys=_NO_WD,
)
_LORA = TrainConfig(
    lr=5e-5,
    warmup_steps=1_000,
    warmup_start_lr=6.4e-6,
    batch_size=32,
    steps=20_000,
    betas=_BETAS,
    weight_decay=1e-3,
    no_decay_keys=_NO_WD,
)
# DC-Gen's Wan trainer (WanT2VConfig / WanI2VConfig): FlowMatchScheduler over a 50-point grid
# with flow_shift 5.0, text replaced by the negative-prompt embedding with probability 0.1.
_WAN = {"timesteps": "dcgen", "flow_shift": 5.0, "timestep_grid": 50, "cond_dropout": 0.1}

PRESETS: dict[str, AdaptPreset] = {
    "wan-1.3B": AdaptPreset(embedder=_EMBEDDER, head=_HEAD, lora=_LORA, **_WAN),
    "wan-14B": AdaptPreset(
        embedder=_EMBEDDER, head=_HEAD.replace(steps=3_000), lora=_LORA.replace(steps=6_000), **_WAN
    ),
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


def _grid_map(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def _pool_to(x: torch.Tensor, size: Sequence[int], dims: Sequence[int]) -> torch.Tensor:
    """Average-pool the grid dims `dims` (indices into the grid) of x [B, D, *grid] to `size`."""
    grid = list(x.shape[2:])
    target = list(grid)
    for i, s in zip(dims, size):
        target[i] = s
    if target == grid:
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    return pool(x, tuple(target))


def _finer_coarser(a: torch.Tensor, b: torch.Tensor, dims: Sequence[int]) -> bool:
    """True when map a is at least as fine as b in every dim of `dims`; raise on a mixed order."""
    sa, sb = [a.shape[2 + i] for i in dims], [b.shape[2 + i] for i in dims]
    if all(x >= y for x, y in zip(sa, sb)):
        return True
    if all(x <= y for x, y in zip(sa, sb)):
        return False
    raise ShapeError(
        f"token grids {tuple(sa)} and {tuple(sb)}: one must be at least as fine as the other in every dimension"
    )


def align_loss(
    base: torch.Tensor, base_grid: Grid, new: torch.Tensor, new_grid: Grid, align: EmbedderAlign | None = None
) -> torch.Tensor:
    """Stage 1 loss between base tokens [B, Lb, D] on `base_grid` and new tokens [B, Ln, D] on
    `new_grid` (row-major). A 3-D grid is (frames, height, width): frames are matched first by
    average-pooling the longer map; 1-D and 2-D grids are all spatial. Non-integer ratios use
    adaptive pooling (DC-Gen asserts integer ones)."""
    align = align or EmbedderAlign()
    if len(base_grid) != len(new_grid):
        raise ShapeError(f"base grid {tuple(base_grid)} and new grid {tuple(new_grid)} differ in rank")
    eb, en = _grid_map(base.float(), base_grid), _grid_map(new.float(), new_grid)
    spatial = list(range(len(base_grid)))
    if len(base_grid) == 3:
        spatial = [1, 2]
        frames = min(eb.shape[2], en.shape[2])
        eb, en = _pool_to(eb, [frames], [0]), _pool_to(en, [frames], [0])
    losses = {}
    if align.loss in ("downsample", "mixed"):
        if _finer_coarser(eb, en, spatial):
            losses["downsample"] = F.mse_loss(en, _pool_to(eb, [en.shape[2 + i] for i in spatial], spatial))
        else:
            losses["downsample"] = F.mse_loss(_pool_to(en, [eb.shape[2 + i] for i in spatial], spatial), eb)
    if align.loss in ("upsample", "mixed"):
        fine, coarse = (eb, en) if _finer_coarser(eb, en, spatial) else (en, eb)
        mode = (
            "nearest"
            if align.upsample_mode == "nearest"
            else {1: "linear", 2: "bilinear", 3: "trilinear"}[fine.ndim - 2]
        )
        up = F.interpolate(coarse, size=tuple(fine.shape[2:]), mode=mode)
        losses["upsample"] = F.mse_loss(fine, up)
    if align.loss in ("avgpool", "mixed"):
        dims = tuple(2 + i for i in spatial)
        losses["avgpool"] = F.mse_loss(eb.mean(dim=dims), en.mean(dim=dims))
    return sum(losses.values())


def _pad_trim_frames(x: torch.Tensor, left_pad: int, right_trim: int) -> torch.Tensor:
    """Replicate the first latent frame `left_pad` times in front, drop the last `right_trim`."""
    if left_pad:
        x = torch.cat([x[:, :, :1].expand(-1, -1, left_pad, *x.shape[3:]), x], dim=2)
    if right_trim:
        if right_trim >= x.shape[2]:
            raise ShapeError(f"base_right_trim {right_trim} leaves no frame of a {x.shape[2]}-frame latent")
        x = x[:, :, :-right_trim]
    return x


class EmbedderAlignTask(nn.Module):
    """Stage 1 loss: MSE(new_embedder(new latent), avgpool(base_embedder(base latent))), or another
    `EmbedderAlign` loss."""

    def __init__(self, model: nn.Module, base_embedder: nn.Module, align: EmbedderAlign | None = None):
        super().__init__()
        self.model, self.base_embedder = model, base_embedder
        self.align = align or EmbedderAlign()

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            x = _pad_trim_frames(_input(batch, "base"), self.align.base_left_pad, self.align.base_right_trim)
            base, base_grid = self.base_embedder(x)
        new, new_grid = self.model.patch_embed(_input(batch, "new"))
        return align_loss(base, base_grid, new, new_grid, self.align)


class DiffusionTask(nn.Module):
    """Stages 2 and 3 loss: flow matching on the new latent (conditioning from the batch)."""

    def __init__(
        self,
        model: nn.Module,
        shift: float = 1.0,
        *,
        timesteps: str = "uniform",
        grid_steps: int = 50,
        cond_dropout: float = 0.0,
        null_cond: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model, self.shift = model, shift
        self.timesteps, self.grid_steps = timesteps, grid_steps
        self.cond_dropout, self.null_cond = cond_dropout, dict(null_cond or {})
        if cond_dropout > 0 and not self.null_cond:
            raise PresetError(
                f"cond_dropout={cond_dropout} needs the null conditioning (null_cond, e.g. the text embedding "
                "of the negative prompt; LatentCache.null_cond() when the cache was built with null_prompt=)"
            )

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        cond = {k: v for k, v in batch.items() if k not in LATENT_KEYS}
        return diffusion_loss(
            self.model,
            batch["new"],
            generator,
            y=batch.get("new_y"),
            shift=self.shift,
            timesteps=self.timesteps,
            grid_steps=self.grid_steps,
            cond_dropout=self.cond_dropout,
            null_cond=self.null_cond,
            **cond,
        )


def _diffusion_fingerprint(shift, timesteps, grid_steps, cond_dropout, null_cond=None) -> dict[str, Any]:
    """What of the diffusion loss a checkpoint depends on (the pre-DC-Gen keys only when they are
    not the defaults, so that checkpoints of earlier versions still resume). With text dropout, a
    digest of the null conditioning: a cache rebuilt with another negative prompt must not resume."""
    fp: dict[str, Any] = {"shift": shift}
    if timesteps != "uniform":
        fp |= {"timesteps": timesteps, "grid_steps": grid_steps}
    if cond_dropout:
        fp["cond_dropout"] = cond_dropout
        if null_cond:
            import hashlib

            digest = hashlib.sha256()
            for key in sorted(null_cond):
                digest.update(key.encode())
                digest.update(null_cond[key].detach().float().contiguous().cpu().numpy().tobytes())
            fp["null_cond"] = digest.hexdigest()[:16]
    return fp


def embedder_fingerprint(in_channels, patch, align=None, fingerprint=None) -> dict[str, Any]:
    """What stage 1's checkpoint and done.json depend on besides its TrainConfig."""
    fp = {"in_channels": in_channels, "patch": list(patch), **(fingerprint or {})}
    if align is not None and align != EmbedderAlign():
        fp["align"] = dataclasses.asdict(align)
    return fp


def head_fingerprint(
    out_channels, patch, shift=1.0, timesteps="uniform", grid_steps=50, cond_dropout=0.0, null_cond=None, fingerprint=None
) -> dict[str, Any]:
    """What stage 2's checkpoint and done.json depend on besides its TrainConfig."""
    return {
        "out_channels": out_channels,
        "patch": list(patch),
        **_diffusion_fingerprint(shift, timesteps, grid_steps, cond_dropout, null_cond),
        **(fingerprint or {}),
    }


def lora_fingerprint(
    rank,
    alpha,
    targets,
    train_embedder_and_head=True,
    shift=1.0,
    timesteps="uniform",
    grid_steps=50,
    cond_dropout=0.0,
    null_cond=None,
    fingerprint=None,
) -> dict[str, Any]:
    """What a LoRA stage's checkpoint and done.json depend on besides its TrainConfig."""
    return {
        "rank": rank,
        "alpha": alpha,
        "targets": list(targets),
        **_diffusion_fingerprint(shift, timesteps, grid_steps, cond_dropout, null_cond),
        "embedder_and_head": train_embedder_and_head,
        **(fingerprint or {}),
    }


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
    align: EmbedderAlign | None = None,
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
    align = align or EmbedderAlign()
    fp = embedder_fingerprint(in_channels, patch, align, fingerprint)
    trainer = Trainer(
        EmbedderAlignTask(model, base_embedder, align),
        data,
        cfg,
        run_dir,
        stage="align_embedder",
        fingerprint=fp,
        fsdp_units=_units(model),
    )
    result = trainer.fit(stop_at=stop_at, mark_done=False)
    _save_module(embedder, Path(run_dir) / EMBEDDER_FILE, trainer.rank)
    _done(trainer)
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
    timesteps: str = "uniform",
    grid_steps: int = 50,
    cond_dropout: float = 0.0,
    null_cond: dict[str, torch.Tensor] | None = None,
    fingerprint: dict[str, Any] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Stage 2. Replaces the output head and trains it with the (aligned) embedder on the diffusion
    loss; every other parameter stays frozen. Stops at `cfg.steps` or on a loss plateau. The
    diffusion-loss options are those of `ae_adapt.flow.diffusion_loss`."""
    check_adaptable(model)
    model.requires_grad_(False)
    head = _fresh(cfg.seed + 1, lambda: model.replace_output_head(out_channels, tuple(patch)))
    embedder = model.get_patch_embedder()
    embedder.requires_grad_(True)
    head.requires_grad_(True)
    fp = head_fingerprint(out_channels, patch, shift, timesteps, grid_steps, cond_dropout, null_cond, fingerprint)
    task = DiffusionTask(
        model, shift, timesteps=timesteps, grid_steps=grid_steps, cond_dropout=cond_dropout, null_cond=null_cond
    )
    trainer = Trainer(task, data, cfg, run_dir, stage="align_head", fingerprint=fp, fsdp_units=_units(model))
    result = trainer.fit(stop_at=stop_at, mark_done=False)
    _save_module(embedder, Path(run_dir) / EMBEDDER_FILE, trainer.rank)
    _save_module(head, Path(run_dir) / HEAD_FILE, trainer.rank)
    _done(trainer)
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
    timesteps: str = "uniform",
    grid_steps: int = 50,
    cond_dropout: float = 0.0,
    null_cond: dict[str, torch.Tensor] | None = None,
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
    fp = lora_fingerprint(
        rank, alpha, targets, train_embedder_and_head, shift, timesteps, grid_steps, cond_dropout, null_cond, fingerprint
    )
    task = DiffusionTask(
        model, shift, timesteps=timesteps, grid_steps=grid_steps, cond_dropout=cond_dropout, null_cond=null_cond
    )
    trainer = Trainer(task, data, cfg, run_dir, stage=stage, fingerprint=fp, fsdp_units=_units(model))
    result = trainer.fit(stop_at=stop_at, mark_done=False)
    lora_io.save_lora(model, Path(run_dir) / "adapter")
    _done(trainer)
    return result


def _done(trainer: Trainer) -> None:
    """done.json after the stage's outputs: an interrupt while they are written leaves the stage
    unmarked, and the rerun writes them again from the finished checkpoint."""
    if trainer.finished:
        trainer.mark_done()


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
    null_cond: dict[str, torch.Tensor] | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> bool:
    """Stages 1, 2, 3 and the resolution increases (one `resolution_data` per preset.resolution
    entry, possibly fewer), each in its own sub-directory. A finished stage is restored from its
    files, an unfinished one resumes from its checkpoint. Under torchrun (world size > 1) a model
    can be sharded once per process, so this trains one stage and returns: launch the same
    command again for the next. Returns True when every stage it was given data for has finished
    (resolution stages without data are skipped with a warning). `null_cond` is the
    conditioning a sample is trained on with probability `preset.cond_dropout` (e.g.
    `{"context": negative-prompt embedding}`; `LatentCache.null_cond()`)."""
    from ae_adapt import lora_io

    out, distributed = Path(out_dir), world()[1] > 1
    d1, d2, d3 = out / "1-align-embedder", out / "2-align-head", out / "3-lora"
    # the LoRA stage comes after hours of stages 1 and 2: a model without targets fails now
    targets = lora_io.check_targets(check_adaptable(model), preset.lora_targets)
    if preset.cond_dropout > 0 and not null_cond:
        raise PresetError(
            f"the preset drops the conditioning with probability {preset.cond_dropout} (DC-Gen's text dropout) "
            "but no null_cond was given: pass the negative-prompt embedding (build the cache with null_prompt=) "
            "or override cond_dropout=0"
        )
    diffusion = {**preset.diffusion(), "null_cond": null_cond}
    lora = {
        "rank": preset.lora_rank,
        "alpha": preset.lora_alpha,
        "target_modules": targets,
        **diffusion,
        "fingerprint": fingerprint,
    }
    stages = [("lora", d3, preset.lora, data)] + [
        (name, out / f"4-{name}", preset.resolution_config(steps), res_data)
        for (name, steps), res_data in zip(preset.resolution, resolution_data)
    ]
    skipped = [name for name, _ in preset.resolution[len(resolution_data) :]]
    if skipped:  # said once, before hours of training, not discovered afterwards
        warnings.warn(
            f"the preset's resolution stage(s) {', '.join(skipped)} will not run: resolution_data has "
            f"{len(resolution_data)} of the {len(preset.resolution)} datasets they need (one per stage, in order); "
            "the result is the LoRA stage's",
            stacklevel=2,
        )
    order = [d1, d2] + [run_dir for _, run_dir, _, _ in stages]
    embedder_fp = embedder_fingerprint(in_channels, patch, preset.embedder_align, fingerprint)
    if _finished(d1, "align_embedder", preset.embedder, embedder_fp, [EMBEDDER_FILE], order):
        model.replace_patch_embedder(in_channels, tuple(patch)).load_state_dict(load_file(str(d1 / EMBEDDER_FILE)))
    else:
        align_embedder(
            model,
            data,
            preset.embedder,
            d1,
            in_channels=in_channels,
            patch=patch,
            align=preset.embedder_align,
            fingerprint=fingerprint,
        )
        if distributed:
            return False
    head_fp = head_fingerprint(out_channels, patch, **diffusion, fingerprint=fingerprint)
    if _finished(d2, "align_head", preset.head, head_fp, [EMBEDDER_FILE, HEAD_FILE], order):
        restore_new_ends(model, d2, in_channels=in_channels, out_channels=out_channels, patch=patch)
    else:
        align_head(
            model,
            data,
            preset.head,
            d2,
            out_channels=out_channels,
            patch=patch,
            **diffusion,
            fingerprint=fingerprint,
        )
        if distributed:
            return False
    lora_fp = lora_fingerprint(preset.lora_rank, preset.lora_alpha, targets, True, **diffusion, fingerprint=fingerprint)
    for name, run_dir, cfg, stage_data in stages:
        if _finished(run_dir, name, cfg, lora_fp, [_ADAPTER_CONFIG, _ADAPTER_WEIGHTS], order):
            _load_adapter(model, run_dir / "adapter")
            continue
        lora_finetune(model, stage_data, cfg, run_dir, stage=name, **lora)
        if distributed:
            return False
    return True


_ADAPTER_CONFIG, _ADAPTER_WEIGHTS = "adapter/adapter_config.json", "adapter/adapter_model.safetensors"


def _readable(path: Path) -> bool:
    """Whether an output file is there and whole enough to load (safetensors header, JSON)."""
    if not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
    except (OSError, ValueError, SafetensorError):  # rewritten or reported by the caller
        return False
    return True


def _finished(
    run_dir: Path, stage: str, cfg: TrainConfig, fingerprint: dict[str, Any], files: Sequence[str], order: Sequence[Path]
) -> bool:
    """Whether run_all may restore the stage from `run_dir` instead of training it: it has finished
    (done.json) with the same settings and its output files are readable. A stage that finished
    with other settings is refused (its results would silently stand for the new ones); one whose
    outputs are missing or damaged is trained "again", i.e. resumed from its finished checkpoint,
    which only writes the outputs."""
    if not is_done(run_dir):
        return False
    changed = finished_changes(run_dir, stage, cfg, fingerprint)
    if changed:
        later = [str(d) for d in order[order.index(run_dir) + 1 :] if d.exists()]
        also = f" and the later stages' {', '.join(later)}" if later else ""
        raise ResumeError(
            f"stage {stage} in {run_dir} has already finished with other settings: {'; '.join(changed)}. Its results "
            f"are not reused for the new settings: use a new output directory, or delete {run_dir}{also} to train "
            "it again with them (or rerun with the old settings)"
        )
    bad = [f for f in files if not _readable(run_dir / f)]
    if not bad:
        if cfg.progress and world()[0] == 0:
            print(f"{stage}: finished earlier with the same settings, restored from {run_dir}", flush=True)
        return True
    if (run_dir / CHECKPOINT).is_file():
        warnings.warn(
            f"stage {stage} in {run_dir} has finished, but {', '.join(bad)} is missing or unreadable (an interrupted "
            f"write?): writing it again from {run_dir / CHECKPOINT}",
            stacklevel=3,
        )
        return False
    raise ResumeError(
        f"stage {stage} in {run_dir} has finished, but {', '.join(bad)} is missing or unreadable and there is no "
        f"{CHECKPOINT} to write it again from: delete {run_dir} to train the stage again"
    )


def _load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """peft is imported only when a LoRA stage needs it (`import ae_adapt` stays light)."""
    from ae_adapt import lora_io

    lora_io.load_lora(model, adapter_dir)


def _save_module(module: nn.Module, path: Path, rank: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in _full_state(module).items()}
    if rank == 0:
        save_safetensors(state, path)  # atomic, with ordinary permissions
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
