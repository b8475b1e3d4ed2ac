"""`ae-adapt` subcommands: presets, cache-info, export-lora; errors become exit code 2."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ae_adapt import build_cache, lora_io
from ae_adapt.cli import main
from ae_adapt.example_dit import PRESETS, ExampleDiT


def test_presets_prints_table8(capsys):
    assert main(["presets", "wan-14B"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["wan-14B"]["lora"]["lr"] == 5e-5 and out["wan-14B"]["head"]["steps"] == 3000


def test_unknown_preset_is_exit_code_2(capsys):
    assert main(["presets", "nope"]) == 2
    assert "valid presets" in capsys.readouterr().err


def test_cache_info(clip_world, tmp_path, capsys):
    build_cache(
        [clip_world.clip(0)],
        tmp_path,
        base_encode=clip_world.base_encode,
        new_encode=clip_world.new_encode,
        text_encode=lambda p: torch.zeros(2, 16),
        base_ae="a",
        new_ae="b",
    )
    assert main(["cache-info", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["shapes"]["new"] == [8, 2, 4, 4]
    assert main(["cache-info", str(tmp_path / "none")]) == 2


def test_export_lora_command(tmp_path):
    model = ExampleDiT(PRESETS["tiny"])
    lora_io.add_lora(model, rank=2, alpha=4, target_modules=("qkv",))
    lora_io.save_lora(model, tmp_path / "adapter")
    assert main(["export-lora", str(tmp_path / "adapter"), "-o", str(tmp_path / "l.safetensors")]) == 0
    assert "diffusion_model.blocks.0.qkv.lora_A.weight" in load_file(str(tmp_path / "l.safetensors"))
