"""dcae_v.io: file round trips, format coverage, pixel-format conversions, bad input, atomic writes."""

from __future__ import annotations

import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from dcae_v.errors import InputError
from dcae_v.io import (
    STILL_IMAGE_FPS,
    VideoWriter,
    crop_like,
    iter_video,
    pad_to_multiple,
    probe_video,
    read_video,
    to_model_range,
    to_uint8,
    write_video,
)

T, H, W = 8, 16, 24


def _clip(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth moving waves plus mild noise: compressible like real video (yuv420p-friendly chroma)."""
    rng = np.random.default_rng(seed)
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r, g = 128 + 100 * np.sin(xx / 10 + tt / 3), 128 + 90 * np.cos(yy / 10 - tt / 4)
    base = np.stack([r, g, 40 + 4 * (xx + yy) + tt], axis=-1)
    return np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)


def _encode(path, frames, codec, pix_fmt, *, rate=16, fmt="rgb24", options=None):
    """Write a file with PyAV directly (independent of dcae_v.io)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt, s.options = pix_fmt, options or {}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format=fmt)))
        c.mux(s.encode(None))


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """One small file per container / pixel format, made once for the module."""
    d = tmp_path_factory.mktemp("media")
    clip, rng = _clip(), np.random.default_rng(1)
    files = {"clip": clip}
    _encode(d / "x264rgb.mkv", clip, "libx264rgb", "rgb24", options={"qp": "0"})
    _encode(d / "vp9.webm", clip, "libvpx-vp9", "yuv420p", options={"crf": "20", "b": "0"})
    _encode(d / "qtrle.mov", clip, "qtrle", "rgb24")
    _encode(d / "anim.gif", clip, "gif", "rgb8")
    _encode(d / "still.png", clip[:1], "png", "rgb24")
    _encode(d / "still.jpg", clip[:1], "mjpeg", "yuvj444p")
    files["gray"] = rng.integers(0, 256, (4, H, W), dtype=np.uint8)
    _encode(d / "gray.mkv", files["gray"], "ffv1", "gray", fmt="gray")
    files["rgba"] = rng.integers(0, 256, (4, H, W, 4), dtype=np.uint8)
    _encode(d / "rgba.mkv", files["rgba"], "ffv1", "bgra", fmt="rgba")
    files["rgb48"] = rng.integers(0, 65536, (4, H, W, 3), dtype=np.uint16)
    _encode(d / "rgb48.mkv", files["rgb48"], "ffv1", "rgb48le", fmt="rgb48le")
    files["gray16"] = rng.integers(0, 65536, (1, H, W), dtype=np.uint16)
    _encode(d / "gray16.png", files["gray16"], "png", "gray16be", fmt="gray16le")
    long = _clip(16, 32, 32, seed=2)
    _encode(d / "long.mkv", long, "libx264", "yuv420p")
    with av.open(str(d / "long.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=16)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for f in long:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    files["dir"] = d
    return files


# ---- model range helpers ---------------------------------------------------------------------
def test_pad_to_multiple_replicates_last_frame_row_and_column():
    x = torch.randn(2, 3, 5, 6, 7)
    y = pad_to_multiple(x, 4, 4)
    assert y.shape == (2, 3, 8, 8, 8)
    assert torch.equal(y[:, :, :5, :6, :7], x)
    assert torch.equal(y[:, :, 5:, :6, :7], x[:, :, -1:].expand(-1, -1, 3, -1, -1))
    assert torch.equal(y[:, :, :5, 6:, :7], x[:, :, :, -1:].expand(-1, -1, -1, 2, -1))
    assert torch.equal(y[:, :, :5, :6, 7:], x[:, :, :, :, -1:])
    assert torch.equal(y[:, :, 7, 7, 7], x[:, :, -1, -1, -1])  # the corner comes from the corner
    assert torch.equal(crop_like(y, x), x)
    assert pad_to_multiple(x, 5, 1) is x


@pytest.mark.parametrize(
    "args, match",
    [((torch.randn(3, 4, 4, 4), 4, 4), r"\[B, C, T, H, W\]"), ((torch.randn(1, 3, 4, 4, 4), 0, 4), ">= 1")],
)
def test_pad_to_multiple_rejects_bad_input(args, match):
    with pytest.raises(InputError, match=match):
        pad_to_multiple(*args)


def test_crop_like_rejects_smaller_tensor():
    with pytest.raises(InputError, match="smaller"):
        crop_like(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 4, 4, 4))


def test_model_range_round_trip_is_exact_for_uint8():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x = to_model_range(frames)
    assert x.shape == (1, 3, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0, :, 1, 2, 3], (torch.tensor(frames[1, 2, 3]) / 255 - 0.5) / 0.5)
    assert torch.equal(to_uint8(x), torch.from_numpy(frames))
    assert torch.equal(to_uint8(torch.cat([x, -x])), torch.from_numpy(frames))  # first batch item


