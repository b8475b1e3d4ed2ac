"""`dcvg-wan generate`: the official generate.py flags on our pipelines (a thin app).

Without --ckpt_dir it runs the embedded demo models (`dcvg_wan.assets/t2v-tiny`, and
`i2v-tiny` with --image; DC-AE-V latents), so the command does something real offline; with it,
the user's Wan-2.1 or DC-VideoGen weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from importlib import resources
from pathlib import Path

import torch

from dcvg_wan.components import ComponentPaths
from dcvg_wan.errors import InputError

EXAMPLE_PROMPT = {  # wan/configs/__init__.py / generate.py EXAMPLE_PROMPT
    "t2v": "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.",
    "i2v": "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline "
    "gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring "
    "crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally "
    "relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's "
    "intricate details and the refreshing atmosphere of the seaside.",
    "t2i": "一个朴素端庄的美人",
    "flf2v": "CG动画风格，一只蓝色的小鸟从地面起飞，煽动翅膀。小鸟羽毛细腻，胸前有独特的花纹，背景是蓝天白云，阳光明媚。"
    "镜跟随小鸟向上移动，展现出小鸟飞翔的姿态和天空的广阔。近景，仰视视角。",
}
TASKS = ("t2v-1.3B", "t2v-14B", "i2v-14B", "flf2v-14B", "t2i-14B")
_VACE = "VACE (Wan2.1-VACE) is another architecture, not implemented here"
# official tasks this package does not run, with the reason (so they fail with it, not with a usage error)
NOT_SUPPORTED = {
    "vace-1.3B": _VACE,
    "vace-14B": _VACE,
}
EMBEDDED = "t2v-tiny"
EMBEDDED_I2V = "i2v-tiny"  # the same DiT made image-to-video (tools/train_wan_default.py)
EMBEDDED_TASKS = (EMBEDDED, EMBEDDED_I2V)


def embedded_default(name: str = EMBEDDED) -> tuple[ComponentPaths, dict]:
    """Paths of a shipped demo model and its sampling defaults (defaults.json). i2v-tiny ships its
    DiT and CLIP tower and reads t2v-tiny's text encoder, tokenizer and autoencoder."""
    assets = Path(str(resources.files("dcvg_wan") / "assets"))
    base, root = assets / EMBEDDED, assets / name
    if not (root / "defaults.json").is_file() or not (base / "defaults.json").is_file():
        raise InputError(
            f"the embedded demo model is missing from this installation ({root}); pass --ckpt_dir with Wan-2.1 weights"
        )
    # the demo DiT only understands the latents of the autoencoder it was trained on: it ships beside
    # it (autoencoder/), so that a newer default DC-AE-V in dcae-v does not silently break the demo
    pinned = base / "autoencoder"
    paths = ComponentPaths(dit=root / "transformer", text_encoder=base / "text_encoder", tokenizer=base / "tokenizer",
                           dcae=pinned if (pinned / "config.json").is_file() else None,
                           image_encoder=root / "image_encoder" if name == EMBEDDED_I2V else None)
    return paths, json.loads((root / "defaults.json").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The official generate.py flags (same names and defaults) plus ours."""
    p.add_argument("--task", default=None, choices=TASKS + EMBEDDED_TASKS + tuple(NOT_SUPPORTED),
                   help="official task (default: t2v-14B with --ckpt_dir, the embedded t2v-tiny without, i2v-tiny "
                        "with --image)")
    p.add_argument("--size", default=None,
                   help="W*H, WxH or 480p/720p/1080p (official default 1280*720, t2v-1.3B 832*480; I2V: the maximum "
                        "area; the demo model: 128*128); any size is rounded to the latent grid, with a note")
    p.add_argument("--frame_num", type=int, default=None,
                   help="frames (default 81, the demo model 16; Wan VAE 4n+1, DC-AE-V 4n)")
    p.add_argument("--ckpt_dir", default=None, help="Wan-2.1 (official or -Diffusers) or DC-VideoGen checkpoint folder")
    p.add_argument("--offload_model", type=_bool, default=None,
                   help="keep models on the CPU between stages (default: True on one GPU, as official)")
    p.add_argument("--t5_cpu", action="store_true", help="run the umT5 text encoder on the CPU")
    p.add_argument("--save_file", default=None,
                   help="output .mp4/.mov/.mkv (t2i: .png; default: an automatic name in the current directory)")
    p.add_argument("--prompt", default=None, help="the prompt (default: the official example prompt)")
    p.add_argument("--negative_prompt", default=None,
                   help="default (as official, also when empty): the official negative prompt; DC-VideoGen (dcae-v): "
                        "NVIDIA's English VIDEO_NEGATIVE_PROMPT")
    p.add_argument("--base_seed", type=int, default=None,
                   help="-1: random; else 0 .. 2**63-1 (default -1; DC-VideoGen (dcae-v): 42, as NVIDIA's generate.py)")
    p.add_argument("--image", default=None, help="I2V: the first frame (any image PyAV reads)")
    p.add_argument("--first_frame", default=None, help="FLF2V (--task flf2v-14B): the first frame (any image PyAV reads)")
    p.add_argument("--last_frame", default=None,
                   help="FLF2V: the last frame (another size is center-cropped to the first frame's aspect)")
    p.add_argument("--sample_solver", default="unipc", choices=("unipc", "dpm++", "euler"))
    p.add_argument("--sample_steps", type=int, default=None, help="default: 50 (T2V) / 40 (I2V); DC-VideoGen 50; the demo model 30")
    p.add_argument("--sample_shift", type=float, default=None, help="default: 5.0 (I2V 480p: 3.0, FLF2V 16); DC-VideoGen: the folder's "
                   "scheduler/scheduler_config.json flow_shift, else 5.0; the demo model 3.0")
    p.add_argument("--sample_guide_scale", type=float, default=5.0)
    p.add_argument("--ae", default=None, choices=("wan-vae", "dcae-v"),
                   help="latent space: wan-vae (base Wan-2.1) or dcae-v (DC-VideoGen); default: dcae-v for a folder with "
                        "NVIDIA's dc-ae-v-f32t4c32-1.0-bf16.pt and no Wan VAE, else wan-vae")
    p.add_argument("--image_encoder", default=None,
                   help="I2V: the CLIP image encoder (official .pth or a diffusers image_encoder/ folder), for folders "
                        "without one (NVIDIA's DC-Gen I2V uses Wan-AI/Wan2.1-I2V-14B-720P-Diffusers/image_encoder)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH",
                   help="a Wan-2.1 LoRA (.safetensors: ComfyUI, kohya/musubi, diffusers or peft keys) merged into the "
                        "DiT before sampling; repeat for several")
    p.add_argument("--lora_strength", action="append", type=float, default=None, metavar="S",
                   help="LoRA strength (default 1.0): one for all --lora files, or one per file in order")
    p.add_argument("--dcae_ckpt", default=None, help="DC-AE-V checkpoint (.pt or folder) for --ae dcae-v; `default`: the one shipped with dcae-v")
    p.add_argument("--dit", default=None,
                   help="a DiT folder/file that replaces the one in --ckpt_dir (e.g. `dcvg-wan adapt`'s OUT/model)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="DiT/text-encoder dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--frames_per_tile", type=int, default=None, help="DC-AE-V streaming decode tile (frames)")
    p.add_argument("--vae_tiling", action="store_true",
                   help="decode in overlapping 256-px spatial tiles (Wan VAE: as diffusers' vae.enable_tiling()); "
                        "less memory at 720p and above, slightly different pixels")
    p.add_argument("--ulysses_size", type=int, default=1, help="sequence-parallel ranks (= torchrun processes)")
    p.add_argument("--ring_size", type=int, default=1, help="ring attention ranks (not supported: keep 1)")
    p.add_argument("--dit_fsdp", action="store_true", help="shard the DiT's weights over the torchrun processes (FSDP2)")
    p.add_argument("--t5_fsdp", action="store_true",
                   help="shard the umT5 text encoder's blocks over the torchrun processes (FSDP2)")
    # the official prompt-extension flags are recognised, so that they fail with a reason, not a usage error
    p.add_argument("--use_prompt_extend", action="store_true", help="not supported (needs an online or local LLM)")
    p.add_argument("--prompt_extend_method", default="local_qwen", help=argparse.SUPPRESS)
    p.add_argument("--prompt_extend_model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt_extend_target_lang", default="zh", help=argparse.SUPPRESS)
    # so are other official flags of tasks/features not implemented here (each refused in run() with the reason)
    for flag in ("--src_video", "--src_mask", "--src_ref_images"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fp8", action="store_true", help=argparse.SUPPRESS)


# official flags recognised but refused, with the reason
REFUSED_FLAGS = {
    "src_video": _VACE, "src_mask": _VACE, "src_ref_images": _VACE,
    "fp8": "fp8 compute is not supported here; the DiT runs in --dtype bf16 (the default on CUDA), fp16 or fp32. "
           "fp8 checkpoint files (ComfyUI's *_fp8_e4m3fn / *_fp8_scaled) load without this flag: pass one "
           "with --dit and it is dequantized to --dtype",
}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def run(args: argparse.Namespace, log=print) -> Path | None:
    """Load, generate, save; returns the written path. Under torchrun the process group this
    creates is closed at the end, all ranks together (gloo can abort a process whose peer exits
    first)."""
    import torch.distributed as dist

    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    path = _run(args, log)
    if owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return path


def _run(args: argparse.Namespace, log) -> Path | None:
    from dcvg_wan.pipelines import FLF2VPipeline, I2VPipeline, T2VPipeline

    device = parse_device(args.device)
    if args.use_prompt_extend:
        raise InputError("--use_prompt_extend is not supported: prompt extension needs an LLM (DashScope or a local "
                         "Qwen), which this package does not ship; extend the prompt yourself and pass it as --prompt")
    for name, reason in REFUSED_FLAGS.items():
        if getattr(args, name, None):
            raise InputError(f"--{name}: {reason}")
    rank, world = _init_distributed(args, device)
    if world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device.type == "cuda" else device
        if rank != 0:
            log = _silent
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    embedded = args.ckpt_dir is None
    from dcvg_wan.components import default_autoencoder, folder_is_i2v

    # NVIDIA's DC-Gen folders hold one task each: an I2V folder runs I2V without --task
    task = args.task or ((EMBEDDED_I2V if args.image else EMBEDDED) if embedded
                         else "i2v-14B" if folder_is_i2v(args.ckpt_dir) else "t2v-14B")
    task_from_folder = args.task is None and task == "i2v-14B"
    if args.task is not None and not embedded and args.task in TASKS:
        from dcvg_wan.components import folder_dit_is_i2v

        dit_i2v = folder_dit_is_i2v(args.ckpt_dir)
        if dit_i2v is not None and dit_i2v != args.task.startswith(("i2v", "flf2v")):
            kind = "image-to-video" if dit_i2v else "text-to-video"
            raise InputError(f"--task {args.task} does not fit {args.ckpt_dir}: its DiT (transformer/config.json) is "
                             f"{kind}; drop --task (the folder's task is taken) or use "
                             f"{'i2v-14B (or flf2v-14B for an FLF2V DiT)' if dit_i2v else 't2v-14B'}")
    defaults: dict = {}
    paths = None
    if task in NOT_SUPPORTED:
        raise InputError(f"--task {task}: {NOT_SUPPORTED[task]}; supported: {', '.join(TASKS)}")
    if task in EMBEDDED_TASKS and not embedded:
        raise InputError(f"--task {task} is an embedded demo model and takes no --ckpt_dir; drop --task to run the "
                         "checkpoint (t2v-14B by default) or drop --ckpt_dir to run the demo")
    if embedded:
        if task not in EMBEDDED_TASKS:
            raise InputError(f"--task {task} needs --ckpt_dir (without it: the embedded demo models {EMBEDDED}, "
                             f"text-to-video, and {EMBEDDED_I2V}, image-to-video with --image)")
        if args.ae == "wan-vae":
            raise InputError("the embedded demo model runs on DC-AE-V latents; drop --ae wan-vae or pass --ckpt_dir")
        if args.dcae_ckpt is not None:
            raise InputError("--dcae_ckpt cannot replace the embedded demo model's autoencoder (its DiT understands only "
                             "the latents of the one it was trained on); pass --ckpt_dir too, or drop --dcae_ckpt")
        paths, defaults = embedded_default(task)
        log(f"no --ckpt_dir: using the embedded demo model {task} (a toy Wan {'I2V ' if task == EMBEDDED_I2V else ''}"
            f"DiT on DC-AE-V latents trained on synthetic scenes; try --prompt \"{defaults['example_prompt']}\""
            + (f" --image {Path(paths.dit).parent / 'example.png'})" if task == EMBEDDED_I2V else ")"))
    t2i = task.startswith("t2i")
    if t2i and args.frame_num not in (None, 1):
        raise InputError(f"--task {task} generates one image: drop --frame_num or pass 1 (got {args.frame_num})")
    i2v = task.startswith("i2v")
    flf = task.startswith("flf2v")
    if flf and not (args.first_frame and args.last_frame):
        raise InputError(f"--task {task} needs --first_frame PATH and --last_frame PATH (the video's first and last "
                         "frames)")
    if not flf and (args.first_frame or args.last_frame):
        raise InputError(f"--first_frame/--last_frame are for --task flf2v-14B (first-last-frame-to-video); --task "
                         f"{task} takes {'--image' if i2v else 'neither'}")
    if flf and args.image:
        raise InputError("--image is for i2v-14B; --task flf2v-14B takes --first_frame and --last_frame")
    if i2v and not args.image:
        raise InputError("an I2V task needs --image PATH (the first frame; input_image_path= in NVIDIA's generate.py words)" + (
            f"; {args.ckpt_dir} holds an image-to-video DiT (transformer/config.json has an image path), so the "
            "task is i2v-14B" if task_from_folder else ""))
    if not i2v and args.image:
        raise InputError(f"--image is only for I2V tasks; --task {task} is text-to-video")
    check_arguments(args, t2i)
    image = read_image(args.image) if i2v else None  # before the (slow) model loading: a typo fails fast
    frames = (read_image(args.first_frame, "--first_frame"), read_image(args.last_frame, "--last_frame")) if flf else None
    if args.attention == "triton" and device.type != "cuda":
        log(f"note: --attention triton runs its kernels on CUDA; on {device.type} attention falls back to SDPA")
    ae = args.ae or ("dcae-v" if embedded else default_autoencoder(args.ckpt_dir))
    least = 8 if ae == "dcae-v" else 5  # two latent frames: one per conditioning frame
    if flf and args.frame_num is not None and args.frame_num < least:
        raise InputError(f"--task {task} needs at least {least} frames on {ae} (two latent frames, one per conditioning "
                         f"frame), got --frame_num {args.frame_num}")
    if not embedded and (args.task is None or args.ae is None):
        log(f"task {task}{' (from the folder: an image-to-video DiT)' if task_from_folder else ''}, autoencoder {ae}"
            + (" (from the folder: DC-AE-V weights, no Wan VAE)" if args.ae is None and ae == "dcae-v" else ""))
    # official: offload on one GPU, not with several processes
    offload = args.offload_model if args.offload_model is not None else (device.type == "cuda" and world == 1)
    if offload and (args.dit_fsdp or args.t5_fsdp):
        raise InputError("--offload_model True cannot be combined with --dit_fsdp/--t5_fsdp (sharded weights stay on "
                         "their GPUs); drop one of them")
    if args.t5_fsdp and args.t5_cpu:
        raise InputError("--t5_fsdp and --t5_cpu exclude each other: shard umT5 over the GPUs or run it on the CPU")
    pipe_cls = FLF2VPipeline if flf else I2VPipeline if i2v else T2VPipeline
    start = time.perf_counter()
    if args.dit is not None or args.image_encoder is not None:
        if embedded:
            raise InputError("--dit/--image_encoder replace a component of a --ckpt_dir; pass --ckpt_dir too")
        from dcvg_wan.components import locate_components

        paths = locate_components(args.ckpt_dir, i2v=i2v or flf, ae=ae, dit=args.dit, dcae=args.dcae_ckpt,
                                  image_encoder=args.image_encoder if i2v or flf else None)
    from dcvg_wan.lora import merge_lora, read_lora_file

    strengths = args.lora_strength or [1.0]
    if args.lora and len(strengths) not in (1, len(args.lora)):
        raise InputError(f"{len(args.lora)} --lora files and {len(strengths)} --lora_strength values: give one strength "
                         "for all, or one per file")
    if not all(math.isfinite(x) for x in strengths):
        raise InputError(f"--lora_strength must be finite numbers, got {strengths}")
    loras = [(path, read_lora_file(path)) for path in args.lora]  # before the (slow) model loading
    if loras:
        _check_loras_fit(loras, args, paths, i2v or flf, ae)
    if args.lora_strength and not args.lora:
        raise InputError("--lora_strength without --lora: name the LoRA file(s) with --lora PATH")
    pipe = pipe_cls.from_pretrained(
        args.ckpt_dir, task=None if embedded else task, ae=ae, dcae_ckpt=args.dcae_ckpt, device=device,
        dtype=dtype, offload_model=offload, t5_cpu=args.t5_cpu, attention=args.attention,
        frames_per_tile=args.frames_per_tile, vae_tiling=args.vae_tiling, paths=paths,
        default_negative_prompt=defaults.get("negative_prompt"),
        sequence_parallel=args.ulysses_size > 1, log=log,
    )
    for i, (path, state) in enumerate(loras):  # merged before any sharding, on every rank
        log(merge_lora(pipe.dit, state, strengths[0] if len(strengths) == 1 else strengths[i], path).note())
    if args.dit_fsdp or args.t5_fsdp:
        from dcvg_wan.parallel import dit_shard_units, shard_for_inference, text_encoder_shard_units

        if args.dit_fsdp:
            shard_for_inference(dit_shard_units(pipe.dit))
        if args.t5_fsdp:
            shard_for_inference(text_encoder_shard_units(pipe.text_encoder.model))
        log(f"sharded over {world} processes: {'DiT ' if args.dit_fsdp else ''}{'umT5' if args.t5_fsdp else ''}".strip())
    log(f"loaded in {time.perf_counter() - start:.1f} s")
    prompt = args.prompt if args.prompt is not None else (
        defaults.get("example_prompt") or EXAMPLE_PROMPT["i2v" if i2v else "flf2v" if flf else "t2i" if t2i else "t2v"])
    if embedded:
        from dcvg_wan.demo_prompt import demo_prompt

        read = demo_prompt(prompt, paths.tokenizer)
        prompt = read.text
        if read.note():
            log(read.note())
    size = args.size or defaults.get("size") or ("832*480" if task == "t2v-1.3B" else "1280*720")
    common = {
        "size": size,
        "frame_num": 1 if t2i else args.frame_num if args.frame_num is not None else defaults.get("frame_num", 81),
        "steps": args.sample_steps if args.sample_steps is not None else defaults.get("steps"),
        "shift": args.sample_shift if args.sample_shift is not None else defaults.get("shift"),
        "guide_scale": args.sample_guide_scale,
        "solver": args.sample_solver,
        "seed": _shared_seed(default_seed(args.base_seed, ae, embedded), world),
        "negative_prompt": args.negative_prompt or "",
        "progress": rank == 0,
        "log": log,
    }
    if flf:
        result = pipe(prompt, *frames, **common)
    elif i2v:
        result = pipe(prompt, image, **common)
    else:
        result = pipe(prompt, **common)
    if rank != 0:  # every rank sampled the same latent; rank 0 alone writes it (as official)
        return None
    save_file = args.save_file or default_save_file(task, result.size.size, prompt, args.ulysses_size, args.ring_size)
    result.save(save_file)
    log(f"seed {result.seed}; {result.size.frames} frames of {result.size.size}")
    log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    log(f"saved {save_file}")
    return Path(save_file)


def _silent(_message: str) -> None:
    return None


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


def check_arguments(args: argparse.Namespace, t2i: bool) -> None:
    """What needs no weights, checked before any model loads (a 14B load takes minutes, and a bad
    --save_file used to fail only after sampling)."""
    from dcvg_wan.cost import parse_size

    for flag, value in (("--sample_steps", args.sample_steps), ("--frame_num", args.frame_num),
                        ("--frames_per_tile", args.frames_per_tile), ("--ulysses_size", args.ulysses_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if args.sample_shift is not None and not args.sample_shift > 0:
        raise InputError(f"--sample_shift must be positive, got {args.sample_shift}")
    if args.base_seed is not None and not -1 <= args.base_seed < 2**63:
        raise InputError(f"--base_seed must be -1 (random) or in 0 .. 2**63-1, got {args.base_seed}")
    if args.size is not None:
        parse_size(args.size)
    if args.save_file is not None:
        check_save_file(args.save_file, t2i)


def check_save_file(path: str | os.PathLike, t2i: bool) -> None:
    """The output must be writable with a suffix this task writes: video tasks .mp4/.mov/.mkv,
    t2i also .png."""
    from dcae_v.errors import InputError as AutoencoderInputError
    from dcae_v.io import check_output_path

    target = Path(path)
    allowed = (".png", *VIDEO_SUFFIXES) if t2i else VIDEO_SUFFIXES
    if target.suffix.lower() not in allowed and not target.is_dir():
        hint = "" if t2i else " (.png is for the t2i-14B task)"
        raise InputError(f"cannot write {str(path)!r}: use a {', '.join(allowed)} path{hint}")
    try:  # a directory target, a missing or unwritable folder (probed by creating a file: holds for root too)
        check_output_path(path)
    except AutoencoderInputError as e:
        raise InputError(str(e)) from None


def parse_device(text: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default cuda when available), refused with the fix otherwise."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text!r} is not a device this package runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text} was asked for but torch sees no CUDA device; use --device cpu")
    return device


def _init_distributed(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """(rank, world): torchrun's processes (the Ulysses group with --ulysses_size N, the FSDP group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ring_size != 1:
        raise InputError(f"--ring_size must be 1 (ring attention is not supported; use --ulysses_size), got "
                         f"{args.ring_size}")
    if args.ulysses_size > 1 and args.ulysses_size != world:
        raise InputError(
            f"--ulysses_size {args.ulysses_size} must equal the number of processes ({world}); launch with "
            f"torchrun --nproc_per_node {args.ulysses_size} -m dcvg_wan.cli generate ... --ulysses_size {args.ulysses_size}"
        )
    if world == 1 and (args.dit_fsdp or args.t5_fsdp):
        raise InputError("--dit_fsdp/--t5_fsdp shard over several processes; launch with torchrun --nproc_per_node N "
                         "-m dcvg_wan.cli generate ... (or drop them on one GPU)")
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _check_loras_fit(loras, args: argparse.Namespace, paths, i2v: bool, ae: str) -> None:
    """Each LoRA against the DiT's architecture, read from its headers and built on the meta device:
    a LoRA for another model is refused before a (14B) checkpoint loads."""
    from dcvg_wan.checkpoint import read_wan_config
    from dcvg_wan.components import locate_components
    from dcvg_wan.lora import check_lora, check_not_merged
    from dcvg_wan.model import WanModel

    if paths is None:
        paths = locate_components(args.ckpt_dir, i2v=i2v, ae=ae, dit=args.dit, dcae=args.dcae_ckpt,
                                  image_encoder=args.image_encoder if i2v else None)
    with torch.device("meta"):
        skeleton = WanModel(read_wan_config(paths.dit))
    for path, state in loras:
        check_not_merged(paths.dit, path)
        check_lora(skeleton, state, path)


def default_seed(seed: int | None, ae: str, embedded: bool) -> int:
    """--base_seed left out: 42 for a DC-VideoGen checkpoint (NVIDIA's generate.py), else -1 (random, official)."""
    if seed is not None:
        return seed
    from dcvg_wan.sampling import DCVG_SEED

    return DCVG_SEED if ae == "dcae-v" and not embedded else -1


def _shared_seed(seed: int, world: int) -> int:
    """-1 becomes one random seed, broadcast from rank 0 so that every rank draws the same noise."""
    from dcvg_wan.sampling import resolve_seed

    seed = resolve_seed(seed)
    if world > 1:
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def read_image(path: str | os.PathLike, flag: str = "--image") -> torch.Tensor:
    """The first frame of any image/video PyAV reads -> [1, 3, H, W] in [-1, 1]."""
    from dcae_v.errors import DCAEVError
    from dcae_v.io import read_video, to_model_range

    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such file" + (" (a folder)" if Path(path).is_dir() else ""))
    try:
        frames = read_video(path, max_frames=1).frames
    except DCAEVError as err:
        raise InputError(f"cannot read {flag} {path}: {err}") from err
    return to_model_range(frames)[:, :, 0]


def default_save_file(task: str, size: str, prompt: str, ulysses_size: int = 1, ring_size: int = 1) -> str:
    """Official naming: task_size_ulysses_ring_prompt_timestamp.mp4 (.png for t2i), with WxH for W*H."""
    words = re.sub(r"[^\w]+", "_", prompt.strip())[:50].strip("_")
    suffix = ".png" if task.startswith("t2i") else ".mp4"
    stamp = time.strftime("%Y%m%d_%H%M%S")
    return f"{task}_{size.replace('*', 'x')}_{ulysses_size}_{ring_size}_{words}_{stamp}{suffix}"
