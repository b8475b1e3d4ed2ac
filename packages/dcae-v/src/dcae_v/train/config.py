"""Training configuration: nested frozen dataclasses, a JSON/YAML file and dotted overrides.

Precedence, documented once: defaults <- config file <- command-line overrides
(`optim.lr=1e-4 data.frames=16`). Every value is validated before any data is read or any
tensor is allocated, so a typo fails in a second with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcae_v.config import PRESETS, TEMPORAL_MODES, get_preset
from dcae_v.errors import InputError


class ConfigError(InputError):
    """A training config value that cannot work (the message names the field and the fix)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "debug"  # a dcae_v PRESETS name
    temporal: str | None = None  # override: chunk_causal | causal | non_causal
    chunk_size: int | None = None  # override: frames per chunk (a multiple of 4)
    latent_channels: int | None = None  # override: changes the compression ratio
    init: str | None = None  # start from these weights (NVIDIA .pt or save_pretrained dir)

    def build_config(self):
        over = {k: getattr(self, k) for k in ("temporal", "chunk_size", "latent_channels") if getattr(self, k) is not None}
        return get_preset(self.preset, **over)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = ""  # a folder (searched recursively), a list file (one path per line) or one video/image
    frames: int | None = None  # T of every video clip (images are 1-frame clips); None: one model chunk
    size: int = 32  # square random crop, pixels
    max_stride: int = 1  # frame stride drawn uniformly from 1..max_stride per clip
    image_repeat: int = 1  # how often each image is listed relative to a video when sampling
    cache_decoded: bool = True  # keep decoded files in memory (small data sets)
    prefetch: bool = True  # decode the next step's clips in a background thread


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    batch_size: int = 4  # clips per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.1
    max_steps: int = 1000
    grad_clip: float = 1.0  # 0 disables


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    l1: float = 1.0
    mse: float = 0.0
    lpips: float = 0.0  # weight; 0 disables
    lpips_backbone: str | None = None  # torchvision alexnet-owt-7be5be79.pth
    lpips_heads: str | None = None  # lpips weights/v0.1/alex.pth


@dataclass(frozen=True, kw_only=True)
class GanConfig:
    weight: float = 0.0  # 0 disables the discriminator
    loss: str = "hinge"  # hinge | non_saturating
    start_step: int = 0  # GAN warm-up: no adversarial term and no D updates before this step
    weight_mode: str = "adaptive"  # adaptive (VQGAN last-layer gradient ratio) | scheduled
    ramp_steps: int = 0  # scheduled: linear ramp 0 -> weight over this many steps after start_step
    adaptive_max: float = 1e4
    r1_gamma: float = 0.0  # R1 penalty gamma/2 * |grad_x D(x)|^2 on real clips; 0 disables
    r1_every: int = 1  # lazy R1 (StyleGAN2): every n-th D step, scaled by n
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.99)
    channels: int = 32  # width of the first discriminator block
    max_channels: int = 256
    mbstd_group: int = 4  # minibatch-std group size (1 disables grouping across clips)


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    decay: float = 0.999  # 0 disables; effective decay min(decay, (1 + n) / (10 + n)) after start_step
    start_step: int = 0


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 500  # steps between full-state checkpoints (0: only at the end, or on SIGINT/SIGTERM)
    keep_last: int = 3
    export: bool = True  # at the end: EMA as NVIDIA .pt and as a save_pretrained directory


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    out_dir: str = "runs/dcae_v_train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    autocast: str = "none"  # none | bf16
    grad_checkpointing: bool = False
    parallel: str = "auto"  # auto (ddp when WORLD_SIZE > 1) | none | ddp | fsdp
    log_every: int = 10  # metrics rows are means over this many steps
    threads: int | None = None
    max_minutes: float | None = None  # wall-clock budget over the whole run (resumes included); saves and stops
    tensorboard: bool = True  # only if the tensorboard package is importable
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = []
        for section in dataclasses.fields(self):
            lines.append(f"{section.name}:")
            for f in dataclasses.fields(getattr(self, section.name)):
                lines.append(f"  {f.name}: {getattr(getattr(self, section.name), f.name)!r}")
        return "\n".join(lines)

    def override(self, assignments: list[str] | tuple[str, ...]) -> TrainConfig:
        """Apply `section.field=value` strings (values parsed as JSON, else taken as text; a text
        field takes the text as typed, so `run.out_dir=lr_1e-4,bs_2` is that folder name)."""
        nested = {}
        for a in assignments:
            key, sep, text = a.partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"override {a!r} must look like section.field=value, e.g. optim.lr=1e-4")
            section, name = key.strip().split(".", 1)
            hint = _field_hint(self, section, name)
            text = text.strip()
            if hint is str or (hint == str | None and text.lower() not in ("none", "null")):
                nested.setdefault(section, {})[name] = text
            else:
                nested.setdefault(section, {})[name] = _parse_text(text)
        return _merge(self, nested)