def test_model_range_accepts_uint16_and_unit_floats():
    u16 = np.full((1, 2, 2, 3), 65535, dtype=np.uint16)
    assert torch.equal(to_model_range(u16), torch.ones(1, 3, 1, 2, 2))
    f = torch.full((1, 2, 2, 3), 0.5)
    assert torch.equal(to_model_range(f), torch.zeros(1, 3, 1, 2, 2))


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 1 / 255]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 128]


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.zeros((2, 4, 4), np.uint8), "grayscale"),
        (np.zeros((2, 4, 4, 1), np.uint8), "grayscale"),
        (np.zeros((2, 4, 4, 4), np.uint8), r"RGBA.*\[\.\.\., :3\]"),
        (np.zeros((4, 4, 3), np.uint8), r"image\[None\]"),
        (np.zeros((2, 3, 8, 6), np.uint8), "channels-first"),
        (np.zeros((0, 4, 4, 3), np.uint8), "empty"),
        (np.full((1, 2, 2, 3), np.nan, np.float32), "NaN"),
        (np.full((1, 2, 2, 3), 200.0, np.float32), r"\[0, 1\]"),
        (np.zeros((1, 2, 2, 3), np.int32), "dtype"),
    ],
)
def test_to_model_range_rejects_bad_frames(frames, match):
    with pytest.raises(InputError, match=match):
        to_model_range(frames)


