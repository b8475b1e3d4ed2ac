"""Video files <-> tensors: reading anything PyAV opens, writing mp4/mkv atomically, model-range helpers.

Frames live as uint8 [T, H, W, 3] RGB; the model takes float [B, 3, T, H, W] in [-1, 1].
Every problem a user can fix (missing or corrupt file, odd pixel format, wrong array) raises
`InputError` or warns; PyAV errors never escape raw.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Self

import av
import numpy as np
import torch

from dcae_v.errors import InputError

STILL_IMAGE_FPS = 1.0  # image demuxers (png_pipe, jpeg_pipe, ...) invent 25 fps for a single picture
_TEXT_DEMUXERS = {"tty", "bin", "adf", "idf", "xbin"}  # FFmpeg renders any text file as ANSI art
_NTSC_RATES = [Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120)]
_LOSSY_MUXERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass(frozen=True)
class Video:
    """A decoded clip plus what is needed to write it back at the same speed."""

    frames: torch.Tensor  # uint8 [T, H, W, 3]
    fps: float  # of the returned frames: the source rate divided by frame_stride
    path: str
    source_pix_fmt: str


@dataclass(frozen=True)
class VideoInfo:
    """Header facts, for planning (tiling, memory) before decoding anything."""

    width: int
    height: int
    fps: float
    frame_count: int | None  # None when the container does not store it (mkv, webm, images)
    pix_fmt: str
    codec: str


# ---- model range -----------------------------------------------------------------------------
def pad_to_multiple(x: torch.Tensor, t_multiple: int, s_multiple: int) -> torch.Tensor:
    """Pad [B, C, T, H, W] so T is a multiple of t_multiple and H, W of s_multiple.

    Time is padded at the end with copies of the last frame (as NVIDIA's reference does);
    space at the bottom/right by replicating the last row/column, so no new content appears
    at the borders. Returns x itself when nothing needs padding.
    """
    if x.ndim != 5 or 0 in x.shape[2:]:
        raise InputError(f"expected a non-empty video tensor [B, C, T, H, W], got shape {tuple(x.shape)}")
    if t_multiple < 1 or s_multiple < 1:
        raise InputError(f"pad multiples must be >= 1, got t_multiple={t_multiple}, s_multiple={s_multiple}")
    for dim, multiple in ((2, t_multiple), (3, s_multiple), (4, s_multiple)):
        extra = -x.shape[dim] % multiple
        if extra:
            edge = x.narrow(dim, x.shape[dim] - 1, 1)
            x = torch.cat([x, edge.expand(*[extra if d == dim else -1 for d in range(5)])], dim=dim)
    return x


def crop_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Crop y [B, C, T', H', W'] to x's T, H, W, keeping the start / top-left (undoes pad_to_multiple)."""
    t, h, w = x.shape[2:]
    if y.ndim != 5 or y.shape[2] < t or y.shape[3] < h or y.shape[4] < w:
        raise InputError(f"cannot crop shape {tuple(y.shape)} to T, H, W = {t}, {h}, {w}: it is smaller")
    return y[:, :, :t, :h, :w]


def to_model_range(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB frames [T, H, W, 3] (uint8, uint16, or float in [0, 1]) -> float32 [1, 3, T, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    _check_frames_shape(x.shape)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.dtype == torch.uint16:
        x = x.float() / 65535
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise InputError("frames contain NaN/Inf values; clean them before encoding")
        if x.min() < 0 or x.max() > 1:
            raise InputError(
                f"float frames must be in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                f"divide 8-bit values by 255 (or pass uint8), or give [-1, 1] tensors to the model directly"
            )
    else:
        raise InputError(f"frames must be uint8, uint16 or float in [0, 1], got dtype {x.dtype}")
    return ((x - 0.5) / 0.5).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Model output [B, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] of the first item.

    Rounds 255 * (x / 2 + 0.5) and clamps, the quantisation NVIDIA applies before metrics.
    """
    if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
        raise InputError(f"expected a float video [B, 3, T, H, W] in [-1, 1], got {video.dtype} {tuple(video.shape)}")
    x = video[0].detach().float()
    if not torch.isfinite(x).all():
        raise InputError("video contains NaN/Inf values; the model output is broken (check weights and dtype)")
    return torch.round(255 * (x / 2 + 0.5)).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _check_frames_shape(shape: tuple[int, ...]) -> None:
    shape = tuple(shape)
    if len(shape) == 4 and shape[-1] == 3:
        if 0 in shape:
            raise InputError(f"frames are empty: shape {shape}; need at least one frame of non-zero size")
        return
    if len(shape) == 4 and shape[-1] == 4:
        raise InputError(
            f"frames have 4 channels (RGBA?) shape {shape}; drop alpha with frames[..., :3] "
            f"or composite over a background first"
        )
    if (len(shape) == 4 and shape[-1] == 1) or (len(shape) == 3 and shape[-1] != 3):
        raise InputError(
            f"frames look grayscale (shape {shape}); replicate to RGB, e.g. np.repeat(gray[..., None], 3, axis=-1)"
        )
    if len(shape) == 3:
        raise InputError(f"expected frames [T, H, W, 3], got one image {shape}; add a frame axis: image[None]")
    hint = "; channels-first? permute to [T, H, W, 3]" if len(shape) == 4 and shape[1] == 3 else ""
    raise InputError(f"expected RGB frames [T, H, W, 3], got shape {shape}{hint}")


# ---- reading ---------------------------------------------------------------------------------
def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, rate, pixel format and (if stored) frame count, from the headers without decoding."""
    with _open(path) as container:
        s = container.streams.video[0]
        return VideoInfo(
            width=s.codec_context.width,
            height=s.codec_context.height,
            fps=_fps(container, s),
            frame_count=(s.frames or None) if not _is_still(container) else 1,
            pix_fmt=s.codec_context.pix_fmt or "unknown",
            codec=s.codec_context.name,
        )


def read_video(
    path: str | os.PathLike, *, max_frames: int | None = None, start_frame: int = 0, frame_stride: int = 1
) -> Video:
    """Decode a video (or a still image, as one frame at STILL_IMAGE_FPS) to uint8 [T, H, W, 3] RGB.

    start_frame is exact: earlier frames are decoded and dropped. Sources that are not 8-bit RGB
    or YUV (gray, alpha, >8-bit) are converted with a warning that says what was lost.
    """
    info = probe_video(path)
    reader = _Reader(path, max_frames, start_frame, frame_stride)
    frames = np.stack(list(reader))
    return Video(torch.from_numpy(frames), info.fps / frame_stride, os.fspath(path), reader.pix_fmt)


def iter_video(
    path: str | os.PathLike,
    frames_per_piece: int,
    *,
    max_frames: int | None = None,
    start_frame: int = 0,
    frame_stride: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield uint8 pieces [t <= frames_per_piece, H, W, 3], holding one piece in memory at a time.

    The file is checked before this returns, so a bad path fails here, not at the first next().
    """
    if frames_per_piece < 1:
        raise InputError(f"frames_per_piece must be >= 1, got {frames_per_piece}")
    probe_video(path)
    reader = _Reader(path, max_frames, start_frame, frame_stride)

    def pieces() -> Iterator[torch.Tensor]:
        piece: list[np.ndarray] = []
        for frame in reader:
            piece.append(frame)
            if len(piece) == frames_per_piece:
                yield torch.from_numpy(np.stack(piece))
                piece = []
        if piece:
            yield torch.from_numpy(np.stack(piece))

    return pieces()


class _Reader:
    """Iterates selected frames as uint8 [H, W, 3]; raises InputError on corrupt data or no frames."""

    def __init__(self, path, max_frames: int | None, start_frame: int, frame_stride: int):
        if (max_frames is not None and max_frames < 1) or start_frame < 0 or frame_stride < 1:
            raise InputError(
                f"need max_frames >= 1 (or None), start_frame >= 0, frame_stride >= 1; "
                f"got {max_frames}, {start_frame}, {frame_stride}"
            )
        self.path, self.max_frames, self.start, self.stride = path, max_frames, start_frame, frame_stride
        self.pix_fmt = "unknown"
        self._warned: set[str] = set()

    def __iter__(self) -> Iterator[np.ndarray]:
        kept = seen = 0
        with _open(self.path) as container:
            stream = container.streams.video[0]  # no frame threading: it hides decode errors at a cut-off end
            try:
                for frame in container.decode(stream):
                    if seen == 0:
                        self.pix_fmt = frame.format.name
                    seen += 1
                    if seen - 1 < self.start or (seen - 1 - self.start) % self.stride:
                        continue
                    yield self._to_rgb24(frame)
                    kept += 1
                    if kept == self.max_frames:
                        return
            except av.FFmpegError as e:
                raise InputError(
                    f"{self.path}: decoding failed after {seen} frames, the file is corrupt or truncated ({e})"
                ) from e
            if kept == 0:
                where = f" at or after start_frame={self.start}" if self.start else ""
                raise InputError(f"{self.path}: no decodable video frames{where} (the stream has {seen})")
            expected = _expected_frames(container, stream)
            if expected and seen < 0.75 * expected:
                warnings.warn(
                    f"{self.path}: decoded {seen} frames but the container declares about {expected}; "
                    f"the file is probably truncated",
                    stacklevel=3,
                )

    def _to_rgb24(self, frame: av.VideoFrame) -> np.ndarray:
        fmt = frame.format
        deep = max(c.bits for c in fmt.components) > 8
        alpha = fmt.has_palette or any(c.is_alpha for c in fmt.components)
        if not fmt.has_palette and sum(not c.is_alpha for c in fmt.components) == 1:
            self._warn("gray", f"{fmt.name} is grayscale; replicated it to 3 RGB channels")
        if deep:
            self._warn("deep", f"{fmt.name} has more than 8 bits per channel; quantised to 8-bit RGB")
            rgb = frame.to_ndarray(format="rgba64le" if alpha else "rgb48le").astype(np.uint32)
            rgb = ((rgb * 255 + 32767) // 65535).astype(np.uint8)
        else:
            rgb = frame.to_ndarray(format="rgba" if alpha else "rgb24")
        if alpha:
            if (rgb[..., 3] < 255).any():
                self._warn("alpha", f"{fmt.name} has transparency; dropped the alpha channel (not composited)")
            rgb = np.ascontiguousarray(rgb[..., :3])
        return rgb

    def _warn(self, key: str, what: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{self.path}: source pixel format {what}", stacklevel=5)  # the caller of read/iter_video


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"video file not found: {path!r}")
    if os.path.isdir(path):
        raise InputError(f"{path!r} is a directory, not a video file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"{path!r} is not a readable video or image (FFmpeg: {e})") from e
    if container.format.name in _TEXT_DEMUXERS or not container.streams.video:
        kind = "a text file" if container.format.name in _TEXT_DEMUXERS else "a file without a video stream"
        container.close()
        raise InputError(f"{path!r} is {kind}; expected a video (mp4, mkv, webm, mov, gif) or an image (png, jpg)")
    return container


def _is_still(container) -> bool:
    return container.format.name.endswith("_pipe")


def _fps(container, stream) -> float:
    if _is_still(container):
        return STILL_IMAGE_FPS
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else STILL_IMAGE_FPS


def _expected_frames(container, stream) -> int | None:
    """Frame count the container claims (stored, or duration x rate); None if it does not say."""
    if stream.frames:
        return stream.frames
    seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
    rate = stream.average_rate
    return round(seconds * float(rate)) if seconds and rate and not _is_still(container) else None


# ---- writing ---------------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike) -> None:
    """Refuse an output file that cannot be written, before any compute is spent on it.

    The directory must exist (it is not created: a typo should not silently make new folders),
    be a directory and accept a new file; the target itself must not be a directory.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"cannot write {path!r}: it is a directory; give a file name (e.g. {os.path.join(path, 'out')!r})")
    head = os.path.dirname(path)
    if head and not os.path.exists(head):
        raise InputError(f"cannot write {path!r}: the directory {head!r} does not exist")
    if head and not os.path.isdir(head):
        raise InputError(f"cannot write {path!r}: {head!r} is not a directory")
    _probe_write(head or ".", path)


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse a directory that cannot be created or written (checks its nearest existing parent)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot write {what} {path!r}: it exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"cannot create {what} {path!r}: {existing!r} is a file, not a directory")
    _probe_write(existing, path, what + " ")


def _probe_write(directory: str, path: str, what: str = "") -> None:
    """Create and delete a hidden file: the only check that also holds for root and odd filesystems."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dcae-v-write-check.", dir=directory)
    except OSError as e:
        raise InputError(
            f"cannot write {what}{path!r}: no new file can be created in {directory!r} ({write_reason(e)}); "
            f"choose a writable directory"
        ) from None
    os.close(fd)
    os.remove(tmp)


def write_reason(e: BaseException) -> str:
    """The reason part of an OSError / PyAV error, without the temp-file name it often carries."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def write_video(
    path: str | os.PathLike, frames: np.ndarray | torch.Tensor | Iterable, fps: float, *, lossless: bool = False
) -> None:
    """Write uint8 frames [T, H, W, 3] (or an iterable of frames / pieces) atomically; see VideoWriter."""
    with VideoWriter(path, fps, lossless=lossless) as writer:
        if isinstance(frames, (np.ndarray, torch.Tensor)):
            writer.write(frames)
        else:
            for piece in frames:
                writer.write(piece)


class VideoWriter:
    """Streaming writer. Default: H.264 yuv420p crf 18 in .mp4/.mov/.mkv (odd sizes are padded by
    replicating the last row/column, with a warning). lossless=True: FFV1 bgr0 in .mkv, bit-exact
    RGB. Frames go to a hidden temp file beside `path` that replaces it only on a clean close, so
    an interrupted write never leaves a half file (or clobbers an older one).
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, *, lossless: bool = False):
        self.path = os.fspath(path)
        ext = os.path.splitext(self.path)[1].lower()
        if lossless and ext != ".mkv":
            raise InputError(f"lossless video is written as FFV1 in Matroska; use a .mkv path instead of {self.path!r}")
        if ext not in _LOSSY_MUXERS:
            raise InputError(f"cannot write {self.path!r}: use a .mp4, .mov or .mkv path")
        try:
            ok = 0 < float(fps) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"fps must be a positive finite number, got {fps!r}")
        self.rate = _as_fraction(fps)
        self.lossless, self._muxer, self._even = lossless, _LOSSY_MUXERS[ext], 1 if lossless else 2
        check_output_path(self.path)
        head, tail = os.path.split(self.path)
        self._tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex[:8]}.partial{ext}")
        self._container = self._stream = self._size = None
        self.frames_written, self._closed = 0, False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append one frame [H, W, 3] or a piece [t, H, W, 3] of uint8 RGB."""
        x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        x = x[None] if x.ndim == 3 else x
        _check_frames_shape(x.shape)
        if self._closed:
            raise InputError(f"{self.path!r} is already closed; open a new VideoWriter")
        if x.dtype != np.uint8:
            raise InputError(f"frames must be uint8, got {x.dtype}; convert model output with dcae_v.io.to_uint8")
        if self._container is None:
            self._start(x.shape[1], x.shape[2])
        if x.shape[1:3] != self._size:
            raise InputError(f"frame size changed from {self._size} to {x.shape[1:3]} while writing {self.path!r}")
        pad_h, pad_w = -x.shape[1] % self._even, -x.shape[2] % self._even
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for f in x:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts = self.frames_written
            try:  # the file is opened at the first mux: an unwritable place shows up here
                self._container.mux(self._stream.encode(frame))
            except (av.FFmpegError, OSError) as e:
                self._abort()
                self._closed = True
                raise InputError(f"cannot write {self.path!r}: {write_reason(e)}") from e
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the finished file into place."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            raise InputError(f"no frames were written to {self.path!r}; nothing saved")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except (av.FFmpegError, OSError) as e:
            self._abort()
            raise InputError(f"cannot write {self.path!r}: {write_reason(e)}") from e
        except BaseException:
            self._abort()
            raise

    def _start(self, height: int, width: int) -> None:
        self._size = (height, width)
        if not self.lossless and (height % 2 or width % 2):
            warnings.warn(
                f"{self.path}: yuv420p needs even sizes; padded {width}x{height} to {width + width % 2}x"
                f"{height + height % 2} by replicating the last row/column",
                stacklevel=3,
            )
        options = {"movflags": "faststart"} if self._muxer in ("mp4", "mov") else {}
        try:
            self._container = av.open(self._tmp, "w", format=self._muxer, options=options)
        except (av.FFmpegError, OSError) as e:
            raise InputError(f"cannot write {self.path!r} ({e}); check the directory is writable") from e
        codec, pix_fmt, opts = ("ffv1", "bgr0", {}) if self.lossless else ("libx264", "yuv420p", {"crf": "18"})
        self._stream = self._container.add_stream(codec, rate=self.rate)
        self._stream.width, self._stream.height = width + width % self._even, height + height % self._even
        self._stream.pix_fmt, self._stream.options = pix_fmt, opts

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass
            self._container = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def _as_fraction(fps: float | Fraction) -> Fraction:
    """Exact stream rate: 29.97 and friends snap to the NTSC rates (30000/1001), others to /1001 precision."""
    for rate in _NTSC_RATES:
        if abs(float(fps) - float(rate)) < 0.005:
            return rate
    exact = fps if isinstance(fps, (int, Fraction)) else Fraction(float(fps))
    return Fraction(exact).limit_denominator(1001)
