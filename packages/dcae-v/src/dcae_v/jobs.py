"""Whole-file jobs behind the CLI: reconstruct, encode, decode, evaluate.

Chunk-causal and causal models run files as streams (read a tile, encode, decode, write), so
memory does not grow with the video length. Clips are padded as NVIDIA's `reconstruct_video`
does (copies of the last frame at the end, up to a whole chunk; edge rows/columns up to a
multiple of f) and cropped back; metrics are computed on uint8 frames, per frame.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dcae_v.__about__ import __version__
from dcae_v.checkpoint import _atomic
from dcae_v.errors import InputError
from dcae_v.io import (
    VideoWriter,
    check_output_path,
    iter_video,
    pad_to_multiple,
    probe_video,
    read_video,
    to_model_range,
    to_uint8,
    write_reason,
)
from dcae_v.metrics import PSNR_CAP_DB, psnr_per_frame, ssim_per_frame
from dcae_v.model import DCAEV

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi", ".m4v"}


@dataclass
class Report:
    """What a job did, printable and JSON-serialisable."""

    output: str
    frames: int
    height: int
    width: int
    fps: float
    seconds: float
    psnr: float | None = None
    ssim: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's `disable`: progress=None lets tqdm decide (bars only on a terminal)."""
    return None if progress is None else not progress


