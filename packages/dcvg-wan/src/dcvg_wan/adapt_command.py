"""`dcvg-wan adapt`: AE-Adapt-V for Wan-2.1 on the user's videos (a thin app).

    dcvg-wan adapt --ckpt_dir Wan2.1-T2V-1.3B --dcae_ckpt dc-ae-v-f32t4c32-1.0-bf16.pt \
        --data my_videos/ --out adapted/ --size 832*480 --frame_num 81

1. Builds the paired-latent cache once (`OUT/cache`): every clip is encoded by the Wan VAE (the
   base model's latent space), by DC-AE-V (the new one) and by umT5; for I2V also the first
   frame's conditioning in both spaces and its CLIP features; and once the null prompt (the
   negative prompt DC-Gen trains 10% of the samples on). Then the encoders are freed. An
   interrupted build resumes at its last written shard when the command is run again.
2. Runs the three stages of `ae_adapt` (embedder alignment, head alignment, LoRA) with the Table 8
   preset, resumable: run the same command again after an interruption.
3. Writes `OUT/model` (loads with `dcvg-wan generate --ae dcae-v --ckpt_dir ...` once the
   encoders are beside it, or `WanModel.from_pretrained`), `OUT/adapter` (peft) and
   `OUT/lora_comfy.safetensors`.

Data: a folder of videos (subfolders included), each with a `<name>.txt` prompt beside it, or a
`.jsonl` file of {"video": path, "prompt": text} lines. Videos that cannot be read or are shorter
than --frame_num are skipped with a warning naming each; empty prompt files are warned about.

Reruns into the same --out resume or restore only what was made with the same settings: the cache
records its inputs (--size, --frame_num, --task, a digest of the data list: each video's name,
file size and prompt, and a content digest of the DC-AE-V weights, not their file name), and each
stage's done.json its settings. A rerun with other ones is refused with the changed fields named
(use a new --out, or delete the named folders). A NaN/Inf loss stops the stage without touching
its last checkpoint (DivergedError; the command exits non-zero, "diverged": exit 6 as
`dcae-v train`), and a rerun with a lower lr resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from dcvg_wan.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi")

# The null text of DC-Gen's text dropout (dc_ai/videogencore/text_encoder.py
# `get_null_embeddings`): Wan's negative prompt written with ASCII commas, "镜头晃动," before it for I2V.
DCGEN_NULL_PROMPT = (
    "色调艳丽,过曝,静态,细节模糊不清,字幕,风格,作品,画作,画面,静止,整体发灰,最差质量,低质量,JPEG压缩残留,"
    "丑陋的,残缺的,多余的手指,画得不好的手部,画得不好的脸部,畸形的,毁容的,形态畸形的肢体,手指融合,"
    "静止不动的画面,杂乱的背景,三条腿,背景人很多,倒着走"
)
DCGEN_I2V_NULL_PROMPT = "镜头晃动," + DCGEN_NULL_PROMPT


def null_prompt(task: str) -> str:
    """The prompt whose embedding replaces the text in DC-Gen's condition dropout for `task`."""
    return DCGEN_I2V_NULL_PROMPT if task.startswith("i2v") else DCGEN_NULL_PROMPT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt_dir", required=True, help="the base Wan-2.1 checkpoint folder (official or -Diffusers)")
    p.add_argument("--dcae_ckpt", required=True,
                   help="DC-AE-V checkpoint (.pt or folder); `default`: the small one shipped with dcae-v")
    p.add_argument("--data", required=True, help="folder of videos with <name>.txt prompts, or a .jsonl list")
    p.add_argument("--out", required=True, help="output folder (cache, stage checkpoints, adapted model)")
    p.add_argument("--task", default=None, choices=("t2v-1.3B", "t2v-14B", "i2v-14B"),
                   help="default: the DiT's own (t2v-1.3B or t2v-14B; an I2V DiT needs --task i2v-14B, which "
                        "also caches the image conditioning)")
    p.add_argument("--size", default="832*480", help="W*H the clips are resized and centre-cropped to")
    p.add_argument("--frame_num", type=int, default=81, help="frames per clip (4n+1; DC-AE-V takes the first 4n)")
    p.add_argument("--preset", default=None, help="ae-adapt preset (default wan-1.3B for t2v-1.3B, else wan-14B)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--lora_scope", default="blocks", choices=("blocks", "all-linear"),
                   help="Linear layers that get LoRA: the blocks' (default) or every one but the head "
                        "(NVIDIA's DC-Gen code default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="preset overrides, e.g. embedder.steps=100 lora_rank=64")


def iter_clips(data: str | os.PathLike | list[tuple[Path, str]], *, frames: int, width: int,
               height: int) -> Iterator[dict]:
    """{"video": [3, frames, height, width] in [-1, 1], "prompt": str, "name": str} per video of
    `data` (a --data path, or what `list_videos` made of it).

    A video that cannot be read or is shorter than `frames` is skipped with a warning naming it
    (as `dcae-v train` skips bad files), so one bad file does not end hours of encoding; when
    none is usable, an InputError says why for the first few."""
    from dcae_v.errors import DCAEVError
    from dcae_v.io import read_video, to_model_range

    skipped: list[str] = []
    used = 0
    for path, prompt in list_videos(data) if isinstance(data, str | os.PathLike) else data:
        try:
            video = read_video(path, max_frames=frames)
        except DCAEVError as err:
            skipped.append(f"cannot read {path}: {err}")
        else:
            if video.frames.shape[0] < frames:
                skipped.append(f"{path} has {video.frames.shape[0]} frames, fewer than --frame_num {frames}")
            else:
                used += 1
                x = to_model_range(video.frames)[0]  # [3, T, H, W]
                yield {"video": resize_crop(x, height, width), "prompt": prompt, "name": Path(path).name}
                continue
        warnings.warn(f"skipping a video: {skipped[-1]}", stacklevel=2)
    if not used:
        raise InputError("no usable video in --data: " + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if skipped:
        warnings.warn(f"{len(skipped)} of {used + len(skipped)} videos skipped (named above)", stacklevel=2)


def _with_progress(items: Iterator[dict], *, total: int, desc: str) -> Iterator[dict]:
    """The cache build (hours on a real dataset) with a progress bar."""
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)


def list_videos(data: str | os.PathLike) -> list[tuple[Path, str]]:
    data = Path(data)
    if data.is_file() and data.suffix == ".jsonl":
        items = []
        for n, line in enumerate(data.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    items.append(((data.parent / row["video"]), str(row["prompt"])))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise InputError(f"{data}:{n}: expected {{\"video\": path, \"prompt\": text}}, got {line[:80]!r}") from err
        return items
    if not data.is_dir():
        raise InputError(f"--data {data} is neither a folder of videos nor a .jsonl list")
    videos = sorted(p for p in data.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(data).parts))
    if not videos:
        raise InputError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {data} or its subfolders")
    missing = [str(v.relative_to(data)) for v in videos if not v.with_suffix(".txt").is_file()]
    if missing:
        raise InputError(f"these videos have no <name>.txt prompt beside them: {', '.join(missing[:10])}")
    items = [(v, v.with_suffix(".txt").read_text().strip()) for v in videos]
    empty = [str(v.relative_to(data)) for v, prompt in items if not prompt]
    if empty:  # trained as the empty prompt: allowed, but rarely meant
        warnings.warn(f"{len(empty)} prompt file(s) are empty (trained with the empty prompt): {', '.join(empty[:5])}",
                      stacklevel=2)
    return items


def resize_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, T, H, W] -> [3, T, height, width]: scale to cover, then centre-crop (area filter)."""
    _, _, h, w = x.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    y = F.interpolate(x.transpose(0, 1), size=(nh, nw), mode="area" if scale < 1 else "bilinear", align_corners=None
                      if scale < 1 else False).transpose(0, 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return y[:, :, top : top + height, left : left + width].contiguous()


def parse_overrides(items: list[str]) -> dict:
    """["embedder.steps=100", "lora_rank=64"] -> {"embedder": {"steps": 100}, "lora_rank": 64} as
    nested replace() arguments (values parsed as JSON when possible)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InputError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _apply_overrides(preset_name: str, overrides: dict) -> dict:
    """Turn nested overrides into `get_preset` keyword arguments (sub-configs replaced field-wise),
    each value checked against its field's type (`ae_adapt.overrides`)."""
    from ae_adapt.errors import PresetError
    from ae_adapt.overrides import preset_overrides

    try:
        return preset_overrides(preset_name, overrides)
    except PresetError as err:
        raise InputError(f"--set: bad override {err}") from err


