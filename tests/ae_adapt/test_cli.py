"""`ae-adapt` subcommands: presets, cache-info, export-lora; errors become exit code 2."""

from __future__ import annotations

import copy
import json
import os

import pytest
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
    assert main(["presets", "nope"]) == 3
    assert "valid presets" in capsys.readouterr().err


def test_an_unknown_option_gets_its_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export-lora", "adapter", "-o", "x.safetensors", "--formt", "comfy"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: ae-adapt export-lora") and "--formt" in err


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
    assert main(["cache-info", str(tmp_path / "none")]) == 3


def test_export_lora_command(tmp_path, capsys):
    model = ExampleDiT(PRESETS["tiny"])
    lora_io.add_lora(model, rank=2, alpha=4, target_modules=("qkv",))
    lora_io.save_lora(model, tmp_path / "adapter")
    assert main(["export-lora", str(tmp_path / "adapter"), "-o", str(tmp_path / "l.safetensors")]) == 0
    assert "diffusion_model.blocks.0.qkv.lora_A.weight" in load_file(str(tmp_path / "l.safetensors"))
    assert capsys.readouterr().err == ""  # "blocks." is the model's own block list: nothing stripped


class _Wrapper(torch.nn.Module):
    """Holds the DiT as `.dit`, as dcvg-wan's WanAdaptable holds the Wan model."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, *args, **kwargs):
        return self.dit(*args, **kwargs)


def test_wrapper_prefix_is_one_shared_named_top_module():
    wrap = lora_io.wrapper_prefix
    assert wrap(["dit.blocks.0.qkv", "dit.blocks.1.fc1"]) == "dit."
    assert wrap(["dit.blocks.0.self_attn.q", "dit.text_embedding.0", "dit.time_projection.1"]) == "dit."
    assert wrap(["dit.head.head"]) == "dit."
    assert wrap(["blocks.0.qkv", "blocks.1.fc1"]) == ""  # a block list of the model itself
    assert wrap(["blocks.0.q", "text_embedding.0"]) == ""  # several top-level modules
    assert wrap(["dit.blocks.0.q", "head.head"]) == ""  # not shared by every layer
    assert wrap(["head.head"]) == wrap([]) == ""  # too short to tell


@pytest.mark.parametrize("fmt, key", [("comfy", "diffusion_model.{}blocks.0.qkv.lora_A.weight"),
                                      ("kohya", "lora_unet_{}blocks_0_qkv.lora_down.weight")])
def test_export_lora_strips_a_wrapper_prefix_by_itself_with_a_note(fmt, key, tmp_path, capsys):
    torch.manual_seed(0)
    plain = ExampleDiT(PRESETS["tiny"])
    wrapped = _Wrapper(copy.deepcopy(plain))
    lora_io.add_lora(wrapped, rank=2, alpha=4, target_modules=("qkv", "fc1"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = lora_io.save_lora(wrapped, tmp_path / "adapter")
    runs = {"auto": [], "explicit": ["--strip-prefix", "dit."], "off": ["--strip-prefix", ""]}
    out, err = {}, {}
    for run, extra in runs.items():
        path = tmp_path / f"{run}.safetensors"
        assert main(["export-lora", str(adapter), "-o", str(path), "--format", fmt, *extra]) == 0
        out[run], err[run] = load_file(str(path)), capsys.readouterr().err
    assert "note:" in err["auto"] and "'dit.'" in err["auto"] and '--strip-prefix ""' in err["auto"]
    assert err["explicit"] == err["off"] == ""
    assert key.format("") in out["auto"] and out["auto"].keys() == out["explicit"].keys()
    assert all(torch.equal(v, out["explicit"][k]) for k, v in out["auto"].items())
    sep = "dit." if fmt == "comfy" else "dit_"
    assert key.format(sep) in out["off"] and len(out["off"]) == len(out["auto"])
    # the stripped export applies to the plain model (no wrapper) and gives the wrapped model's outputs
    assert len(lora_io.apply_exported_lora(plain, out["auto"])) == 2 * len(plain.blocks)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, ctx), wrapped(x, t, ctx), rtol=0, atol=1e-5)
    assert lora_io.convert_peft_adapter(adapter, fmt, strip_prefix=None).keys() == out["auto"].keys()


def _adapter(tmp_path):
    model = ExampleDiT(PRESETS["tiny"])
    lora_io.add_lora(model, rank=2, alpha=4, target_modules=("qkv",))
    return lora_io.save_lora(model, tmp_path / "adapter")


@pytest.mark.parametrize("where, message", [
    ("missing dir", "the directory '{d}/nodir' does not exist"),
    ("under a file", "'{d}/afile' is not a directory"),
    ("a directory", "it is a directory"),
    ("proc", "no new file can be created in '/proc'"),
])
def test_export_lora_unwritable_output_is_one_line(tmp_path, capsys, where, message):
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    adapter = _adapter(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = {"missing dir": tmp_path / "nodir" / "l.safetensors", "under a file": tmp_path / "afile" / "l.safetensors",
           "a directory": tmp_path, "proc": "/proc/l.safetensors"}[where]
    assert main(["export-lora", str(adapter), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"ae-adapt: error: cannot write '{out}'") and message.format(d=tmp_path) in err
    assert len(err.strip().splitlines()) == 1


def test_export_lora_write_failure_is_an_output_error(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def fail(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    assert main(["export-lora", str(_adapter(tmp_path)), "-o", str(tmp_path / "l.safetensors")]) == 3
    assert "cannot write" in capsys.readouterr().err


def test_unknown_preset_is_a_typed_value_error():
    from ae_adapt import AdaptError, PresetError, get_preset

    with pytest.raises(PresetError, match="valid presets: wan-1.3B, wan-14B, debug") as e:
        get_preset("nope")
    assert isinstance(e.value, AdaptError) and isinstance(e.value, ValueError)


def test_closed_stdout_pipe_exits_quietly(capsys, close_stdout):
    """`ae-adapt presets | head`: the reader left; exit 141 (as a shell reports SIGPIPE), no traceback."""
    close_stdout()
    assert main(["presets"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_export_lora_refuses_a_non_safetensors_name(tmp_path, capsys):
    adapter = _adapter(tmp_path)
    assert main(["export-lora", str(adapter), "-o", str(tmp_path / "l.pt")]) == 3
    assert "name it .safetensors" in capsys.readouterr().err and not (tmp_path / "l.pt").exists()