# ---- building --------------------------------------------------------------------------------
def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True
) -> TrainConfig:
    """Defaults <- file (JSON, or YAML when PyYAML is installed) <- overrides, then validated.

    check=False skips `validate` (names, types and syntax are still checked): for printing a
    config to edit, whose defaults alone need not make a runnable run.
    """
    cfg = TrainConfig()
    if path is not None:
        cfg = _merge(cfg, read_config_file(path))
    cfg = cfg.override(overrides)
    return validate(cfg) if check else cfg


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give the JSON (or YAML) file itself")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p} is YAML but PyYAML is not installed; write it as JSON (same keys)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON ({e}); use .yaml/.yml for YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (model, data, optim, ...), got {type(data).__name__}")
    return data


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return _merge(TrainConfig(), data)


def _merge(cfg: TrainConfig, nested: dict[str, Any]) -> TrainConfig:
    sections = {f.name for f in dataclasses.fields(cfg)}
    updates = {}
    for section, values in nested.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        current = getattr(cfg, section)
        hints = typing.get_type_hints(type(current))
        fields = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(f"unknown field {section}.{name}; valid fields of {section}: {sorted(hints)}")
            fields[name] = _coerce(value, hints[name], f"{section}.{name}")
        updates[section] = dataclasses.replace(current, **fields)
    return dataclasses.replace(cfg, **updates)


def _field_hint(cfg: TrainConfig, section: str, name: str) -> Any:
    """The type of `section.name`, or None when either is unknown (`_merge` then names the valid ones)."""
    current = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(current):
        return None
    return typing.get_type_hints(type(current)).get(name)


def _parse_text(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_parse_text(t) for t in text.split(",")]
        return {"true": True, "false": False}.get(text.lower(), text)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} needs {len(args)} values (e.g. {name}=0.9,0.99), got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
        return hint(value)
    if hint is str:
        if value is None:  # `run.autocast=none` parses as null; text fields take the word itself
            return "none"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be text, got {value!r}")
        return str(value)
    return value