# which --set section holds the lr of a stage (for the hint of a diverged run)
STAGE_SECTIONS = {"align_embedder": "embedder", "align_head": "head"}


def data_digest(data: str | os.PathLike, videos: list[tuple[Path, str]]) -> dict:
    """{"videos": count, "digest": ...} of the data list (`list_videos(data)`): each video's path
    (relative to the data folder or list), file size and prompt. Not the video bytes (hours of
    reading on a big set): an edited video that keeps its name and size goes unnoticed."""
    import hashlib

    root = Path(data) if Path(data).is_dir() else Path(data).parent
    rows = []
    for path, prompt in videos:
        size = path.stat().st_size if path.is_file() else None
        rows.append([os.path.relpath(path, root), size, prompt])
    return {"videos": len(rows), "digest": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]}


def check_cache_inputs(cache_dir: Path, out: Path, inputs: dict, new_ae: str) -> None:
    """Refuse a cache in --out built from other inputs (size, frames, task, data, autoencoder),
    naming the changed ones: its latents would silently stand for the new ones."""
    from ae_adapt.cache import cache_input_changes

    changed = cache_input_changes(cache_dir, inputs, new_ae=new_ae)
    if changed:
        stages = sorted(str(d) for d in out.iterdir() if d.is_dir() and d.name[:2] in ("1-", "2-", "3-", "4-"))
        also = f" and the stage folders trained on it ({', '.join(stages)})" if stages else ""
        raise InputError(
            f"{cache_dir} was built from other inputs than this run's: {'; '.join(changed)}. Its latents do not "
            f"fit the new ones: use a new --out, or delete {cache_dir}{also} to rebuild it "
            "(or rerun with the old arguments)"
        )


