"""NVIDIA's DC-Gen generate.py words (task=t2v prompt=... steps=...) read as our flags: the same
namespace as the flags written out, the same video, and a clear refusal for what differs."""

from __future__ import annotations

import argparse

import av
import numpy as np
import pytest

from dcvg_wan.cli import main
from dcvg_wan.dcgen_arguments import translate
from dcvg_wan.errors import InputError
from dcvg_wan.generate import add_arguments


@pytest.fixture(scope="module")
def parser():
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_nvidia_words_give_the_namespace_of_our_flags(parser):
    words = ["task=t2v", "prompt=a cat = fun", "num_frames=81", "steps=50", "guidance=5.0", "seed=42",
             "save_path=out.mp4", "use_expander=no", "--ckpt_dir", "DC-Gen-Wan2.1-T2V-14B"]
    flags = ["--task", "t2v-14B", "--prompt", "a cat = fun", "--frame_num", "81", "--sample_steps", "50",
             "--sample_guide_scale", "5.0", "--base_seed", "42", "--save_file", "out.mp4",
             "--ckpt_dir", "DC-Gen-Wan2.1-T2V-14B"]
    tokens, note = translate(words, parser)
    assert vars(parser.parse_args(tokens)) == vars(parser.parse_args(flags))
    assert note.startswith("note: read NVIDIA's generate.py arguments as") and "steps=50 -> --sample_steps 50" in note
    assert translate(["use_expander=no"], parser) == ([], "note: read NVIDIA's generate.py arguments as use_expander=no (off, as here)")
    assert parser.parse_args(translate(["task=T2V", "--ckpt_dir", "x"], parser)[0]).task == "t2v-14B"
    assert "random here" in translate(["seed=-1"], parser)[1]
    i2v, _ = translate(["task=i2v", "input_image_path=cat.jpg", "--ckpt_dir", "x"], parser)
    assert parser.parse_args(i2v).task == "i2v-14B" and parser.parse_args(i2v).image == "cat.jpg"


def test_flag_values_with_equals_signs_are_left_alone(parser):
    tokens = ["--prompt", "e=mc2", "--negative_prompt=x=y", "--base_seed", "-1", "--t5_cpu", "--size", "832*480"]
    assert translate(tokens, parser) == (tokens, None)


@pytest.mark.parametrize("words, message", [
    (["task=t2i_1k", "--ckpt_dir", "x"], "t2i_1k/t2i_4k/edit"),
    (["task=t2v"], "downloads dc-ai/DC-Gen-Wan2.1-T2V-14B"),
    (["width=1024", "--ckpt_dir", "x"], "--size W\\*H"),
    (["use_expander=yes"], "not implemented"),
    (["stepz=3"], "not one of NVIDIA's generate.py keys"),
    (["prompt=a", "prompt=b"], "--prompt given twice"),
    (["steps=2", "--sample_steps", "3"], "--sample_steps given twice"),
])
def test_what_cannot_be_done_the_same_way_is_refused(parser, words, message):
    with pytest.raises(InputError, match=message):
        translate(words, parser)


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_cli_runs_nvidias_words_like_the_flags(tmp_path, capsys):
    common = ["generate", "--frame_num", "8"]
    assert main([*common, "prompt=a red circle moving left", "steps=2", "seed=3", f"save_path={tmp_path / 'a.mp4'}"]) == 0
    out = capsys.readouterr().out
    assert "read NVIDIA's generate.py arguments as" in out
    assert main([*common, "--prompt", "a red circle moving left", "--sample_steps", "2", "--base_seed", "3",
                 "--save_file", str(tmp_path / "b.mp4")]) == 0
    np.testing.assert_array_equal(_frames(tmp_path / "a.mp4"), _frames(tmp_path / "b.mp4"))
    assert main(["generate", "task=t2v", "prompt=x"]) == 3
    assert "--ckpt_dir" in capsys.readouterr().err