# ---- validation ------------------------------------------------------------------------------
def _choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check every value that does not need the data; raise ConfigError naming the fix."""
    m, d, o, lo, g, r = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.gan, cfg.run
    if m.preset not in PRESETS:
        raise ConfigError(f"unknown model.preset {m.preset!r}; valid presets: {', '.join(PRESETS)}")
    if m.temporal is not None:
        _choice(m.temporal, TEMPORAL_MODES, "model.temporal")
    base = PRESETS[m.preset]
    tc = base.temporal_compression
    if m.chunk_size is not None and (m.chunk_size < 1 or m.chunk_size % tc):
        raise ConfigError(
            f"model.chunk_size={m.chunk_size} is not a positive multiple of the temporal compression factor {tc}; "
            f"use e.g. {max(tc, m.chunk_size - m.chunk_size % tc)}"
        )
    try:
        arch = m.build_config()
    except ValueError as e:
        raise ConfigError(f"model config is invalid: {e}") from None
    if d.frames is None:  # one chunk: the smallest clip the chunk-causal model runs as it will at inference
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, frames=arch.chunk_size))
        d = cfg.data
    if d.frames < 1 or (d.frames != 1 and d.frames % tc):
        raise ConfigError(f"data.frames={d.frames} must be a multiple of the temporal compression factor {tc}")
    if arch.temporal == "chunk_causal" and d.frames % arch.chunk_size and d.frames != 1:
        raise ConfigError(
            f"data.frames={d.frames} is not a multiple of the chunk size {arch.chunk_size}: the model would silently "
            f"run its last partial chunk differently; use data.frames={arch.chunk_size * max(1, d.frames // arch.chunk_size)} "
            f"or set model.chunk_size"
        )
    f = arch.spatial_compression
    if d.size < f or d.size % f:
        raise ConfigError(f"data.size={d.size} must be a positive multiple of the spatial compression {f}")
    for name, value in (("data.max_stride", d.max_stride), ("data.image_repeat", d.image_repeat),
                        ("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                        ("optim.max_steps", o.max_steps), ("optim.lr", o.lr), ("run.log_every", r.log_every),
                        ("gan.r1_every", g.r1_every), ("gan.channels", g.channels), ("gan.mbstd_group", g.mbstd_group),
                        ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        _positive(value, name)
    for name, value in (("loss.l1", lo.l1), ("loss.mse", lo.mse), ("loss.lpips", lo.lpips), ("gan.weight", g.weight),
                        ("gan.r1_gamma", g.r1_gamma), ("optim.warmup_steps", o.warmup_steps),
                        ("checkpoint.every", cfg.checkpoint.every), ("optim.grad_clip", o.grad_clip)):
        _positive(value, name, allow_zero=True)
    if lo.l1 + lo.mse + lo.lpips == 0:
        raise ConfigError("all reconstruction weights are 0 (loss.l1, loss.mse, loss.lpips): nothing to train")
    if bool(lo.lpips_backbone) != bool(lo.lpips_heads):
        raise ConfigError("LPIPS needs both loss.lpips_backbone and loss.lpips_heads (or neither for the substitute)")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    _choice(o.schedule, ("constant", "cosine"), "optim.schedule")
    _choice(g.loss, ("hinge", "non_saturating"), "gan.loss")
    _choice(g.weight_mode, ("adaptive", "scheduled"), "gan.weight_mode")
    _choice(r.autocast, ("none", "bf16"), "run.autocast")
    _choice(r.parallel, ("auto", "none", "ddp", "fsdp"), "run.parallel")
    if r.parallel == "none" and world_size > 1:
        raise ConfigError(f"run.parallel=none with {world_size} processes would train unsynchronised copies; "
                          f"use run.parallel=ddp or fsdp (or auto)")
    if r.parallel == "fsdp" and g.weight > 0 and g.weight_mode == "adaptive":
        raise ConfigError("gan.weight_mode=adaptive needs the unsharded last decoder layer; with run.parallel=fsdp "
                          "use gan.weight_mode=scheduled")
    per = world_size * o.grad_accum
    if o.batch_size % per:
        raise ConfigError(
            f"optim.batch_size={o.batch_size} must be divisible by processes x optim.grad_accum = "
            f"{world_size} x {o.grad_accum} = {per}"
        )
    _check_run(r)
    if not d.source:
        raise ConfigError("data.source is empty: give a folder of videos/images, a text file listing them, or one video")
    return cfg


def _check_run(r: RunConfig) -> None:
    if not r.out_dir.strip():
        raise ConfigError("run.out_dir is empty: give the folder for checkpoints, metrics and exports, "
                          "e.g. run.out_dir=runs/my_run")
    if r.max_minutes is not None and not r.max_minutes > 0:
        raise ConfigError(f"run.max_minutes must be > 0 (or none for no time limit), got {r.max_minutes}")
    if r.threads is not None and r.threads < 1:
        raise ConfigError(f"run.threads must be >= 1 (or none for torch's default), got {r.threads}")
    if r.device != "auto":
        import torch

        try:
            torch.device(r.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown run.device {r.device!r}; use auto, cpu, cuda or cuda:N") from None
