"""The `dcae-v` command line, run in-process: outputs, streaming, round trips, reports, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

import dcae_v
from dcae_v import DCAEV
from dcae_v.cli import main
from dcae_v.io import write_video

FPS = 16
T, H, W = 10, 40, 48  # 10 frames: not a multiple of the chunk (8); 40x48: not multiples of 32


def _clip(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth moving waves plus mild noise, uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    base = np.stack([128 + 100 * np.sin(xx / 9 + tt / 3), 128 + 90 * np.cos(yy / 8 - tt / 4), 40 + 3 * (xx + yy) + tt], -1)
    return np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)


def _read(path: Path) -> tuple[np.ndarray, float]:
    """Frames (uint8 [T, H, W, 3]) and frame rate, read back with PyAV directly."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, float(s.average_rate or s.guessed_rate)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    f = {"dir": d}
    torch.manual_seed(0)
    DCAEV.from_preset("debug", chunk_size=8).save_pretrained(d / "ckpt")
    f["ckpt"] = d / "ckpt"
    torch.manual_seed(1)
    DCAEV.from_preset("debug", chunk_size=8, latent_channels=16).save_pretrained(d / "ckpt16")
    f["ckpt16"] = d / "ckpt16"

    f["clip"] = d / "clip.mp4"
    write_video(f["clip"], _clip(), FPS)

    f["still"] = d / "still.png"
    image = _clip(1, 40, 48, seed=3)[0]
    with av.open(str(f["still"]), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 48, 40, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        c.mux(s.encode(None))

    f["text"] = d / "notes.mp4"
    f["text"].write_text("this is not a video\n" * 50)

    f["eval"] = d / "eval"
    f["eval"].mkdir()
    write_video(f["eval"] / "a.mp4", _clip(10, 40, 48, seed=4), FPS)
    write_video(f["eval"] / "b.mkv", _clip(8, 48, 64, seed=5), FPS, lossless=True)
    (f["eval"] / "readme.txt").write_text("not a video suffix: ignored\n")

    f["eval_short"] = d / "eval_short"
    f["eval_short"].mkdir()
    write_video(f["eval_short"] / "long.mp4", _clip(9, 32, 32, seed=6), FPS)
    write_video(f["eval_short"] / "short.mp4", _clip(4, 32, 32, seed=7), FPS)
    return f


@pytest.fixture(scope="module")
def lossless(files) -> dict[str, np.ndarray]:
    """Reconstructions as bit-exact .mkv files, with 8- and 16-frame tiles (computed once)."""
    out = {}
    for tile in (8, 16):
        path = files["dir"] / f"rec_tile{tile}.mkv"
        rc = main(["reconstruct", str(files["clip"]), "-o", str(path), "--lossless", "--checkpoint", str(files["ckpt"]),
                   "--frames-per-tile", str(tile)])
        assert rc == 0
        out[tile] = _read(path)[0]
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- help and version ----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [[], ["reconstruct"], ["encode"], ["decode"], ["eval"], ["info"]])
def test_help_exits_zero(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dcae-v {' '.join(argv)}".rstrip())
    if argv in (["reconstruct"], ["encode"], ["decode"]):
        assert "--checkpoint" in out and "--frames-per-tile" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dcae-v {dcae_v.__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "usage", "hint"), [
    (["reconstruct", "-o", "x.mp4", "--frames-per-tiles", "8"], "usage: dcae-v reconstruct",
     "did you mean --frames-per-tile?"),
    (["--verbose", "info"], "usage: dcae-v info", ""),
    (["encode", "in.mp4", "-o", "z.safetensors", "--zzz"], "usage: dcae-v encode", "--zzz"),
])
def test_unknown_option_is_reported_by_its_subcommand(capsys, argv, usage, hint):
    """The subcommand's usage line (not the top-level one) and the closest option it has."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage) and "unrecognized arguments" in err and hint in err


# ---- reconstruct ---------------------------------------------------------------------------
def test_reconstruct_writes_a_video_like_the_source(files, capsys, tmp_path):
    out = tmp_path / "rec.mp4"
    rc, stdout, stderr = _run(capsys, "reconstruct", files["clip"], "-o", out, "--checkpoint", files["ckpt"])
    assert rc == 0, stderr
    frames, fps = _read(out)
    assert frames.shape == (T, H, W, 3) and fps == pytest.approx(FPS)
    assert f"wrote {out}: {T} frames {W}x{H} @ {FPS} fps" in stdout
    assert "PSNR" in stdout and "dB" in stdout and "SSIM" in stdout
    assert "model: f32t4c8" in stderr and "chunk_causal chunk 8" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.mp4"]  # no temp file left


def test_reconstruct_json_report(files, capsys, tmp_path):
    out = tmp_path / "rec.mp4"
    rc, stdout, _ = _run(capsys, "reconstruct", files["clip"], "-o", out, "--checkpoint", files["ckpt"], "--json")
    assert rc == 0
    report = json.loads(stdout)
    assert {"psnr", "ssim", "frames", "height", "width", "fps", "output"} <= set(report)
    assert (report["frames"], report["height"], report["width"]) == (T, H, W)
    assert isinstance(report["psnr"], float) and 0 < report["psnr"] <= 100
    assert isinstance(report["ssim"], float) and -1 <= report["ssim"] <= 1


def test_lossless_mkv_is_bit_exact_to_what_was_computed(files, lossless):
    frames = lossless[8]
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    with av.open(str(files["dir"] / "rec_tile8.mkv")) as c:
        assert c.streams.video[0].codec_context.name == "ffv1"


def test_lossless_needs_mkv(files, capsys, tmp_path):
    out = tmp_path / "rec.mp4"
    rc, _, stderr = _run(capsys, "reconstruct", files["clip"], "-o", out, "--lossless", "--checkpoint", files["ckpt"])
    assert rc == 3
    assert "lossless" in stderr and ".mkv" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_streaming_tiles_agree_to_one_level(lossless):
    """Tiles of 8 and 16 frames agree up to float rounding (the documented guarantee): at most 1
    in a few 8-bit values."""
    diff = np.abs(lossless[8].astype(np.int16) - lossless[16].astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size


def test_still_image_reconstructs_to_one_frame(files, capsys, tmp_path):
    out = tmp_path / "still.mkv"
    rc, stdout, stderr = _run(capsys, "reconstruct", files["still"], "-o", out, "--lossless", "--checkpoint", files["ckpt"])
    assert rc == 0, stderr
    frames, _ = _read(out)
    assert frames.shape == (1, 40, 48, 3)
    assert "1 frames 48x40" in stdout and "PSNR" in stdout


@pytest.mark.parametrize("how", ["one-frame mkv", "--max-frames 1"])
def test_a_single_frame_without_a_declared_frame_count_is_an_image(files, capsys, tmp_path, how):
    """Matroska stores no frame count, and --max-frames 1 cuts a clip to one frame: both are a
    one-frame clip, which the model takes as an image (not a stream ending mid-latent-frame)."""
    if how == "one-frame mkv":
        src, extra = tmp_path / "one.mkv", []
        write_video(src, _clip(1, 32, 32), FPS, lossless=True)
    else:
        src, extra = files["clip"], ["--max-frames", 1]
    out = tmp_path / "rec.mkv"
    rc, stdout, stderr = _run(capsys, "reconstruct", src, "-o", out, "--lossless", "--checkpoint", files["ckpt"], *extra)
    assert rc == 0, stderr
    assert _read(out)[0].shape[0] == 1 and "wrote" in stdout
    latent = tmp_path / "one.safetensors"
    rc, _, stderr = _run(capsys, "encode", src, "-o", latent, "--checkpoint", files["ckpt"], *extra)
    assert rc == 0, stderr
    with safe_open(str(latent), framework="pt") as f:
        assert f.get_tensor("latent").shape[2] == 1


def test_max_frames(files, capsys, tmp_path):
    out = tmp_path / "first4.mkv"
    rc, stdout, _ = _run(capsys, "reconstruct", files["clip"], "-o", out, "--lossless", "--max-frames", 4,
                         "--checkpoint", files["ckpt"])
    assert rc == 0
    assert _read(out)[0].shape == (4, H, W, 3)


# ---- encode / decode -----------------------------------------------------------------------
def test_encode_decode_round_trip_equals_reconstruct(files, lossless, capsys, tmp_path):
    latent = tmp_path / "clip.safetensors"
    rc, stdout, stderr = _run(capsys, "encode", files["clip"], "-o", latent, "--checkpoint", files["ckpt"])
    assert rc == 0, stderr
    assert f"latent of {T} frames {W}x{H}" in stdout
    with safe_open(str(latent), framework="pt") as f:
        z = f.get_tensor("latent")
        meta = json.loads(f.metadata()["dcae_v"])
    assert z.shape == (1, 8, 4, 2, 2)  # 10 frames padded to 16, 40x48 padded to 64x64
    assert (meta["frames"], meta["height"], meta["width"], meta["fps"]) == (T, H, W, FPS)

    out = tmp_path / "decoded.mkv"
    rc, stdout, stderr = _run(capsys, "decode", latent, "-o", out, "--lossless", "--checkpoint", files["ckpt"])
    assert rc == 0, stderr
    frames, fps = _read(out)
    assert frames.shape == (T, H, W, 3) and fps == pytest.approx(FPS)
    assert np.array_equal(frames, lossless[16])  # default tile (>= 40 frames) covers the 16 padded frames, as a 16-frame tile


def test_decode_with_fps_override(files, capsys, tmp_path):
    latent = tmp_path / "clip.safetensors"
    assert _run(capsys, "encode", files["clip"], "-o", latent, "--checkpoint", files["ckpt"])[0] == 0
    out = tmp_path / "decoded.mp4"
    rc, _, _ = _run(capsys, "decode", latent, "-o", out, "--fps", 8, "--checkpoint", files["ckpt"])
    assert rc == 0
    frames, fps = _read(out)
    assert frames.shape == (T, H, W, 3) and fps == pytest.approx(8)


def test_decode_with_wrong_latent_channels(files, capsys, tmp_path):
    latent = tmp_path / "c8.safetensors"
    assert _run(capsys, "encode", files["clip"], "-o", latent, "--checkpoint", files["ckpt"])[0] == 0
    out = tmp_path / "x.mkv"
    rc, _, stderr = _run(capsys, "decode", latent, "-o", out, "--lossless", "--checkpoint", files["ckpt16"])
    assert rc == 3
    assert "latent has 8 channels" in stderr and "decodes 16" in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c8.safetensors"]


def test_decode_of_a_file_that_is_not_a_latent(files, capsys, tmp_path):
    rc, _, stderr = _run(capsys, "decode", files["ckpt"] / "model.safetensors", "-o", tmp_path / "x.mkv", "--lossless",
                         "--checkpoint", files["ckpt"])
    assert rc == 3 and "no 'latent' tensor" in stderr


# ---- eval ----------------------------------------------------------------------------------
def test_eval_prints_a_table_and_writes_json(files, capsys, tmp_path):
    report = tmp_path / "eval.json"
    rc, stdout, stderr = _run(capsys, "eval", files["eval"], "--frames", 8, "--size", 32, "--checkpoint", files["ckpt"],
                              "--json", report)
    assert rc == 0, stderr
    lines = stdout.splitlines()
    assert "PSNR" in lines[0] and "SSIM" in lines[0]
    assert lines[1].startswith("a.mp4") and lines[2].startswith("b.mkv")
    assert lines[3].startswith("mean (2 clips)")
    assert f"wrote {report}" in stdout
    assert "LPIPS and FVD are off" in stderr
    result = json.loads(report.read_text())
    assert result["protocol"] == {"frames": 8, "size": 32}
    assert [c["file"] for c in result["clips"]] == ["a.mp4", "b.mkv"]
    assert set(result["mean"]) == {"psnr", "ssim"} and result["skipped"] == []
    assert result["mean"]["psnr"] == pytest.approx(sum(c["psnr"] for c in result["clips"]) / 2)
    mean_row = lines[3].split()
    assert float(mean_row[-2]) == pytest.approx(result["mean"]["psnr"], abs=1e-4)
    assert float(mean_row[-1]) == pytest.approx(result["mean"]["ssim"], abs=1e-4)


def test_eval_reports_too_short_clips_as_skipped(files, capsys):
    rc, stdout, _ = _run(capsys, "eval", files["eval_short"], "--frames", 8, "--size", 32, "--checkpoint", files["ckpt"])
    assert rc == 0
    assert "mean (1 clips)" in stdout
    assert "skipped" in stdout and "short.mp4" in stdout and "only 4 frames (< 8)" in stdout
    result = json.loads(stdout[stdout.index("\n{") + 1 :])  # JSON follows the table on stdout
    assert [c["file"] for c in result["clips"]] == ["long.mp4"]
    assert len(result["skipped"]) == 1 and result["skipped"][0]["file"].endswith("short.mp4")


def test_eval_with_nothing_usable(files, capsys, tmp_path):
    write_video(tmp_path / "tiny.mp4", _clip(4, 32, 32), FPS)
    rc, _, stderr = _run(capsys, "eval", tmp_path, "--frames", 8, "--size", 32, "--checkpoint", files["ckpt"])
    assert rc == 3 and "none of the 1 videos" in stderr and "could be evaluated" in stderr and "only 4 frames" in stderr
    rc, _, stderr = _run(capsys, "eval", tmp_path / "nope", "--frames", 8, "--size", 32, "--checkpoint", files["ckpt"])
    assert rc == 3 and "is not a directory" in stderr


def test_eval_uses_the_tiling_options_it_accepts(files, capsys):
    """`eval --help` lists --frames-per-tile/--tile-size; an invalid value must not be silently ignored."""
    rc, _, stderr = _run(capsys, "eval", files["eval"], "--frames", 8, "--size", 32, "--checkpoint", files["ckpt"],
                         "--frames-per-tile", 12)
    assert rc == 3, "eval accepted --frames-per-tile 12 (not a multiple of the chunk 8): the option is ignored"
    assert "multiple of 8" in stderr


# ---- info ----------------------------------------------------------------------------------
def test_info(files, capsys):
    rc, stdout, _ = _run(capsys, "info", files["ckpt"])
    assert rc == 0
    info = json.loads(stdout)
    assert info["layout"] == "dcae-v directory" and info["preset"] == "debug" and info["architecture"] == "f32t4c8"
    assert info["config"]["chunk_size"] == 8 and info["loads"].startswith("yes")


def test_info_on_a_missing_checkpoint(capsys, tmp_path):
    rc, _, stderr = _run(capsys, "info", tmp_path / "missing.pt")
    assert rc == 4 and "does not exist" in stderr


# ---- exit codes ----------------------------------------------------------------------------
def _reconstruct(files, tmp_path, *extra, src=None, ckpt=None):
    return ["reconstruct", src or files["clip"], "-o", tmp_path / "out.mkv", "--lossless",
            "--checkpoint", ckpt or files["ckpt"], *extra]


@pytest.mark.parametrize("case, code, message", [
    ("missing input", 3, "video file not found"),
    ("not a video", 3, "is not a readable video or image"),
    ("missing checkpoint", 4, "the path does not exist"),
    ("wrong preset", 4, "does not fit DC-AE-V f32t4c32"),
    ("cuda on cpu", 3, "--device cuda was asked for but torch sees no CUDA device"),
    ("tile 0", 2, "--frames-per-tile must be positive, got 0"),
    ("tile 12", 3, "frames_per_tile must be a positive multiple of 8"),
    ("negative max-frames", 2, "--max-frames must be positive"),
    ("bad device", 3, "unknown --device 'gpu'"),
])
def test_exit_codes(files, capsys, tmp_path, monkeypatch, case, code, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "this CPU machine", wherever it runs
    argv = {
        "missing input": _reconstruct(files, tmp_path, src=tmp_path / "nope.mp4"),
        "not a video": _reconstruct(files, tmp_path, src=files["text"]),
        "missing checkpoint": _reconstruct(files, tmp_path, ckpt=tmp_path / "nope.pt"),
        "wrong preset": _reconstruct(files, tmp_path, "--preset", "f32t4c32"),
        "cuda on cpu": _reconstruct(files, tmp_path, "--device", "cuda"),
        "tile 0": _reconstruct(files, tmp_path, "--frames-per-tile", 0),
        "tile 12": _reconstruct(files, tmp_path, "--frames-per-tile", 12),
        "negative max-frames": _reconstruct(files, tmp_path, "--max-frames", -1),
        "bad device": _reconstruct(files, tmp_path, "--device", "gpu"),
    }[case]
    rc, stdout, stderr = _run(capsys, *argv)
    assert rc == code
    assert message in stderr
    assert stderr.count("Traceback") == 0 and stdout == ""
    assert not (tmp_path / "out.mkv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mkv")]  # no partial file


def test_wrong_preset_message_names_the_closest_preset(files, capsys, tmp_path):
    rc, _, stderr = _run(capsys, *_reconstruct(files, tmp_path, "--preset", "f32t4c64"))
    assert rc == 4 and "closest preset: debug" in stderr


# ---- console script ------------------------------------------------------------------------
def test_console_script_is_installed():
    # the environment running the tests (its bin/ need not be on PATH: `.venv/bin/python -m pytest`)
    local = Path(sys.executable).parent / "dcae-v"
    exe = str(local) if local.exists() else shutil.which("dcae-v")
    assert exe is not None, "the dcae-v console script is not installed next to python nor on PATH"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dcae-v")
