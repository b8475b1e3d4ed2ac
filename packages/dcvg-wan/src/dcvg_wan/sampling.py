"""Sampling: the official defaults per task, seeded noise, classifier-free guidance and the loop.

    from dcvg_wan.sampling import sample, sample_defaults, make_noise, wan_denoiser
    d = sample_defaults("t2v-1.3B", "832*480")            # 50 steps, shift 5.0, guide 5.0, unipc
    x = sample(wan_denoiser(model, ctx), make_noise((1, 16, 21, 60, 104), seed=0),
               steps=d.steps, shift=d.shift, guide_scale=d.guide_scale, uncond_fn=wan_denoiser(model, ctx_null))

A denoiser is any `fn(x [B, C, F, H, W], t [B] int64) -> velocity` (same shape as x), so the loop
runs on a toy function in tests and on `WanModel` in pipelines.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dcvg_wan.errors import InputError
from dcvg_wan.schedulers import SOLVERS, flow_schedule, make_solver

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# wan/configs/shared_config.py `sample_neg_prompt`; the I2V and FLF2V configs prefix it.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
_NEG_PREFIX = {"i2v-14B": "镜头晃动，", "flf2v-14B": "镜头切换，"}

# NVIDIA's DC-Gen inference demo (applications/dc_gen/inference_demo/generate.py VIDEO_NEGATIVE_PROMPT):
# the English wording of the official prompt, the same for T2V and I2V (no "camera shake" prefix).
VIDEO_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)
# NVIDIA's training code (dc_ai/videogencore WanT2VConfig / WanI2VConfig flow_shift) samples with
# shift 5.0 for both tasks; their release folders carry the shift in scheduler/scheduler_config.json,
# which wins when present.
DCVG_FLOW_SHIFT = 5.0
DCVG_SEED = 42  # NVIDIA's generate.py default seed

# wan/configs/__init__.py SUPPORTED_SIZES (W*H strings; I2V/FLF2V read them as a maximum area).
_SIZES_480 = ("480*832", "832*480")
_SIZES_720 = ("720*1280", "1280*720")
SUPPORTED_SIZES: dict[str, tuple[str, ...]] = {
    "t2v-14B": _SIZES_720 + _SIZES_480,
    "t2v-1.3B": _SIZES_480,
    "i2v-14B": _SIZES_720 + _SIZES_480,
    "flf2v-14B": _SIZES_720 + _SIZES_480,
    "t2i-14B": _SIZES_720 + _SIZES_480 + ("1024*1024",),
    "vace-1.3B": _SIZES_480,
    "vace-14B": _SIZES_720 + _SIZES_480,
}
TASKS = tuple(SUPPORTED_SIZES)
DEFAULT_SIZE = "1280*720"  # generate.py --size default


@dataclass(frozen=True, kw_only=True)
class SampleDefaults:
    """What generate.py uses when a flag is left out (`_validate_args` and the task configs)."""

    task: str
    size: str
    steps: int
    shift: float
    guide_scale: float = 5.0
    solver: str = "unipc"
    frame_num: int = 81
    fps: int = 16
    negative_prompt: str = NEGATIVE_PROMPT


def official_task(task: str) -> str:
    """Our preset names -> the official task: "i2v-14B-480p" -> "i2v-14B", "dcvg-t2v-14B" -> "t2v-14B"."""
    name = task.removeprefix("dcvg-")
    for suffix in ("-480p", "-720p"):
        name = name.removesuffix(suffix)
    if name not in SUPPORTED_SIZES:
        raise InputError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)} (or a dcvg-wan preset name)")
    return name


def dcvg_defaults(i2v: bool, shift: float | None = None) -> SampleDefaults:
    """NVIDIA's DC-VideoGen defaults (DC-Gen inference_demo/generate.py): 1280*720 (I2V: that area
    at the image's aspect), 81 frames (80 after DC-AE-V's rounding), 50 steps for T2V and I2V,
    guidance 5.0, the English VIDEO_NEGATIVE_PROMPT, 16 fps; `shift` from the release's
    scheduler_config.json, else DCVG_FLOW_SHIFT."""
    return SampleDefaults(
        task="dcvg-i2v-14B" if i2v else "dcvg-t2v-14B",
        size=DEFAULT_SIZE,
        steps=50,
        shift=DCVG_FLOW_SHIFT if shift is None else float(shift),
        negative_prompt=VIDEO_NEGATIVE_PROMPT,
    )


def sample_defaults(task: str, size: str | None = None) -> SampleDefaults:
    """Official defaults for a task and W*H size: steps 50 (I2V 40), shift 5.0 (I2V at 480p 3.0,
    FLF2V/VACE 16), guide 5.0, 81 frames (T2I 1). A size left out is 832*480 for our "-480p"
    presets and the 1.3B models, else generate.py's 1280*720. DC-VideoGen presets ("dcvg-...")
    get NVIDIA's defaults (`dcvg_defaults`; the size is checked against the base task's list)."""
    name = official_task(task)
    if task.startswith("dcvg-"):
        size = size or DEFAULT_SIZE
        if size not in SUPPORTED_SIZES[name]:
            raise InputError(f"unsupported size {size!r} for task {task}; supported sizes: "
                             f"{', '.join(SUPPORTED_SIZES[name])}")
        return dataclasses.replace(dcvg_defaults("i2v" in name), size=size)
    if size is None:
        size = "832*480" if task.endswith("-480p") or DEFAULT_SIZE not in SUPPORTED_SIZES[name] else DEFAULT_SIZE
    if size not in SUPPORTED_SIZES[name]:
        raise InputError(f"unsupported size {size!r} for task {name}; supported sizes: {', '.join(SUPPORTED_SIZES[name])}")
    shift = 5.0
    if "i2v" in name and size in _SIZES_480:
        shift = 3.0
    elif name.startswith(("flf2v", "vace")):
        shift = 16.0
    return SampleDefaults(
        task=name,
        size=size,
        steps=40 if "i2v" in name else 50,
        shift=shift,
        frame_num=1 if name.startswith("t2i") else 81,
        negative_prompt=_NEG_PREFIX.get(name, "") + NEGATIVE_PROMPT,
    )


# ---- noise ------------------------------------------------------------------------------------
def resolve_seed(seed: int) -> int:
    """-1 (or any negative) -> a random seed, as generate.py; others unchanged."""
    return random.randint(0, sys.maxsize) if seed < 0 else int(seed)


def make_noise(
    shape: Sequence[int],
    seed: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise from `seed`, drawn on `generator_device` (CPU: the same numbers on
    every machine) in float32, then moved to `device`/`dtype`. The official code draws on the
    GPU (`torch.Generator("cuda")`): pass generator_device="cuda" to reproduce its noise."""
    gen = torch.Generator(generator_device).manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=gen, device=generator_device, dtype=torch.float32)
    return noise.to(device=device or generator_device, dtype=dtype)


