"""Text-, image- and first-last-frame-to-video over either latent space, stage by stage as the official code.

    pipe = T2VPipeline.from_pretrained("Wan2.1-T2V-1.3B", task="t2v-1.3B")
    result = pipe("a cat surfing", size="832*480", frame_num=81, seed=42)
    result.save("cat.mp4")

Stages: text (umT5) -> [I2V/FLF2V: CLIP features + conditioning latent] -> sampling (DiT) -> decode.
`offload_model` keeps each model on the CPU except while its stage runs (official
`--offload_model`); `t5_cpu` runs the text encoder on the CPU (official `--t5_cpu`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcvg_wan.components import ComponentPaths, default_autoencoder, locate_components
from dcvg_wan.cost import parse_size
from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.latent_spaces import (
    DCAEVSpace,
    LatentSpace,
    Rounded,
    WanVAESpace,
    fit_last_frame,
)
from dcvg_wan.model import WanModel
from dcvg_wan.sampling import (
    dcvg_defaults,
    make_noise,
    resolve_seed,
    sample,
    sample_defaults,
    wan_denoiser,
)
from dcvg_wan.scheduler_config import SchedulerSettings, read_scheduler_config

FPS = 16  # Wan-2.1 generates at 16 fps
DCAEV_TILE = 256  # vae_tiling's DC-AE-V spatial tile, pixels (the Wan VAE tiles take diffusers' defaults)


@dataclass
class Generation:
    """A generated video [3, F, H, W] in [-1, 1] with what produced it."""

    video: torch.Tensor
    latent: torch.Tensor
    seed: int
    size: Rounded
    timings: dict[str, float] = field(default_factory=dict)
    fps: int = FPS

    def frames_uint8(self) -> torch.Tensor:
        from dcae_v.io import to_uint8

        return to_uint8(self.video.unsqueeze(0))

    def save(self, path: str | os.PathLike) -> Path:
        """mp4 (H.264 yuv420p crf 18) at 16 fps, or the first frame as a PNG for a .png path (t2i),
        written atomically."""
        from dcae_v.io import write_video

        start = time.perf_counter()
        if Path(path).suffix.lower() == ".png":
            write_png(path, self.frames_uint8()[0].cpu().numpy())
        else:
            write_video(path, self.frames_uint8(), self.fps)
        self.timings["write"] = time.perf_counter() - start
        return Path(path)


def write_png(path: str | os.PathLike, rgb) -> None:
    """One uint8 [H, W, 3] frame as a PNG (PyAV's png encoder; temp file + rename)."""
    import av

    height, width = rgb.shape[:2]
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "rgb24"
    data = b"".join(bytes(p) for p in codec.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
    data += b"".join(bytes(p) for p in codec.encode(None))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Stage:
    """Times a stage and, with offloading, keeps `module` on the device only inside it."""

    def __init__(self, pipe: WanPipeline, name: str, module, device):
        self.pipe, self.name, self.module, self.device = pipe, name, module, device

    def __enter__(self):
        self.start = time.perf_counter()
        if self.module is not None:
            self.module.to(self.device)
        return self

    def __exit__(self, *exc):
        if self.module is not None and self.pipe.offload_model and self.device != torch.device("cpu"):
            self.module.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.pipe.timings[self.name] = time.perf_counter() - self.start


class WanPipeline:
    """Shared machinery of T2V, I2V and FLF2V; use `T2VPipeline` / `I2VPipeline` / `FLF2VPipeline`."""

    i2v = False  # conditioned on images (CLIP + y): I2V and FLF2V
    flf = False  # first and last frame (FLF2V)

    def __init__(
        self,
        dit: WanModel,
        space: LatentSpace,
        text_encoder,
        image_encoder=None,
        *,
        task: str | None = None,
        device: str | torch.device = "cpu",
        offload_model: bool = False,
        t5_cpu: bool = False,
        default_negative_prompt: str | None = None,
        sequence_parallel: bool = False,
        scheduler: SchedulerSettings | None = None,
    ):
        """default_negative_prompt: used when a call gives none (None: the official one of the task).
        sequence_parallel: run the DiT with Ulysses over the default process group (all ranks call
        the pipeline with the same arguments and seed). scheduler: a DC-VideoGen folder's
        scheduler_config.json (its flow_shift is the default shift).

        On DC-AE-V the defaults are NVIDIA's DC-VideoGen ones (`sampling.dcvg_defaults`), on the Wan
        VAE the official task's."""
        self.default_negative_prompt = default_negative_prompt
        self.scheduler = scheduler
        self.sequence_parallel = sequence_parallel
        self.dit, self.space, self.text_encoder, self.image_encoder = dit, space, text_encoder, image_encoder
        fallback = "flf2v-14B" if self.flf else "i2v-14B" if self.i2v else "t2v-14B"
        self.task = task or (dit.preset_names[0] if dit.preset_names else fallback)
        self.device = torch.device(device)
        self.offload_model, self.t5_cpu = offload_model, t5_cpu
        self.timings: dict[str, float] = {}
        check_compatible(dit, space, i2v=self.i2v, flf=self.flf)
        if self.i2v and image_encoder is None:
            raise InputError(f"{'first-last-frame' if self.flf else 'image'}-to-video needs the CLIP image encoder")

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | os.PathLike | None,
        *,
        task: str | None = None,
        ae: str | None = None,
        dcae_ckpt: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        offload_model: bool = False,
        t5_cpu: bool = False,
        attention: str = "sdpa",
        frames_per_tile: int | None = None,
        vae_tiling: bool = False,
        paths: ComponentPaths | None = None,
        default_negative_prompt: str | None = None,
        sequence_parallel: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> WanPipeline:
        """Load every component from a checkpoint folder (official, diffusers or NVIDIA's
        DC-VideoGen release; see `dcvg_wan.components`). `ae` None: DC-AE-V for a folder with
        NVIDIA's DC-AE-V file and no Wan VAE, else the Wan VAE (with `paths=`: DC-AE-V when
        paths.vae is None). On DC-AE-V, CLIP preprocesses as NVIDIA's I2V (shortest edge + center
        crop) and the folder's scheduler_config.json gives the default shift. The DiT and text encoder are cast to
        `dtype` (official: bf16); the autoencoders and CLIP stay in float32. `vae_tiling`: the
        autoencoder works in overlapping 256-pixel spatial tiles (the Wan VAE exactly as diffusers'
        `vae.enable_tiling()`; DC-AE-V with its own blended tiles): less memory, slightly other pixels."""
        from dcvg_wan.image_encoder import ImageEncoder
        from dcvg_wan.text_encoder import TextEncoder
        from dcvg_wan.vae import WanVAE

        if ckpt_dir is None and paths is None:
            raise CheckpointError(
                "from_pretrained needs ckpt_dir (a Wan-2.1 or DC-VideoGen folder) or paths=; the embedded demo "
                "models run with `dcvg-wan generate` (no --ckpt_dir), or in Python: paths, defaults = "
                "dcvg_wan.generate.embedded_default() (I2V: embedded_default('i2v-tiny') with I2VPipeline); "
                "T2VPipeline.from_pretrained(None, paths=paths, ae='dcae-v', dtype=torch.float32), then pass "
                "defaults' size, frame_num, steps and shift to the call")
        if ae is None:
            ae = ("wan-vae" if paths.vae is not None else "dcae-v") if paths is not None else default_autoencoder(ckpt_dir)
        paths = paths or locate_components(ckpt_dir, i2v=cls.i2v, ae=ae, dcae=dcae_ckpt)
        say = log or (lambda _msg: None)
        say(f"loading components ({ae}):\n{paths.describe()}")
        scheduler = read_scheduler_config(paths.scheduler) if ae == "dcae-v" and paths.scheduler else None
        for note in scheduler.notes if scheduler else ():
            say(f"note: {note}")
        home = "cpu" if offload_model else device
        dit = WanModel.from_pretrained(paths.dit, dtype=dtype, device=home).set_attention_backend(attention)
        if ae == "wan-vae":
            vae = WanVAE.from_pretrained(paths.vae).to(home).eval()
            if vae_tiling:
                vae.enable_tiling()
            space: LatentSpace = WanVAESpace(vae, dit.config.patch)
        else:
            from dcae_v import DCAEV

            # fp32 on the CPU (the shipped default is stored in fp16, which overflows there); bf16 on
            # GPUs, as NVIDIA runs its release
            ae_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
            dcae = DCAEV.from_pretrained(paths.dcae).to(home, ae_dtype).eval()
            space = DCAEVSpace(dcae, dit.config.patch, frames_per_tile, tile_size=DCAEV_TILE if vae_tiling else None)
        text = TextEncoder.from_pretrained(
            paths.text_encoder, tokenizer_dir=paths.tokenizer, dtype=dtype, device="cpu" if t5_cpu else home,
            text_len=dit.config.text_len,  # prompts longer than the DiT reads are truncated with a warning
        )
        clip_prep = "center-crop" if ae == "dcae-v" else "wan"  # NVIDIA's CLIPImageProcessor vs official Wan
        image = ImageEncoder.from_pretrained(paths.image_encoder, device=home, preprocessing=clip_prep) if cls.i2v else None
        return cls(
            dit, space, text, image, task=task, device=device, offload_model=offload_model, t5_cpu=t5_cpu,
            default_negative_prompt=default_negative_prompt, sequence_parallel=sequence_parallel, scheduler=scheduler,
        )

    # ---- stages --------------------------------------------------------------------------------
    def merge_lora(self, lora: str | os.PathLike | dict, strength: float = 1.0):
        """Merge a Wan-2.1 LoRA (a .safetensors file, a diffusers/peft folder or a state dict of
        ComfyUI, kohya, diffusers or peft keys) into the DiT's weights (`dcvg_wan.lora`). Returns
        the LoraReport; a LoRA for another model raises CheckpointError and changes nothing."""
        from dcvg_wan.lora import merge_lora, read_lora_file

        state = lora if isinstance(lora, dict) else read_lora_file(lora)
        return merge_lora(self.dit, state, strength, "" if isinstance(lora, dict) else str(lora))

    def _stage(self, name: str, module=None, device=None) -> _Stage:
        return _Stage(self, name, module, device or self.device)

    def encode_text(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        t5_device = torch.device("cpu") if self.t5_cpu else self.device
        with self._stage("text_encoder", self.text_encoder, t5_device):
            cond, uncond = self.text_encoder.encode([prompt, negative_prompt])
        return cond[None].to(self.device), uncond[None].to(self.device)

    def _denoise(self, noise, steps, shift, solver, guide_scale, context, context_null, clip_fea, y, progress):
        # The DiT casts to its weight dtype itself and keeps the official fp32 parts: no autocast.
        with self._stage("sampling", self.dit), torch.no_grad():
            return sample(
                self._denoiser(context, clip_fea, y),
                noise,
                steps=steps,
                shift=shift,
                solver=solver,
                guide_scale=guide_scale,
                uncond_fn=self._denoiser(context_null, clip_fea, y),
                progress=progress,
                grid=self._grid(solver),
            )

    def _grid(self, solver: str) -> str:
        """The sigma grid: diffusers' when a DC-VideoGen folder's scheduler_config.json drives UniPC (as
        NVIDIA's pipelines sample), else the official Wan grid."""
        return self.scheduler.grid if self.scheduler is not None and solver == "unipc" else "wan"

    def _denoiser(self, context, clip_fea, y):
        if not self.sequence_parallel:
            return wan_denoiser(self.dit, context, clip_fea, y)
        from dcvg_wan.parallel import sequence_parallel_forward

        def fn(x, t):
            return sequence_parallel_forward(self.dit, x, t, context, clip_fea, y)

        return fn

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with self._stage("decode", self.space.model), torch.no_grad():
            return self.space.decode(latent.float())

    @property
    def dcvg(self) -> bool:
        """DC-VideoGen (DC-AE-V latents): NVIDIA's defaults and I2V preparation apply."""
        return isinstance(self.space, DCAEVSpace)

    def defaults(self, size: str | None = None):
        """The SampleDefaults a call falls back on (NVIDIA's on DC-AE-V, the official task's otherwise)."""
        if self.dcvg:
            return dcvg_defaults(self.i2v, self.scheduler.shift if self.scheduler else None)
        return _defaults(self.task, size or "832*480", self.i2v)

    def _size(self, size: str | None) -> str:
        """A call's size; None: 1280*720 on DC-AE-V (NVIDIA), else 832*480 (this API's default)."""
        return size if size is not None else (self.defaults().size if self.dcvg else "832*480")

    def _settings(self, size, steps, shift, guide_scale, solver, negative_prompt):
        defaults = self.defaults(size)
        return (
            steps if steps is not None else defaults.steps,
            shift if shift is not None else defaults.shift,
            guide_scale if guide_scale is not None else defaults.guide_scale,
            solver or defaults.solver,
            negative_prompt or _first_set(self.default_negative_prompt, defaults.negative_prompt),
        )

    def _generate(self, prompt, rounded: Rounded, seed: int, settings, log, progress, condition=None) -> Generation:
        """The stages after sizing: text, [I2V `condition()` -> (clip_fea, y)], sampling, decode."""
        steps, shift, guide_scale, solver, negative_prompt = settings
        for note in rounded.notes:
            (log or print)(f"note: {note}")
        if log is not None:  # the settings actually used, defaults resolved (CLI)
            source = f" ({self.scheduler.source})" if self.scheduler is not None and shift == self.scheduler.shift else ""
            log(f"sampling: {solver}, {steps} steps, shift {shift:g}{source}, guidance {guide_scale:g}, "
                f"{self._grid(solver)} sigma grid")
        seed = resolve_seed(seed)
        context, context_null = self.encode_text(prompt, negative_prompt)
        clip_fea, y = condition() if condition is not None else (None, None)
        latent = self._denoise(
            self._noise(rounded, seed), steps, shift, solver, guide_scale, context, context_null, clip_fea, y, progress
        )
        video = self.decode(latent)[0]
        return Generation(video=video, latent=latent, seed=seed, size=rounded, timings=dict(self.timings))

    def _noise(self, rounded: Rounded, seed: int) -> torch.Tensor:
        gen_device = self.device if self.device.type == "cuda" else "cpu"  # CUDA: the official generator
        return make_noise((1, *self.space.latent_shape(rounded)), seed, device=self.device, generator_device=gen_device)


class T2VPipeline(WanPipeline):
    """Text to video."""

    def __call__(
        self,
        prompt: str,
        *,
        size: str | None = None,
        frame_num: int = 81,
        steps: int | None = None,
        shift: float | None = None,
        guide_scale: float | None = None,
        solver: str | None = None,
        seed: int = -1,
        negative_prompt: str = "",
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Generation:
        self.timings = {}
        size = self._size(size)
        settings = self._settings(size, steps, shift, guide_scale, solver, negative_prompt)
        width, height = parse_size(size)
        rounded = self.space.round_size(frame_num, height, width)
        return self._generate(prompt, rounded, seed, settings, log, progress)


def _area_note(rounded: Rounded, width: int, height: int, image: torch.Tensor) -> Rounded:
    """I2V/FLF2V read --size as an area (official): say so when the result is another size."""
    if (rounded.width, rounded.height) == (width, height):
        return rounded
    h, w = image.shape[-2:]
    note = (f"size {width}*{height} is read as a maximum area ({width * height} px) at the image's aspect "
            f"({w}x{h}): generating {rounded.width}*{rounded.height}")
    return dataclasses.replace(rounded, notes=(*rounded.notes, note))


class I2VPipeline(WanPipeline):
    """Image to video; `size` is read as a maximum area, the shape follows the image (official)."""

    i2v = True

    def __call__(
        self,
        prompt: str,
        image: torch.Tensor,
        *,
        size: str | None = None,
        frame_num: int = 81,
        steps: int | None = None,
        shift: float | None = None,
        guide_scale: float | None = None,
        solver: str | None = None,
        seed: int = -1,
        negative_prompt: str = "",
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Generation:
        """image: [3, H, W] or [1, 3, H, W] float in [-1, 1]. size (None: the default) is a maximum
        area. The image is resized to the generation size as the space's reference does (official
        Wan: float bicubic; DC-AE-V: NVIDIA's 8-bit PIL-style resize, which CLIP then sees too)."""
        self.timings = {}
        image = _check_image(image)
        size = self._size(size)
        settings = self._settings(size, steps, shift, guide_scale, solver, negative_prompt)
        width, height = parse_size(size)
        rounded = _area_note(self.space.area_size(frame_num, width * height, image.shape[-2] / image.shape[-1]),
                             width, height, image)

        def condition():
            resized = self.space.prepare_image(image.to(self.device), rounded.height, rounded.width)
            with self._stage("image_encoder", self.image_encoder):
                clip_in = resized if self.space.clip_sees_resized else image.to(self.device)
                clip_fea = self.image_encoder.encode(clip_in).to(self.device)
            with self._stage("condition", self.space.model), torch.no_grad():
                return clip_fea, self.space.image_condition(resized, rounded.frames)

        return self._generate(prompt, rounded, seed, settings, log, progress, condition)


class FLF2VPipeline(WanPipeline):
    """First and last frame to video (official `flf2v-14B`); `size` is a maximum area, the shape
    follows the first frame. Needs an FLF2V DiT (CLIP positions over both frames, `flf_pos_len`)."""

    i2v = True
    flf = True

    def __call__(
        self,
        prompt: str,
        first_frame: torch.Tensor,
        last_frame: torch.Tensor,
        *,
        size: str | None = None,
        frame_num: int = 81,
        steps: int | None = None,
        shift: float | None = None,
        guide_scale: float | None = None,
        solver: str | None = None,
        seed: int = -1,
        negative_prompt: str = "",
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Generation:
        """first_frame, last_frame: [3, H, W] or [1, 3, H, W] float in [-1, 1]. A last frame of
        another size is center-cropped to the first frame's aspect (`fit_last_frame`); both are then
        resized as I2V's image. CLIP encodes both ([2, 257, 1280]: the DiT adds its 514 positions);
        the Wan VAE conditions as official (the last frame as frame F-1), DC-AE-V as NVIDIA's
        `last_image` (4 copies closing the video)."""
        self.timings = {}
        first = _check_image(first_frame, "first_frame")
        last = _check_image(last_frame, "last_frame")
        size = self._size(size)
        settings = self._settings(size, steps, shift, guide_scale, solver, negative_prompt)
        width, height = parse_size(size)
        rounded = _area_note(self.space.area_size(frame_num, width * height, first.shape[-2] / first.shape[-1]),
                             width, height, first)
        if self.space.latent_frames(rounded.frames) < 2:
            need = self.space.temporal + 1 if self.space.name == "wan-vae" else 2 * self.space.temporal
            raise InputError(f"first-last-frame-to-video needs at least {need} frames on {self.space.name} (two latent "
                             f"frames: one per conditioning frame), got frame_num {frame_num}")
        last = fit_last_frame(last, *first.shape[-2:])

        def condition():
            a = self.space.prepare_image(first.to(self.device), rounded.height, rounded.width)
            b = self.space.prepare_image(last.to(self.device), rounded.height, rounded.width)
            with self._stage("image_encoder", self.image_encoder):
                clip_in = [a, b] if self.space.clip_sees_resized else [first.to(self.device), last.to(self.device)]
                clip_fea = self.image_encoder.encode(clip_in).to(self.device)
            with self._stage("condition", self.space.model), torch.no_grad():
                return clip_fea, self.space.image_condition(a, rounded.frames, last=b)

        return self._generate(prompt, rounded, seed, settings, log, progress, condition)


# ---- checks ------------------------------------------------------------------------------------
def check_compatible(dit: WanModel, space: LatentSpace, *, i2v: bool, flf: bool = False) -> None:
    """The DiT must take the latent space's channels (+ mask 4 + conditioning latent for I2V), and
    FLF2V needs a DiT with positions over two frames' CLIP tokens."""
    cfg, c = dit.config, space.channels
    expected_in = 2 * c + 4 if i2v else c
    if cfg.out_dim != c or cfg.in_dim != expected_in:
        hint = (
            "a DC-VideoGen DiT (NVIDIA's DC-Gen transformer/ or transformer_t2v/ / transformer_i2v/, or `dcvg-wan "
            "adapt` output) with --ae dcae-v"
            if space.name == "wan-vae"
            else "a Wan-VAE DiT with --ae wan-vae, or a DiT adapted to this DC-AE-V (`dcvg-wan adapt`)"
        )
        raise CheckpointError(
            f"the DiT takes in_dim={cfg.in_dim}/out_dim={cfg.out_dim} latent channels, but {space.name} "
            f"{'I2V ' if i2v else ''}needs in_dim={expected_in}/out_dim={c}: use {hint}"
        )
    if (cfg.image_dim is not None) != i2v:
        kind = "an I2V" if cfg.image_dim is not None else "a T2V"
        raise CheckpointError(f"the DiT is {kind} model; pick the matching --task")
    if i2v and (cfg.flf_pos_len is not None) != flf:
        if flf:
            raise CheckpointError("first-last-frame-to-video needs an FLF2V DiT (official Wan2.1-FLF2V-14B-720P: CLIP "
                                  "positions over both frames, flf_pos_len 514); this one is image-to-video: use "
                                  "--task i2v-14B --image")
        raise CheckpointError("the DiT is a first-last-frame (FLF2V) model; use --task flf2v-14B with --first_frame "
                              "and --last_frame")


def _check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise InputError(f"{name} must be a [3, H, W] or [1, 3, H, W] tensor in [-1, 1], got {getattr(image, 'shape', image)}")
    image = image if image.ndim == 4 else image[None]
    if image.shape[0] != 1:
        raise InputError("one image at a time" + ("" if name == "image" else f" ({name})"))
    if not torch.isfinite(image).all():
        raise InputError(f"the {name} contains NaN/Inf values")
    return image.float()


def _defaults(task: str, size: str, i2v: bool):
    """Official defaults for the task at this size. A size the official task does not list
    (allowed here: the latent space rounds it) gets the task's defaults at its default size; a
    custom DiT (no official task) those of t2v-14B / i2v-14B. The size is looked up in generate.py's
    spelling, so "480p" and "832x480" get I2V's 480p shift (3.0) as "832*480" does."""
    from dcvg_wan.cost import parse_size

    try:
        size = "{}*{}".format(*parse_size(size))
    except InputError:
        pass  # not a size: the fallbacks below take the task's default size
    for args in ((task, size), (task,), ("i2v-14B" if i2v else "t2v-14B", size), ("i2v-14B" if i2v else "t2v-14B",)):
        try:
            return sample_defaults(*args)
        except InputError:
            continue
    raise AssertionError("unreachable: the last fallback always resolves")


def _first_set(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)
