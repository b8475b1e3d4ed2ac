"""`dcvg-wan generate` and `dcvg-wan convert` as a user runs them: exit codes, messages, outputs."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from dcvg_wan.checkpoint import load_wan
from dcvg_wan.cli import main
from tests.dcvg_wan.conftest import make_inputs, make_model


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_between_all_layouts(tmp_path, capsys):
    model = make_model("debug-i2v")
    model.save_pretrained(tmp_path / "official")
    code, out, _ = _run(capsys, "convert", str(tmp_path / "official"), str(tmp_path / "diffusers"), "--layout", "diffusers")
    assert code == 0 and "diffusers layout" in out and "debug-i2v" in out
    assert "condition_embedder" in (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors").read_bytes()[:20000].decode("latin-1")
    code, _, _ = _run(capsys, "convert", str(tmp_path / "diffusers"), str(tmp_path / "comfy.safetensors"), "--layout", "comfy")
    assert code == 0
    back = load_wan(tmp_path / "comfy.safetensors")
    inputs = make_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs), model(**inputs), rtol=0, atol=0)


def test_convert_reports_a_missing_checkpoint(tmp_path, capsys):
    code, _, err = _run(capsys, "convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--layout", "official")
    assert code == 4 and "does not exist" in err


def test_generate_i2v_without_image(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--task", "i2v-14B", "--ckpt_dir", str(tmp_path))
    assert code == 3 and "--image" in err


def test_generate_lists_missing_checkpoint_files(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--task", "t2v-1.3B", "--ckpt_dir", str(tmp_path))
    assert code == 4
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", str(tmp_path)):
        assert name in err


def test_generate_full_size_task_needs_ckpt_dir(capsys):
    code, _, err = _run(capsys, "generate", "--task", "t2v-14B")
    assert code == 3 and "--ckpt_dir" in err


def test_generate_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not an image")
    from dcvg_wan.errors import InputError
    from dcvg_wan.generate import read_image

    with pytest.raises(InputError, match="cannot read --image"):
        read_image(bad)
    with pytest.raises(InputError, match="--image .*missing.png: no such file"):
        read_image(tmp_path / "missing.png")


def test_generate_with_the_embedded_model(tmp_path, capsys):
    """No --ckpt_dir: the shipped toy model writes a real mp4 (2 steps to stay fast)."""
    out_file = tmp_path / "video.mp4"
    code, out, err = _run(capsys, "generate", "--prompt", "a red circle moving right on a black background",
                          "--sample_steps", "2", "--frame_num", "16", "--base_seed", "0", "--save_file", str(out_file))
    assert code == 0, err
    assert "embedded demo model" in out and "timings" in out and "sampling" in out
    with av.open(str(out_file)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (128, 128, 3)
    assert np.std(np.stack(frames)) > 1  # not a blank video


def test_demo_prompt_reads_case_and_punctuation_like_the_captions_and_names_unknown_words():
    from dcvg_wan.demo_prompt import demo_prompt
    from dcvg_wan.generate import embedded_default

    paths, defaults = embedded_default()
    caption = defaults["example_prompt"]
    assert demo_prompt(caption, paths.tokenizer).text == caption
    read = demo_prompt("A Red circle, moving RIGHT on a black background.", paths.tokenizer)
    assert (read.text, read.dropped, read.note()) == (caption, [], None)
    read = demo_prompt("A cat chasing a red circle moving right", paths.tokenizer)
    assert read.text == "a red circle moving right" and read.dropped == ["cat", "chasing"]
    assert {"red", "circle", "left", "background"} <= set(read.vocabulary) and "cat" not in read.vocabulary


def test_demo_model_runs_on_the_autoencoder_it_was_trained_with():
    """t2v-tiny carries its DC-AE-V: the pipeline loads that one, not dcae-v's (retrained) default."""
    from dcae_v import DCAEV
    from dcae_v.checkpoint import DEFAULT_CHECKPOINT
    from dcvg_wan.generate import embedded_default

    paths, _ = embedded_default()
    assert paths.dcae is not None and paths.dcae.parent == paths.dit.parent
    pinned, default = DCAEV.from_pretrained(paths.dcae), DCAEV.from_pretrained(DEFAULT_CHECKPOINT)
    assert pinned.config.chunk_size == 8 and pinned.config.latent_channels == 64
    assert any(not torch.equal(a, b) for a, b in zip(pinned.state_dict().values(), default.state_dict().values()))


def test_demo_tokenizer_lowercases_like_the_captions():
    """Through transformers, as the pipeline loads it: 'A RED' must not become <unk> <unk>."""
    from transformers import AutoTokenizer

    from dcvg_wan.generate import embedded_default

    tokenizer = AutoTokenizer.from_pretrained(embedded_default()[0].tokenizer)
    assert tokenizer("A RED Circle").input_ids == tokenizer("a red circle").input_ids
    assert tokenizer.unk_token_id not in tokenizer("a red circle").input_ids