def task_of(config, asked: str | None) -> str:
    """The task of the DiT being adapted (its WanConfig), which picks the Table 8 schedule and
    whether the cache holds I2V conditioning: the DiT's own, or --task where it fits. A 1.3B model
    on the 14B schedule, or an I2V model without image conditioning, would silently be something
    else, so a mismatch is refused before any work."""
    from dcvg_wan.config import preset_names

    names = preset_names(config)
    if config.image_dim is not None:
        own = "i2v-14B"
    else:
        own = "t2v-1.3B" if "t2v-1.3B" in names else "t2v-14B"
    # T2V sizes are refused only for an official architecture: a custom DiT takes the --task given
    mismatch = asked != own and (own == "i2v-14B" or asked == "i2v-14B" or (asked is not None and own in names))
    if mismatch:
        raise InputError(f"--task {asked} does not fit the DiT in --ckpt_dir, a {own} model "
                         f"({', '.join(names) or 'custom architecture'}); pass --task {own}"
                         f"{'' if own == 'i2v-14B' else ' or drop --task'}")
    return asked or own


def run(args: argparse.Namespace, log=print):
    import dataclasses

    from ae_adapt import build_cache
    from ae_adapt.cache import module_digest
    from ae_adapt.errors import DivergedError
    from dcae_v import DCAEV
    from dcvg_wan.adapt import run_adapt
    from dcvg_wan.checkpoint import read_wan_config
    from dcvg_wan.components import locate_components
    from dcvg_wan.cost import parse_size
    from dcvg_wan.generate import parse_device
    from dcvg_wan.latent_spaces import DCAEVSpace, WanVAESpace
    from dcvg_wan.model import WanModel
    from dcvg_wan.text_encoder import TextEncoder
    from dcvg_wan.vae import WanVAE

    device = parse_device(args.device)
    width, height = parse_size(args.size)
    if (args.frame_num - 1) % 4 or args.frame_num < 5:
        raise InputError(f"--frame_num must be 4n+1 (>= 5) so that both autoencoders see the same clip, got {args.frame_num}")
    paths = locate_components(args.ckpt_dir, i2v=(args.task or "").startswith("i2v"), ae="wan-vae")
    wan_config = read_wan_config(paths.dit)
    task = task_of(wan_config, args.task)
    i2v = task.startswith("i2v")
    preset = args.preset or ("wan-1.3B" if task == "t2v-1.3B" else "wan-14B")
    overrides = _apply_overrides(preset, parse_overrides(args.set))
    log(f"task {task}; ae-adapt preset {preset} (Table 8)")
    shipped = args.dcae_ckpt == "default"
    dcae = DCAEV.from_pretrained(None if shipped else args.dcae_ckpt).to(device, torch.float32).eval()
    # identified by its weights, not its file name: another DC-AE-V under the same name is another latent space
    digest = module_digest(dcae, dataclasses.asdict(dcae.config))
    dcae_name = f"dcae-v:{dcae.config.latent_channels}c:sha256-{digest[:16]}"
    out = Path(args.out)
    cache_dir = out / "cache"
    videos = list_videos(args.data)  # listed once: the digest, the progress bar and the cache build
    inputs = {"size": f"{width}*{height}", "frame_num": args.frame_num, "task": task,
              "data": data_digest(args.data, videos)}
    if (cache_dir / "index.json").is_file():
        check_cache_inputs(cache_dir, out, inputs, dcae_name)
    else:
        log(f"building the latent cache in {cache_dir}")
        vae = WanVAE.from_pretrained(paths.vae).to(device).eval()
        text = TextEncoder.from_pretrained(paths.text_encoder, tokenizer_dir=paths.tokenizer, device=device)
        base, new = WanVAESpace(vae, (1, 2, 2)), DCAEVSpace(dcae, (1, 1, 1))
        image_encoder = None
        if i2v:
            from dcvg_wan.image_encoder import ImageEncoder

            image_encoder = ImageEncoder.from_pretrained(paths.image_encoder, device=device)

        def to(v):
            return v[None].to(device)

        def extra(clip):
            if not i2v:
                return {}
            first = to(clip["video"][:, 0])
            return {"base_y": base.image_condition(first, args.frame_num)[0],
                    "new_y": new.image_condition(first, args.frame_num - 1)[0],
                    "clip_fea": image_encoder.encode(first)[0]}

        build_cache(
            _with_progress(iter_clips(videos, frames=args.frame_num, width=width, height=height),
                           total=len(videos), desc="caching latents"),
            cache_dir,
            base_encode=lambda v: base.encode(to(v))[0],
            new_encode=lambda v: new.encode(to(v[:, : args.frame_num - 1]))[0],
            # the DiT takes at most text_len rows (Wan: 512, what umT5 encodes at most)
            text_encode=lambda prompt: text.encode([prompt])[0][: wan_config.text_len],
            base_ae="wan-vae",
            new_ae=dcae_name,
            extra=extra,
            new_patch=(1, 1, 1),
            null_prompt=null_prompt(task),
            inputs=inputs,
        )
        del vae, text, image_encoder, base, new
    model = WanModel.from_pretrained(paths.dit, device=device)
    try:
        result = run_adapt(model, cache_dir, out, base_ae="wan-vae", new_ae=dcae_name,
                           new_channels=dcae.latent_channels, patch=(1, 1, 1), preset=preset, overrides=overrides,
                           lora_scope=getattr(args, "lora_scope", "blocks"))
    except DivergedError as err:  # name the --set that lowers this stage's lr
        section = STAGE_SECTIONS.get(getattr(err, "stage", ""), "lora")
        hinted = DivergedError(f"{err} (here: --set {section}.lr=... or {section}.max_grad_norm=1.0)")
        hinted.stage, hinted.step, hinted.checkpoint = err.stage, err.step, err.checkpoint
        raise hinted from err
    if result is None:
        log("this launch finished one stage (torchrun: one stage per launch); run the same command again")
        return None
    log(f"adapted model: {out / 'model'}; LoRA (peft): {out / 'adapter'}; "
        f"ComfyUI LoRA: {out / 'lora_comfy.safetensors'}")
    return result
