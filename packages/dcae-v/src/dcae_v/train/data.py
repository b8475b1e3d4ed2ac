"""Training clips from a folder or list of videos and images, decoded with PyAV.

Sample `i` of optimizer step `s` is a pure function of (seed, s, i) and the files: which file,
which frame stride, which start frame and which crop all come from
`numpy.random.default_rng([seed, s, i, attempt])`. So a resumed run sees exactly the batches an
uninterrupted one would, and N processes splitting the indices of a global batch see exactly the
clips one process would. A file that fails to decode is skipped (next attempt), logged once and
counted once (`skipped_files`); it never stops a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcae_v.errors import InputError
from dcae_v.io import probe_video, read_video
from dcae_v.train.config import ConfigError, DataConfig

log = logging.getLogger("dcae_v.train")
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif", ".m4v", ".mpg", ".mpeg", ".ts"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MEDIA_SUFFIXES = VIDEO_SUFFIXES | IMAGE_SUFFIXES
MAX_ATTEMPTS = 32


def list_files(source: str) -> list[Path]:
    """Media files of a folder (recursive, sorted), of a list file (one path per line, '#' comments,
    relative paths resolved against the list file's folder), or the one video/image named.

    A list file must name only videos and images, so a wrong file (a manifest, a config) is refused
    at once; listed files that do not exist are reported here, once, and left out."""
    root = Path(source)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)
        where = f"folder {root}"
    elif root.is_file() and root.suffix.lower() in MEDIA_SUFFIXES:
        return [root]  # one clip to overfit: every sample is a random window and crop of it
    elif root.is_file():
        files = _read_list_file(root)
        where = f"list file {root}"
    else:
        raise ConfigError(f"data.source {source!r} does not exist; give a folder of videos/images, a list file or one video")
    if not files:
        raise ConfigError(f"no videos or images in {where} (looked for {', '.join(sorted(MEDIA_SUFFIXES))})")
    return files


def _read_list_file(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"data.source {path} is neither a folder, a video/image (suffixes {', '.join(sorted(MEDIA_SUFFIXES))}) "
            f"nor a text list of files (it is not UTF-8 text)"
        ) from None
    entries = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    entries = [(n, ln) for n, ln in entries if ln and not ln.startswith("#")]
    for n, ln in entries:
        if Path(ln).suffix.lower() not in MEDIA_SUFFIXES:
            raise ConfigError(
                f"data.source {path} is not a list of videos/images: line {n} ({ln[:80]!r}) does not end in one of "
                f"{', '.join(sorted(MEDIA_SUFFIXES))}; a list file has one video or image path per line ('#' comments)"
            )
    files = [p if p.is_absolute() else path.parent / p for p in (Path(ln) for _, ln in entries)]
    present = [p for p in files if p.is_file()]  # one stat per listed file (lists can be long)
    found = set(present)
    missing = [p for p in files if p not in found]
    if missing and len(missing) == len(files):
        raise ConfigError(f"none of the {len(files)} files listed in {path} exists (e.g. {missing[0]}); "
                          f"relative paths are taken from the list file's folder {path.parent}")
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        log.warning("%d of %d files listed in %s do not exist and are left out: %s", len(missing), len(files), path, shown)
    return present


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass
class Batch:
    """One micro-batch: video clips [b, 3, T, H, W] and still images [b, 3, 1, H, W] in [-1, 1]."""

    video: torch.Tensor | None
    image: torch.Tensor | None

    @property
    def count(self) -> int:
        return sum(x.shape[0] for x in (self.video, self.image) if x is not None)

    def groups(self) -> list[torch.Tensor]:
        return [x for x in (self.video, self.image) if x is not None]

    def to(self, device) -> Batch:
        return Batch(*(x.to(device) if x is not None else None for x in (self.video, self.image)))


class ClipDataset:
    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.files = list_files(cfg.source)
        self.entries = [p for p in self.files for _ in range(cfg.image_repeat if is_image(p) else 1)]
        self.bad: dict[str, str] = {}  # path -> reason, each logged once
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def skipped(self) -> int:
        """Distinct files found unusable so far (each is skipped from then on)."""
        return len(self.bad)

    def check_batch(self, batch_size: int) -> None:
        single = Path(self.cfg.source).is_file() and Path(self.cfg.source).suffix.lower() in MEDIA_SUFFIXES
        if batch_size > len(self.files) and not single:  # one named clip: a batch is several windows of it
            raise ConfigError(
                f"optim.batch_size={batch_size} is larger than the data ({len(self.files)} files in "
                f"{self.cfg.source}); lower the batch size or add data"
            )

    def batch(self, step: int, indices: range) -> Batch:
        videos, images = [], []
        for i in indices:
            clip = self.sample(step, i)
            (images if clip.shape[1] == 1 and self.cfg.frames != 1 else videos).append(clip)
        stack = (lambda xs: torch.stack(xs) if xs else None)
        return Batch(stack(videos), stack(images))

    def sample(self, step: int, index: int) -> torch.Tensor:
        """Clip [3, T, H, W] (or [3, 1, H, W] from an image) in [-1, 1]."""
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, step, index, attempt])
            path = self.entries[int(rng.integers(len(self.entries)))]
            if str(path) in self.bad:
                continue
            try:
                return self._clip(path, rng)
            except InputError as e:
                self._mark_bad(path, str(e))
        raise InputError(
            f"no usable file after {MAX_ATTEMPTS} draws at step {step}; {len(self.bad)} of {len(self.files)} files "
            f"are unusable (e.g. {next(iter(self.bad.items()), ('', ''))})"
        )

    def _mark_bad(self, path: Path, reason: str) -> None:
        self.bad[str(path)] = reason
        log.warning("skipping %s (%d unusable so far): %s", path, len(self.bad), reason)

    def _clip(self, path: Path, rng: np.random.Generator) -> torch.Tensor:
        T = 1 if is_image(path) else self.cfg.frames
        stride = int(rng.integers(1, self.cfg.max_stride + 1))
        frames = self._frames(path, T, stride, rng)
        n, h, w = frames.shape[:3]
        if n < T:
            raise InputError(f"only {n} frames, fewer than data.frames={T}")
        x = frames.permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, n, H, W]
        size = self.cfg.size
        if min(h, w) < size:  # upscale small sources so a full crop exists
            scale = size / min(h, w)
            h, w = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        return x[:, :, y0 : y0 + size, x0 : x0 + size].contiguous()

    def _frames(self, path: Path, T: int, stride: int, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [T, H, W, 3] with the given stride (smaller if the file is short), random start."""
        if self.cfg.cache_decoded or T == 1:
            key = str(path)
            if key not in self._cache:
                frames = read_video(path).frames
                if self.cfg.cache_decoded:
                    self._cache[key] = frames
            else:
                frames = self._cache[key]
            return _window(frames, T, stride, rng)
        count = probe_video(path).frame_count
        if count is None:
            return _window(read_video(path).frames, T, stride, rng)
        stride = _fit_stride(count, T, stride)
        start = int(rng.integers(max(1, count - (T - 1) * stride)))
        return read_video(path, start_frame=start, max_frames=T, frame_stride=stride).frames


def _fit_stride(n: int, T: int, stride: int) -> int:
    return max(1, min(stride, (n - 1) // (T - 1))) if T > 1 else 1


def _window(frames: torch.Tensor, T: int, stride: int, rng: np.random.Generator) -> torch.Tensor:
    n = frames.shape[0]
    if n < T:
        return frames
    stride = _fit_stride(n, T, stride)
    start = int(rng.integers(n - (T - 1) * stride))
    return frames[start : start + (T - 1) * stride + 1 : stride]