def test_generate_says_which_prompt_words_the_demo_model_drops(tmp_path, capsys):
    code, out, err = _run(capsys, "generate", "--prompt", "A cat walks past a red square", "--sample_steps", "1",
                          "--frame_num", "8", "--base_seed", "0", "--save_file", str(tmp_path / "v.mp4"))
    assert code == 0, err
    assert "dropped cat, walks, past" in out and "prompt used: 'a red square'" in out


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(err, 1e-10)))


def test_generate_with_an_image_runs_the_embedded_i2v_model(tmp_path, capsys):
    """--image without --ckpt_dir: i2v-tiny continues the given first frame. Trained behaviour, so
    it can fail: the first frame reproduces the image, and the mirrored image (the square on the
    other side) gives a video that starts from the mirrored scene, not the original."""
    from dcvg_wan.generate import embedded_default

    paths, defaults = embedded_default("i2v-tiny")
    example = paths.dit.parent / "example.png"
    image = _frames(example)[0]
    mirrored = tmp_path / "mirrored.png"
    with av.open(str(mirrored), "w", format="image2") as c:  # PyAV writes the PNG
        stream = c.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        c.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:, ::-1]), format="rgb24")))
        c.mux(stream.encode(None))
    first = {}
    for name, path in (("image", example), ("mirrored", mirrored)):
        code, out, err = _run(capsys, "generate", "--image", str(path), "--prompt", defaults["example_prompt"],
                              "--sample_steps", "10", "--base_seed", "0", "--save_file", str(tmp_path / f"{name}.mp4"))
        assert code == 0, err
        assert "embedded demo model i2v-tiny" in out
        video = _frames(tmp_path / f"{name}.mp4")
        assert video.shape == (defaults["frame_num"], 128, 128, 3)
        first[name] = video[0]
    assert _psnr(first["image"], image) > 19  # measured 22.1 dB (the autoencoder alone: ~20 dB)
    assert _psnr(first["mirrored"], image[:, ::-1]) > 19  # 23.4 dB
    assert _psnr(first["mirrored"], image[:, ::-1]) > _psnr(first["mirrored"], image) + 3  # 23.4 vs 16.1 dB


@pytest.mark.parametrize("parallel", [["--ulysses_size", "2"], ["--ulysses_size", "2", "--dit_fsdp", "--t5_fsdp"],
                                      ["--dit_fsdp"]], ids=["ulysses", "ulysses+fsdp", "fsdp"])
def test_generate_two_processes_equals_one(tmp_path, capsys, parallel):
    """torchrun --nproc_per_node 2 ... with the official multi-GPU flags (gloo on CPU) writes the
    1-process video."""
    import os
    import subprocess
    import sys

    common = ["--prompt", "a blue square moving up on a gray background", "--sample_steps", "2", "--frame_num", "8",
              "--base_seed", "5"]
    one = tmp_path / "one.mp4"
    assert main(["generate", *common, "--save_file", str(one)]) == 0
    two = tmp_path / "two.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dcvg_wan.cli", "generate", *common, *parallel, "--save_file", str(two)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _frames(one).astype(int), _frames(two).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("argv, match", [
    (["--dit_fsdp"], "torchrun --nproc_per_node N"),
    (["--dcae_ckpt", "default"], "cannot replace the embedded demo model's autoencoder"),
    (["--use_prompt_extend", "--prompt_extend_method", "dashscope"], "prompt extension needs an LLM"),
])
def test_official_flags_we_cannot_honour_here_explain_themselves(capsys, argv, match):
    code, _, err = _run(capsys, "generate", *argv)
    assert code == 3 and match in err