# ---- guidance and the loop -------------------------------------------------------------------
def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def wan_denoiser(model, context, clip_fea=None, y=None) -> Denoiser:
    """`WanModel` as a denoiser with fixed conditioning (for I2V the unconditional pass keeps
    clip_fea and y and only swaps the text context, as the official code)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, context, clip_fea=clip_fea, y=y)

    return fn


def sample(
    model_fn: Denoiser,
    noise: torch.Tensor,
    *,
    steps: int,
    shift: float,
    solver: str = "unipc",
    guide_scale: float = 1.0,
    uncond_fn: Denoiser | None = None,
    grid: str = "wan",
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from `noise` (sigma ~ 1) to a clean latent (sigma 0).

    Each step calls `model_fn` (the conditional pass) and, when guide_scale != 1, `uncond_fn`,
    combined by `cfg_combine`; with guide_scale == 1 the unconditional pass is skipped (the
    combination would return v_cond). `callback(i, t, x)` runs after every step with the new x;
    `progress` shows a tqdm bar. `grid`: the sigma grid (`schedulers.flow_schedule`)."""
    if solver not in SOLVERS:
        raise InputError(f"unknown sample solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    guided = guide_scale != 1.0
    if guided and uncond_fn is None:
        raise InputError(f"guide_scale={guide_scale} needs uncond_fn (the pass with the negative prompt)")
    schedule = flow_schedule(steps, shift, solver, grid=grid)
    stepper = make_solver(solver, schedule)
    x = noise
    timesteps = schedule.timesteps.to(noise.device)
    bar = _progress_bar(len(schedule)) if progress else None
    for i, t in enumerate(timesteps):
        t_batch = t.expand(x.shape[0])
        v = model_fn(x, t_batch)
        if guided:
            v = cfg_combine(v, uncond_fn(x, t_batch), guide_scale)
        x = stepper.step(v.to(x.dtype), x)
        if callback is not None:
            callback(i, t, x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step")
