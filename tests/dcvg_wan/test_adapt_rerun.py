"""`dcvg-wan adapt` reruns, divergence and --set values (audit 6 findings 1, 2, 6): a rerun into the
same --out with other settings, size, data or autoencoder weights is refused with the changed
field named; a diverged stage stops with a clear message; bad --set values are exit 3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dcae_v import DCAEV
from dcvg_wan.adapt_command import _apply_overrides, parse_overrides
from dcvg_wan.cli import main
from tests.dcvg_wan.test_adapt_command import setup  # noqa: F401  (the tiny Wan folder, DC-AE-V, videos)

QUICK = ["embedder.steps=2", "head.steps=2", "lora.steps=1", "lora.warmup_steps=0", "resolution=[]",
         "cond_dropout=0"]


def _argv(root, ckpt, data, out, *sets, size="32*32", frames="9", dcae=None):
    return ["adapt", "--ckpt_dir", str(ckpt), "--dcae_ckpt", str(dcae or root / "dcae"), "--data", str(data),
            "--out", str(out), "--size", size, "--frame_num", frames, "--preset", "debug", "--set", *QUICK, *sets]


def test_a_rerun_with_other_settings_inputs_or_weights_is_refused(setup, tmp_path, capsys):  # noqa: F811
    root, ckpt, data = setup
    out = tmp_path / "out"
    assert main(_argv(root, ckpt, data, out)) == 0, capsys.readouterr().err
    capsys.readouterr()
    rank = json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]

    def refused(argv, *expected):
        assert main(argv) == 3
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert len(err.replace(str(out), "")) < 700, err  # the changed fields, not whole fingerprints
        return err

    # a finished stage's hyper-parameter
    refused(_argv(root, ckpt, data, out, "lora_rank=8"), "rank: 4 -> 8", str(out / "3-lora"), "use a new output directory")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == rank
    # size and frames, with the cache built
    refused(_argv(root, ckpt, data, out, size="16*16", frames="5"), "size: '32*32' -> '16*16'", "frame_num: 9 -> 5",
            str(out / "cache"), str(out / "1-align-embedder"))
    # other DC-AE-V weights in a folder of the same name
    torch.manual_seed(7)
    other = tmp_path / "other" / "dcae"
    DCAEV.from_preset("debug", chunk_size=4).save_pretrained(other)
    refused(_argv(root, ckpt, data, out, dcae=other), "new_ae: 'dcae-v:8c:sha256-")
    # other data: one video fewer
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted(data.iterdir())[:4]:  # clip0, clip1 (.mp4 + .txt)
        shutil.copy(f, fewer / f.name)
    refused(_argv(root, ckpt, fewer, out), "data.videos: 3 -> 2")
    # the same arguments still restore the finished run; the same DC-AE-V under another folder too
    copy = tmp_path / "copy" / "dcae"
    shutil.copytree(root / "dcae", copy)
    assert main(_argv(root, ckpt, data, out, dcae=copy)) == 0, capsys.readouterr().err


def test_a_diverged_stage_stops_with_a_message_and_no_outputs(setup, tmp_path, capsys):  # noqa: F811
    root, ckpt, data = setup
    out = tmp_path / "out"
    code = main(_argv(root, ckpt, data, out, "head.lr=1e30", "head.steps=4", "head.log_every=1"))
    err = capsys.readouterr().err
    # exit 3 through cmd_adapt's AdaptError mapping until cli.py maps DivergedError to 6 ("diverged")
    assert code == 6 and "stage align_head diverged" in err and "--set head.lr=" in err, err
    assert not (out / "2-align-head" / "done.json").exists() and not (out / "model").exists()
    log = (out / "2-align-head" / "log.jsonl").read_text()
    assert log and "NaN" not in log and "Infinity" not in log
    assert main(_argv(root, ckpt, data, out)) == 0, capsys.readouterr().err  # a sane lr: trains on


@pytest.mark.parametrize("value, message", [
    ("lora_rank=abc", "lora_rank: expected an integer, got 'abc'"),
    ("lora_rank=2.5", "lora_rank: expected an integer, got 2.5"),
    ("cond_dropout=abc", "cond_dropout: expected a number"),
    ("embedder.steps=2.5", "embedder.steps: expected an integer, got 2.5 (not rounded"),
    ("embedder.stepz=3", "the fields of embedder are: lr, steps"),
    ("flow_shift=true", "flow_shift: expected a number, got True"),
])
def test_bad_set_values_exit_3_naming_the_field(setup, tmp_path, capsys, value, message):  # noqa: F811
    root, ckpt, data = setup
    assert main(_argv(root, ckpt, data, tmp_path / "out", value)) == 3
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "refused before any work"


def test_one_text_for_a_tuple_field_is_one_element():
    got = _apply_overrides("debug", parse_overrides(["lora_targets=blocks.0.ffn.0", "embedder.steps=2e1"]))
    assert got["lora_targets"] == ("blocks.0.ffn.0",) and got["embedder"].steps == 20