@pytest.mark.parametrize(("argv", "usage", "hint"), [
    (["generate", "--steps", "3"], "usage: dcvg-wan generate", "did you mean --sample_steps?"),
    (["convert", "a", "b", "--layout", "comfy", "--d_type=bf16"], "usage: dcvg-wan convert", "did you mean --dtype?"),
])
def test_unknown_flag_is_reported_by_its_subcommand(capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and hint in err


def test_generate_ulysses_size_must_match_processes(capsys):
    code, _, err = _run(capsys, "generate", "--ulysses_size", "2")
    assert code == 3 and "torchrun --nproc_per_node 2" in err


def _fast_fail_cases(tmp):
    """(argv, message): mistakes that need no weights, each refused before any model loads."""
    return [
        (["--sample_steps", "0"], "--sample_steps must be a positive integer"),
        (["--frame_num", "0"], "--frame_num must be a positive integer"),
        (["--frames_per_tile", "0"], "--frames_per_tile must be a positive integer"),
        (["--sample_shift", "0"], "--sample_shift must be positive"),
        (["--base_seed", "99999999999999999999"], "--base_seed must be -1"),
        (["--size", "0*0"], "size must be positive"),
        (["--size", "big"], "size must be W*H"),
        (["--save_file", str(tmp / "missing" / "x.mp4")], "does not exist"),
        (["--save_file", "/proc/x.mp4"], "no new file can be created"),
        (["--save_file", str(tmp / "out.txt")], "use a .mp4, .mov, .mkv path"),
        (["--save_file", str(tmp / "out.png")], ".png is for the t2i-14B task"),
        (["--save_file", str(tmp)], "it is a directory"),
        (["--save_file", str(tmp / "out.txt"), "--task", "t2i-14B", "--ckpt_dir", str(tmp)], "use a .png, .mp4"),
        (["--device", "tpu"], "not a device this package runs on"),
        (["--task", "t2v-tiny", "--ckpt_dir", str(tmp)], "takes no --ckpt_dir"),
        (["--task", "i2v-tiny", "--ckpt_dir", str(tmp)], "takes no --ckpt_dir"),
        (["--task", "i2v-tiny"], "needs --image"),
        (["--task", "i2v-14B"], "i2v-tiny, image-to-video with --image"),
        (["--task", "flf2v-14B"], "--task flf2v-14B needs --ckpt_dir"),
        (["--first_frame", "a.png", "--last_frame", "b.png"], "--first_frame/--last_frame are for --task flf2v-14B"),
        (["--src_video", "v.mp4"], "VACE"),
        (["--fp8"], "fp8 compute is not supported"),
        (["--ring_size", "0"], "--ring_size must be 1"),
    ] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "torch sees no CUDA device")])


@pytest.mark.parametrize("case", range(len(_fast_fail_cases(__import__("pathlib").Path(".")))))
def test_generate_refuses_bad_arguments_before_loading_any_model(tmp_path, capsys, case):
    """Exit 3 with the reason, and nothing loaded first (with 14B weights a load takes minutes;
    a bad --save_file used to fail only after sampling, --sample_steps 0 silently ran 30)."""
    argv, match = _fast_fail_cases(tmp_path)[case]
    code, out, err = _run(capsys, "generate", *argv)
    assert code == 3 and match in err, (argv, err)
    assert "loaded in" not in out and "Traceback" not in err


def test_generate_turns_autoencoder_errors_into_exit_codes(tmp_path, capsys):
    """dcae-v's own InputError (here: a tile that is not a multiple of the chunk) is a usage problem
    like any other: exit 3 and one line, not a traceback, and raised when the models load, not
    after sampling."""
    code, out, err = _run(capsys, "generate", "--frames_per_tile", "3", "--sample_steps", "1", "--frame_num", "8",
                          "--save_file", str(tmp_path / "v.mp4"))
    assert code == 3 and "frames_per_tile must be a positive multiple of" in err
    assert "Traceback" not in err and "sampling" not in err + out
    assert not (tmp_path / "v.mp4").exists()


def test_generate_keeps_an_empty_prompt(tmp_path, capsys, monkeypatch):
    """As official: --prompt "" is an empty prompt (only a missing --prompt means the example). The
    automatic file name carries the prompt's words, so it shows which prompt ran."""
    import re

    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "generate", "--prompt", "", "--sample_steps", "1", "--frame_num", "8")
    assert code == 0, err
    written = [p.name for p in tmp_path.glob("*.mp4")]
    assert len(written) == 1 and re.fullmatch(r"t2v-tiny_128x128_1_1__\d{8}_\d{6}\.mp4", written[0]), written


def test_i2v_480p_shift_default_holds_for_every_spelling_of_the_size():
    """Official I2V samples 832*480 with shift 3.0; "480p" and "832x480" are the same size here."""
    from dcvg_wan.pipelines import _defaults

    for size in ("832*480", "480*832", "480p", "832x480"):
        assert _defaults("i2v-14B", size, True).shift == 3.0, size
    for size in ("1280*720", "720p", "640*480"):
        assert _defaults("i2v-14B", size, True).shift == 5.0, size


def test_convert_unknown_preset_is_an_input_error(tmp_path, capsys):
    model = make_model("debug-t2v")
    model.save_pretrained(tmp_path / "official")
    code, _, err = _run(capsys, "convert", str(tmp_path / "official"), str(tmp_path / "out"), "--layout", "diffusers",
                        "--preset", "nope")
    assert code == 3 and "unknown Wan preset 'nope'" in err


@pytest.mark.parametrize("layout, name, match", [
    ("official", "out.safetensors", "writes a folder"),
    ("comfy", "a-file/out.safetensors", "is not a writable folder"),
    ("diffusers", "a-file/sub/out", "is not a writable folder"),
])
def test_convert_refuses_an_output_it_cannot_write_before_loading(tmp_path, capsys, layout, name, match):
    """Checked before the (large) checkpoint is read, which here does not even exist: an
    official/diffusers folder named like a single file, or a path under something that is not a
    writable folder."""
    (tmp_path / "a-file").write_text("x")
    code, _, err = _run(capsys, "convert", str(tmp_path / "does-not-exist"), str(tmp_path / name), "--layout", layout)
    assert code == 3 and match in err, err
