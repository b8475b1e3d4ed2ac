"""`dcae-v` output paths and user-facing messages: unwritable outputs are refused before any
model is loaded (exit 3, one line), write-time failures become InputErrors, decode warns about a
checkpoint that differs from the encoder, and small message fixes (preset names, odd sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from dcae_v import DCAEV
from dcae_v.cli import main
from dcae_v.errors import InputError
from dcae_v.io import VideoWriter, write_video

PROC = "/proc" if os.path.isdir("/proc") else None  # a directory where nobody (not even root) can create files


def _png(path, h: int, w: int) -> None:
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = w, h, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        c.mux(s.encode(None))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("paths")
    torch.manual_seed(0)
    DCAEV.from_preset("debug", chunk_size=8).save_pretrained(d / "ckpt")
    DCAEV.from_preset("debug", chunk_size=4, scaling_factor=0.5).save_pretrained(d / "ckpt_other")
    write_video(d / "clip.mp4", np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), 16)
    (d / "eval").mkdir()
    write_video(d / "eval" / "a.mp4", np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), 16)
    _png(d / "odd.png", 45, 61)
    (d / "afile").write_text("not a directory\n")
    assert main(["encode", str(d / "clip.mp4"), "-o", str(d / "z.safetensors"), "--checkpoint", str(d / "ckpt")]) == 0
    return {"dir": d, "ckpt": str(d / "ckpt")}


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_refused_before_loading(rc: int, out: str, err: str, message: str) -> None:
    assert rc == 3, err
    assert message in err and "Traceback" not in err and out == ""
    assert "model:" not in err  # checked before the model was loaded
    assert len(err.strip().splitlines()) == 1


# ---- unwritable outputs, refused up front --------------------------------------------------
@pytest.mark.parametrize("command", ["reconstruct", "decode", "encode"])
@pytest.mark.parametrize("where", ["proc", "missing dir", "under a file", "a directory"])
def test_unwritable_output_is_refused_before_the_model_loads(world, capsys, tmp_path, command, where):
    d = world["dir"]
    suffix = ".safetensors" if command == "encode" else ".mp4"
    if where == "proc":
        if PROC is None:
            pytest.skip("no /proc")
        out, message = f"{PROC}/x{suffix}", "no new file can be created in '/proc'"
    elif where == "missing dir":
        out, message = tmp_path / "nodir" / f"x{suffix}", "does not exist"
    elif where == "under a file":
        out, message = d / "afile" / f"x{suffix}", "is not a directory"
    else:
        out, message = tmp_path / f"taken{suffix}", "it is a directory"
        out.mkdir()
    src = d / ("z.safetensors" if command == "decode" else "clip.mp4")
    rc, stdout, stderr = _run(capsys, command, src, "-o", out, "--checkpoint", world["ckpt"])
    _assert_refused_before_loading(rc, stdout, stderr, f"cannot write '{out}'")
    assert message in stderr
    assert not (tmp_path / "nodir").exists()  # encode no longer creates a missing directory


def test_encode_needs_a_safetensors_suffix(world, capsys, tmp_path):
    rc, out, err = _run(capsys, "encode", world["dir"] / "clip.mp4", "-o", tmp_path / "z.pt", "--checkpoint", world["ckpt"])
    _assert_refused_before_loading(rc, out, err, "latents are written as safetensors; use a .safetensors path")
    assert not (tmp_path / "z.pt").exists()


@pytest.mark.parametrize("where", ["missing dir", "proc"])
def test_eval_json_path_is_checked_before_the_eval(world, capsys, tmp_path, where):
    if where == "proc" and PROC is None:
        pytest.skip("no /proc")
    target = tmp_path / "nodir" / "x.json" if where == "missing dir" else f"{PROC}/x.json"
    rc, out, err = _run(capsys, "eval", world["dir"] / "eval", "--frames", 8, "--size", 32, "--json", target,
                        "--checkpoint", world["ckpt"])
    assert rc == 3 and f"cannot write '{target}'" in err and "Traceback" not in err
    assert "model:" not in err and "mean" not in out  # no evaluation was run


def test_eval_json_write_failure_is_an_input_error(world, capsys, tmp_path, monkeypatch):
    from pathlib import Path

    def fail(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", fail)
    rc, out, err = _run(capsys, "eval", world["dir"] / "eval", "--frames", 8, "--size", 32, "--json",
                        tmp_path / "x.json", "--checkpoint", world["ckpt"])
    assert rc == 3 and "Permission denied" in err and "Traceback" not in err
    assert "mean (1 clips)" in out  # the table was still printed


# ---- failures while writing ------------------------------------------------------------------
def test_video_writer_turns_write_failures_into_input_errors(tmp_path, monkeypatch):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(InputError, match=r"cannot write .*out\.mp4.*No space left on device"):
        write_video(tmp_path / "out.mp4", frames, 16)
    assert os.listdir(tmp_path) == []  # the partial file is removed


def test_video_writer_turns_a_vanished_directory_into_an_input_error(tmp_path):
    writer = VideoWriter(tmp_path / "out.mp4", 16)
    writer._tmp = str(tmp_path / "gone" / "x.mp4")  # the directory vanished after the up-front check
    with pytest.raises(InputError, match=r"cannot write .*out\.mp4.*No such file or directory"), writer:
        for _ in range(3):  # the encoder buffers: the file is opened at the first packet or at close
            writer.write(np.zeros((4, 16, 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_encode_write_failure_is_an_input_error(world, tmp_path, monkeypatch):
    from dcae_v import jobs

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs, "save_file", fail)
    model = DCAEV.from_pretrained(world["ckpt"])
    with pytest.raises(InputError, match="No space left on device"):
        jobs.encode_file(model, world["dir"] / "clip.mp4", tmp_path / "z.safetensors")


# ---- decode with another checkpoint --------------------------------------------------------------
def test_decode_warns_when_the_checkpoint_differs_from_the_encoder(world, tmp_path):
    from dcae_v.jobs import decode_file

    d = world["dir"]
    other = DCAEV.from_pretrained(d / "ckpt_other")
    with pytest.warns(UserWarning, match=r"chunk_size 8 \(file\) vs 4 \(model\), scaling_factor 1.0 \(file\) vs 0.5"):
        decode_file(other, d / "z.safetensors", tmp_path / "d.mp4")
    assert (tmp_path / "d.mp4").exists()  # a warning, not a refusal
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the encoder's own checkpoint: no warning
        decode_file(DCAEV.from_pretrained(d / "ckpt"), d / "z.safetensors", tmp_path / "e.mp4")


# ---- messages --------------------------------------------------------------------------------------
def test_unknown_preset_is_exit_3_in_one_line(world, capsys, tmp_path):
    rc, _, err = _run(capsys, "reconstruct", world["dir"] / "clip.mp4", "-o", tmp_path / "r.mp4",
                      "--checkpoint", world["ckpt"], "--preset", "nope")
    assert rc == 3 and err.strip() == (
        "dcae-v: error: unknown DC-AE-V preset 'nope'; valid presets: f32t4c32, f32t4c64, f32t4c128, f32t4c256, "
        "f64t4c128, debug, tiny-f32t4c64"
    )
    from dcae_v.config import get_preset

    with pytest.raises(ValueError, match="unknown DC-AE-V preset"):  # still a ValueError for library callers
        get_preset("nope")


def test_messages_name_the_preset_as_typed(world, capsys, tmp_path):
    rc, _, err = _run(capsys, "reconstruct", world["dir"] / "clip.mp4", "-o", tmp_path / "r.mp4",
                      "--checkpoint", world["ckpt"], "--preset", "tiny-f32t4c64")
    assert rc == 4 and "does not fit DC-AE-V preset 'tiny-f32t4c64' (f32t4c64)" in err
    rc, _, err = _run(capsys, "reconstruct", world["dir"] / "clip.mp4", "-o", tmp_path / "r.mp4",
                      "--checkpoint", world["ckpt"], "--preset", "debug")
    assert rc == 0 and "model: debug = f32t4c8" in err


def test_decode_of_a_directory_says_so(world, capsys, tmp_path):
    rc, _, err = _run(capsys, "decode", tmp_path, "-o", tmp_path / "d.mp4", "--checkpoint", world["ckpt"])
    assert rc == 3 and "is a directory" in err


def test_eval_help_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 80" in out and "(default: 256)" in out and "(default: all)" in out


def test_closed_stdout_pipe_exits_quietly(capsys, close_stdout):
    close_stdout()
    assert main(["info"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_odd_sized_output_says_it_was_padded(world, capsys, tmp_path):
    with pytest.warns(UserWarning, match="padded 61x45 to 62x46"):
        rc, out, _ = _run(capsys, "reconstruct", world["dir"] / "odd.png", "-o", tmp_path / "o.mp4", "--checkpoint", world["ckpt"])
    assert rc == 0 and "1 frames 61x45 (stored padded to 62x46: yuv420p needs even sizes)" in out
    rc, out, _ = _run(capsys, "reconstruct", world["dir"] / "odd.png", "-o", tmp_path / "o.mkv", "--lossless",
                      "--checkpoint", world["ckpt"])
    assert rc == 0 and "61x45 @" in out  # lossless keeps odd sizes


def test_warnings_print_as_one_clean_line(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dcae_v.cli", "reconstruct", str(world["dir"] / "odd.png"), "-o", str(tmp_path / "o.mp4"),
         "--checkpoint", world["ckpt"]],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    warning = [ln for ln in result.stderr.splitlines() if "yuv420p" in ln]
    expected = (f"dcae-v: warning: {tmp_path / 'o.mp4'}: yuv420p needs even sizes; padded 61x45 to 62x46 by "
                "replicating the last row/column")
    assert warning == [expected], result.stderr
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr


def test_print_config_json_is_plain(capsys):
    rc, out, _ = _run(capsys, "train", "--print-config")
    assert rc == 0
    data = json.loads(out)
    assert data["optim"]["betas"] == [0.9, 0.99] and data["model"]["temporal"] is None