def test_to_uint8_rejects_bad_video():
    with pytest.raises(InputError, match=r"\[B, 3, T, H, W\]"):
        to_uint8(torch.zeros(3, 2, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        to_uint8(torch.full((1, 3, 1, 2, 2), float("nan")))


# ---- writing + reading -----------------------------------------------------------------------
def test_mp4_round_trip(tmp_path, media):
    path = tmp_path / "out.mp4"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an even-sized 8-bit RGB clip converts without a word
        write_video(path, torch.from_numpy(media["clip"]), 16)
        video = read_video(path)
    assert video.frames.shape == (T, H, W, 3) and video.frames.dtype == torch.uint8
    assert video.fps == 16 and video.path == str(path) and video.source_pix_fmt == "yuv420p"
    assert _psnr(video.frames, media["clip"]) > 30
    info = probe_video(path)
    assert (info.width, info.height, info.frame_count, info.codec) == (W, H, T, "h264")


def test_lossless_mkv_is_bit_exact_at_odd_sizes(tmp_path):
    frames = np.random.default_rng(3).integers(0, 256, (5, 15, 17, 3), dtype=np.uint8)
    path = tmp_path / "out.mkv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no padding, no warning
        write_video(path, frames, 24, lossless=True)
    assert np.array_equal(read_video(path).frames.numpy(), frames)


def test_lossless_needs_mkv(tmp_path):
    with pytest.raises(InputError, match=r"\.mkv"):
        write_video(tmp_path / "out.mp4", _clip(), 16, lossless=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fps, expected", [(Fraction(30000, 1001), 30000 / 1001), (29.97, 30000 / 1001), (12.5, 12.5)])
def test_fps_is_preserved(tmp_path, fps, expected):
    path = tmp_path / "out.mp4"
    write_video(path, _clip(4), fps)
    assert read_video(path).fps == pytest.approx(expected, abs=1e-9)
    assert probe_video(path).fps == pytest.approx(expected, abs=1e-9)


def test_odd_sizes_are_padded_with_a_warning(tmp_path):
    frames = _clip(4, 15, 17)
    path = tmp_path / "odd.mp4"
    with pytest.warns(UserWarning, match="even"):
        write_video(path, frames, 16)
    back = read_video(path).frames.numpy()
    assert back.shape == (4, 16, 18, 3)
    assert _psnr(back[:, :15, :17], frames) > 30
    assert _psnr(back[:, 15, :17], frames[:, 14]) > 30  # padded row ~ copy of the last row
    assert _psnr(back[:, :15, 17], frames[:, :, 16]) > 30


@pytest.mark.parametrize(
    "name, min_psnr", [("x264rgb.mkv", float("inf")), ("qtrle.mov", float("inf")), ("vp9.webm", 30), ("anim.gif", 15)]
)
def test_reads_containers(media, name, min_psnr):
    path = media["dir"] / name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opaque gif (bgra) must not warn about alpha
        video = read_video(path)
    assert video.frames.shape == (T, H, W, 3)
    assert _psnr(video.frames, media["clip"]) >= min_psnr
    info = probe_video(path)
    assert (info.width, info.height) == (W, H)
    assert info.frame_count in (T, None)


@pytest.mark.parametrize("name, min_psnr", [("still.png", float("inf")), ("still.jpg", 30)])
def test_still_image_is_one_frame(media, name, min_psnr):
    video = read_video(media["dir"] / name)
    assert video.frames.shape == (1, H, W, 3) and video.fps == STILL_IMAGE_FPS
    assert _psnr(video.frames, media["clip"][:1]) >= min_psnr
    assert probe_video(media["dir"] / name).frame_count == 1


def test_frame_selection(media):
    path, clip = media["dir"] / "x264rgb.mkv", media["clip"]
    video = read_video(path, start_frame=1, frame_stride=2, max_frames=3)
    assert np.array_equal(video.frames.numpy(), clip[1:7:2])
    assert video.fps == 8
    assert np.array_equal(read_video(path, start_frame=5).frames.numpy(), clip[5:])


@pytest.mark.parametrize("options", [{}, {"start_frame": 1, "frame_stride": 2}, {"max_frames": 5}])
def test_iter_video_pieces_concatenate_to_read_video(media, options):
    path = media["dir"] / "long.mp4"
    pieces = list(iter_video(path, 3, **options))
    assert all(p.shape[0] <= 3 and p.dtype == torch.uint8 for p in pieces)
    assert all(p.shape[0] == 3 for p in pieces[:-1])
    assert torch.equal(torch.cat(pieces), read_video(path, **options).frames)


def test_iter_video_fails_on_call_not_on_first_piece(tmp_path):
    with pytest.raises(InputError, match="not found"):
        iter_video(tmp_path / "nope.mp4", 4)
    with pytest.raises(InputError, match="frames_per_piece"):
        iter_video(tmp_path / "nope.mp4", 0)


# ---- pixel formats ---------------------------------------------------------------------------
def test_gray_source_is_replicated_with_warning(media):
    with pytest.warns(UserWarning, match="gray.*replicated"):
        video = read_video(media["dir"] / "gray.mkv")
    assert video.source_pix_fmt == "gray"
    assert np.array_equal(video.frames.numpy(), np.repeat(media["gray"][..., None], 3, axis=-1))


def test_rgba_source_drops_alpha_with_warning(media):
    with pytest.warns(UserWarning, match="alpha"):
        video = read_video(media["dir"] / "rgba.mkv")
    assert np.array_equal(video.frames.numpy(), media["rgba"][..., :3])


def test_16_bit_sources_are_quantised_with_warning(media):
    with pytest.warns(UserWarning, match="8 bits"):
        video = read_video(media["dir"] / "rgb48.mkv")
    expected = (media["rgb48"].astype(np.uint32) * 255 + 32767) // 65535
    assert np.array_equal(video.frames.numpy(), expected)
    with pytest.warns(UserWarning) as record:
        gray = read_video(media["dir"] / "gray16.png").frames.numpy().astype(int)
    assert {"8 bits", "gray"} <= {k for r in record for k in ("8 bits", "gray") if k in str(r.message)}
    expected = (media["gray16"].astype(np.uint32) * 255 + 32767) // 65535
    assert np.abs(gray - expected[..., None]).max() <= 1


# ---- bad input -------------------------------------------------------------------------------
def _truncate(src, dst, fraction):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="not found.*nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(InputError, match="directory"):
        read_video(tmp_path)


def test_text_and_garbage_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world\n" * 40)
    with pytest.raises(InputError, match="text file"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "fake.mp4").write_text("hello world\n" * 40)
    with pytest.raises(InputError, match="not a readable video"):
        read_video(tmp_path / "fake.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="not a readable video"):
        probe_video(tmp_path / "empty.mp4")


def test_truncated_mp4(tmp_path, media):
    out = tmp_path / "out.mp4"
    write_video(out, _clip(), 16)  # moov atom at the front (faststart): fails while decoding
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_video(_truncate(out, tmp_path / "cut.mp4", 0.6))
    plain = tmp_path / "plain.mp4"
    _encode(plain, _clip(), "libx264", "yuv420p")  # moov atom at the end: fails at open
    with pytest.raises(InputError, match="not a readable video"):
        read_video(_truncate(plain, tmp_path / "cut2.mp4", 0.5))


def test_truncated_mkv_warns(tmp_path, media):
    src = media["dir"] / "long.mkv"
    with av.open(str(src)) as c:  # cut in the middle of the packets: Matroska decodes what is left silently
        cut_at = [p.pos for p in c.demux(video=0) if p.pos is not None][10]
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(src.read_bytes()[:cut_at])
    with pytest.warns(UserWarning, match="truncated"):
        video = read_video(cut)
    assert 0 < video.frames.shape[0] < 12


def test_zero_frames_and_no_video_stream(tmp_path, media):
    src = media["dir"] / "long.mkv"
    with av.open(str(src)) as c:  # headers (with the video stream) but no packets
        first_packet = next(p.pos for p in c.demux(video=0))
    header_only = tmp_path / "header.mkv"
    header_only.write_bytes(src.read_bytes()[:first_packet])
    with pytest.raises(InputError, match="no decodable video frames"):
        read_video(header_only)
    with pytest.raises(InputError, match="no decodable.*start_frame=50"):
        read_video(media["dir"] / "long.mkv", start_frame=50)
    with av.open(str(tmp_path / "audio.wav"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with pytest.raises(InputError, match="without a video stream"):
        read_video(tmp_path / "audio.wav")


def test_bad_read_options(media):
    for options in ({"frame_stride": 0}, {"start_frame": -1}, {"max_frames": 0}):
        with pytest.raises(InputError, match="frame_stride >= 1"):
            read_video(media["dir"] / "long.mkv", **options)


# ---- writer ----------------------------------------------------------------------------------
def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.mp4"

    def frames_then_crash():
        yield from _clip(3)
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        write_video(path, frames_then_crash(), 16)
    assert list(tmp_path.iterdir()) == []

    path.write_bytes(b"older file")
    with pytest.raises(RuntimeError):
        write_video(path, frames_then_crash(), 16)
    assert path.read_bytes() == b"older file" and list(tmp_path.iterdir()) == [path]


def test_video_writer_streams_pieces_and_frames(tmp_path):
    clip = _clip()
    path = tmp_path / "s.mkv"
    with VideoWriter(path, 16, lossless=True) as writer:
        writer.write(torch.from_numpy(clip[:3]))
        writer.write(clip[3])
        writer.write(clip[4:])
        assert not path.exists()  # only renamed into place on close
    assert writer.frames_written == T
    with pytest.raises(InputError, match="closed"):
        writer.write(clip)
    assert np.array_equal(read_video(path).frames.numpy(), clip)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="to_uint8"):
        write_video(tmp_path / "a.mp4", _clip().astype(np.float32), 16)
    with pytest.raises(InputError, match="no frames"):
        write_video(tmp_path / "a.mp4", iter([]), 16)
    with pytest.raises(InputError, match="fps"):
        write_video(tmp_path / "a.mp4", _clip(), 0)
    with pytest.raises(InputError, match=r"\.mp4"):
        write_video(tmp_path / "a.avi", _clip(), 16)
    with pytest.raises(InputError, match="does not exist"):
        write_video(tmp_path / "missing_dir" / "a.mp4", _clip(), 16)
    with pytest.raises(InputError, match="size changed"), VideoWriter(tmp_path / "b.mkv", 16, lossless=True) as w:
        w.write(_clip(2))
        w.write(_clip(2, 8, 8))
    assert list(tmp_path.iterdir()) == []