def default_tile(model: DCAEV) -> int:
    """Frames per streaming tile when the user gives none: whole chunks, at least 40 frames
    (one call per 8-frame chunk is several times slower on CPU than batching a few)."""
    chunk = model.config.chunk_size
    return chunk * max(1, -(-40 // chunk))


def _streams(model: DCAEV) -> bool:
    return model.config.temporal != "non_causal"


def _model_pieces(model: DCAEV, pieces: Iterator[torch.Tensor], originals: deque, seen: list[int]) -> Iterator[torch.Tensor]:
    """uint8 pieces -> padded model-range pieces; remembers the originals for metrics."""
    last = None
    for piece in pieces:
        originals.append(piece)
        seen[0] += piece.shape[0]
        x = pad_to_multiple(to_model_range(piece).to(model.device), 1, model.spatial_compression)
        last = x[:, :, -1:]
        yield x
    # one frame is an image: a 4-frame still clip, as `encode` treats it
    multiple = model.pad_multiples(seen[0]) if seen[0] > 1 else model.temporal_compression
    pad = (-seen[0]) % multiple
    if pad and last is not None:
        yield last.expand(-1, -1, pad, -1, -1)


def _take(originals: deque, n: int) -> torch.Tensor | None:
    """Pop up to n original frames (fewer once only padding remains)."""
    taken, count = [], 0
    while originals and count < n:
        piece = originals.popleft()
        if count + piece.shape[0] > n:
            originals.appendleft(piece[n - count :])
            piece = piece[: n - count]
        taken.append(piece)
        count += piece.shape[0]
    return torch.cat(taken) if taken else None


@torch.inference_mode()
def reconstruct_file(
    model: DCAEV,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    frames_per_tile: int | None = None,
    tile_size: int | None = None,
    lossless: bool = False,
    max_frames: int | None = None,
    progress: bool | None = False,
) -> Report:
    """Encode and decode a video or image file, write the result and measure PSNR/SSIM."""
    start = time.time()
    info = probe_video(src)
    height, width = info.height, info.width
    psnrs, ssims, written = [], [], 0
    bar = tqdm(total=max_frames or info.frame_count, unit="frame", disable=_quiet(progress), desc="reconstruct")
    with VideoWriter(dst, info.fps, lossless=lossless) as writer:
        for ref, rec in _reconstruct_pieces(model, src, frames_per_tile, tile_size, max_frames):
            rec = rec[:, :height, :width]
            psnrs.append(psnr_per_frame(ref, rec))
            ssims.append(ssim_per_frame(ref, rec) if min(height, width) >= 11 else torch.full((len(rec),), float("nan")))
            writer.write(rec)
            written += rec.shape[0]
            bar.update(rec.shape[0])
    bar.close()
    psnr = torch.cat(psnrs).clamp(max=PSNR_CAP_DB).mean().item()
    ssim = torch.cat(ssims).mean().item()
    return Report(os.fspath(dst), written, height, width, info.fps, time.time() - start, psnr, ssim)


def _reconstruct_pieces(model, src, frames_per_tile, tile_size, max_frames) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(original uint8 frames, reconstructed uint8 frames) in order, streaming when possible."""
    if not _streams(model) or probe_video(src).frame_count == 1:
        video = read_video(src, max_frames=max_frames).frames
        y = model.reconstruct(to_model_range(video).to(model.device), frames_per_tile, tile_size)
        yield video, to_uint8(y)
        return
    step = frames_per_tile or default_tile(model)
    originals: deque = deque()
    seen = [0]
    pieces = _model_pieces(model, iter_video(src, step, max_frames=max_frames), originals, seen)
    latents = model.encode_stream(pieces, step, tile_size)
    for y in model.decode_stream(latents, step, tile_size):
        rec = to_uint8(y)
        ref = _take(originals, rec.shape[0])
        if ref is None:
            break  # only end padding is left
        yield ref, rec[: ref.shape[0]]


@torch.inference_mode()
def encode_file(
    model: DCAEV,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    frames_per_tile: int | None = None,
    tile_size: int | None = None,
    max_frames: int | None = None,
    progress: bool | None = False,
) -> Report:
    """Video file -> `latent` tensor in a .safetensors file (unscaled, as `encode` returns it),
    with the facts needed to decode it back (size, frame count, fps, model) as metadata."""
    start = time.time()
    check_latent_output(dst)
    info = probe_video(src)
    if not _streams(model) or info.frame_count == 1:
        video = read_video(src, max_frames=max_frames).frames
        frames = video.shape[0]
        x = pad_to_multiple(to_model_range(video).to(model.device), model.pad_multiples(frames), model.spatial_compression)
        z = model.encode(x, frames_per_tile, tile_size)
    else:
        seen = [0]
        step = frames_per_tile or default_tile(model)
        pieces = _model_pieces(model, iter_video(src, step, max_frames=max_frames), deque(maxlen=1), seen)
        stream = model.encode_stream(pieces, step, tile_size)
        z = torch.cat(list(tqdm(stream, unit="tile", disable=_quiet(progress), desc="encode")), dim=2)
        frames = seen[0]
    meta = {
        "frames": frames, "height": info.height, "width": info.width, "fps": info.fps,
        "model": model.config.to_dict(), "scaling_factor": model.scaling_factor,
        "dcae_v_version": __version__, "source": os.fspath(src),
    }
    latent = z.float().cpu().contiguous()
    try:
        _atomic(Path(dst), lambda tmp: save_file({"latent": latent}, tmp, metadata={"dcae_v": json.dumps(meta)}))
    except (OSError, SafetensorError) as e:
        raise InputError(f"cannot write {os.fspath(dst)!r}: {write_reason(e)}") from e
    return Report(os.fspath(dst), frames, info.height, info.width, info.fps, time.time() - start)


def check_latent_output(path: str | os.PathLike) -> None:
    """Latents are written as safetensors: refuse another suffix (a .pt name would mislead
    torch.load users) and an unwritable place, before anything is encoded."""
    if Path(path).suffix.lower() != ".safetensors":
        raise InputError(
            f"cannot write {os.fspath(path)!r}: latents are written as safetensors; use a .safetensors path"
        )
    check_output_path(path)


def read_latent_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the latent .safetensors file written by `dcae-v encode`")
    if not path.is_file():
        raise InputError(f"no latent file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dcae_v", "{}"))
            keys = list(f.keys())
            if "latent" not in keys:
                raise InputError(f"{path} has no 'latent' tensor (keys: {keys[:5]}); was it written by `dcae-v encode`?")
            return f.get_tensor("latent"), meta
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type for foreign files
        raise InputError(f"cannot read {path} as a latent .safetensors file: {e}") from None


@torch.inference_mode()
def decode_file(
    model: DCAEV,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    frames_per_tile: int | None = None,
    tile_size: int | None = None,
    lossless: bool = False,
    fps: float | None = None,
    progress: bool | None = False,
) -> Report:
    """Latent file from `encode_file` -> video, cropped back to the source's size and length."""
    start = time.time()
    z, meta = read_latent_file(src)
    model._check_latent(z)  # channel count first: the most specific message
    _check_same_architecture(model, meta.get("model"), src)
    _warn_other_settings(model, meta.get("model"), src)
    tc, f = model.temporal_compression, model.spatial_compression
    frames = meta.get("frames", z.shape[2] * tc)
    height, width = meta.get("height", z.shape[3] * f), meta.get("width", z.shape[4] * f)
    fps = fps or meta.get("fps") or 16.0
    z = z.to(model.device)
    if _streams(model) and frames > 1:
        step = frames_per_tile or default_tile(model)
        pieces = model.decode_stream(z.split(step // tc, dim=2), step, tile_size)
    else:
        pieces = iter([model.decode(z, frames_per_tile, tile_size)])
    written = 0
    with VideoWriter(dst, fps, lossless=lossless) as writer:
        for y in tqdm(pieces, unit="tile", disable=_quiet(progress), desc="decode"):
            rec = to_uint8(y)[: max(0, frames - written), :height, :width]
            if rec.shape[0]:
                writer.write(rec)
                written += rec.shape[0]
    return Report(os.fspath(dst), written, height, width, fps, time.time() - start)


def _check_same_architecture(model: DCAEV, stored: dict | None, src) -> None:
    """A latent decodes only with the architecture that made it (same channels is not enough)."""
    if not stored:
        return
    keys = ("latent_channels", "widths", "depths", "temporal_compression")
    ours = model.config.to_dict()
    if any(list(stored.get(k, [])) != list(ours[k]) if isinstance(ours[k], (list, tuple)) else stored.get(k) != ours[k] for k in keys):
        theirs = ", ".join(f"{k}={stored.get(k)}" for k in keys)
        raise InputError(
            f"{src} was encoded by a different DC-AE-V ({theirs}); decode it with that model's --checkpoint"
        )


def _warn_other_settings(model: DCAEV, stored: dict | None, src) -> None:
    """Same architecture but other chunking/scaling still decodes, usually into garbage: say so."""
    if not stored:
        return
    ours = model.config.to_dict()
    changed = [k for k in ("temporal", "chunk_size", "scaling_factor", "in_channels") if k in stored and stored[k] != ours[k]]
    if changed:
        diff = ", ".join(f"{k} {stored[k]} (file) vs {ours[k]} (model)" for k in changed)
        warnings.warn(
            f"{src} was encoded by a DC-AE-V with other settings: {diff}; the video may be wrong, "
            f"decode with the --checkpoint that encoded it",
            stacklevel=3,
        )


def center_crop_resize(video: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3]: resize the shorter side to `size` (antialiased bilinear), centre crop."""
    _, h, w, _ = video.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = video.permute(0, 3, 1, 2).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.inference_mode()
def evaluate_dir(
    model: DCAEV,
    directory: str | os.PathLike,
    *,
    frames: int = 80,
    size: int = 256,
    frames_per_tile: int | None = None,
    tile_size: int | None = None,
    lpips=None,
    fvd=None,
    max_clips: int | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """The paper's protocol: the first `frames` frames of each video, shorter side resized to
    `size` and centre-cropped to size x size, reconstructed, scored per frame on uint8."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory of videos")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)[:max_clips]
    if not files:
        raise InputError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) found under {directory}")
    rows, skipped, reals, fakes = [], [], [], []
    for path in tqdm(files, unit="clip", disable=_quiet(progress), desc="eval"):
        try:
            video = read_video(path, max_frames=frames).frames
        except InputError as e:
            skipped.append({"file": str(path), "reason": str(e)})
            continue
        if video.shape[0] < frames:
            skipped.append({"file": str(path), "reason": f"only {video.shape[0]} frames (< {frames})"})
            continue
        ref = center_crop_resize(video, size)
        tile = frames_per_tile or (default_tile(model) if _streams(model) else None)
        rec = to_uint8(model.reconstruct(to_model_range(ref).to(model.device), tile, tile_size))
        row = {"file": str(path.relative_to(directory)), "psnr": psnr_per_frame(ref, rec).clamp(max=PSNR_CAP_DB).mean().item(),
               "ssim": ssim_per_frame(ref, rec).mean().item()}
        if lpips is not None:
            row["lpips"] = lpips.mean(ref, rec)
        if fvd is not None:
            reals.append(ref), fakes.append(rec)
        rows.append(row)
    if not rows:
        raise InputError(f"none of the {len(files)} videos under {directory} could be evaluated: {skipped[:3]}")
    metrics = [k for k in ("psnr", "ssim", "lpips") if k in rows[0]]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in metrics}
    if fvd is not None:
        mean["fvd"] = float(fvd.distance(torch.stack(reals), torch.stack(fakes)))
    return {"protocol": {"frames": frames, "size": size}, "model": model.config.to_dict(),
            "clips": rows, "mean": mean, "skipped": skipped}


def format_table(result: dict[str, Any]) -> str:
    metrics = [k for k in ("psnr", "ssim", "lpips") if k in result["clips"][0]]
    width = max(12, *(len(r["file"]) for r in result["clips"]))
    lines = [f"{'clip':<{width}}  " + "  ".join(f"{m.upper():>8}" for m in metrics)]
    for r in result["clips"]:
        lines.append(f"{r['file']:<{width}}  " + "  ".join(f"{r[m]:8.4f}" for m in metrics))
    lines.append(f"{'mean (' + str(len(result['clips'])) + ' clips)':<{width}}  " + "  ".join(f"{result['mean'][m]:8.4f}" for m in metrics))
    if "fvd" in result["mean"]:
        lines.append(f"FVD: {result['mean']['fvd']:.4f}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['file']}: {s['reason']}")
    return "\n".join(lines)
