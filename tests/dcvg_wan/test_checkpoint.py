"""from_pretrained over every layout on disk (official dir, sharded official + index, diffusers
dir, ComfyUI/official single files, .pth), config dialects, shape inference, save_pretrained,
and the errors a user can act on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dcvg_wan import CheckpointError, WanModel
from dcvg_wan import checkpoint as ckpt
from dcvg_wan.layouts import from_official

WEIGHTS, INDEX = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def model(new_model) -> WanModel:
    return new_model("debug-t2v", seed=2)


def _same(a: WanModel, b: WanModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _write_official_dir(directory: Path, sd: dict, config: dict, shards: int = 1) -> Path:
    """An official Wan-AI style directory: config.json + one file or shards with an index."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(sd, directory / WEIGHTS)
        return directory
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, directory / name)
        weight_map |= {k: name for k in part}
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


def _official_config(cfg) -> dict:
    """What Wan-AI's config.json holds: no patch_size, text_dim, qk_norm, cross_attn_norm."""
    keys = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": cfg.model_type} | {
        k: getattr(cfg, k) for k in keys
    }


# ---- each layout loads --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_save_pretrained_round_trip(tmp_path, new_model, layout):
    model = new_model("debug-i2v", seed=3)
    model.save_pretrained(tmp_path / "m", layout=layout)
    loaded = WanModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.preset_names == ("debug-i2v",)
    _same(model, loaded)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == {"official": "WanModel", "diffusers": "WanTransformer3DModel"}[layout]


def test_official_config_without_patch_size_reads_it_from_shapes(tmp_path, new_model):
    """Wan-AI's config.json omits patch_size/text_dim; a patch-1 model must still load."""
    model = new_model("debug-t2v", patch=(1, 1, 1), text_dim=24)
    path = _write_official_dir(tmp_path / "wan", model.state_dict(), _official_config(model.config))
    loaded = WanModel.from_pretrained(path)
    assert loaded.config.patch == (1, 1, 1) and loaded.config.text_dim == 24
    _same(model, loaded)


def test_sharded_official_directory_with_index(tmp_path, model):
    path = _write_official_dir(tmp_path / "wan14b", model.state_dict(), _official_config(model.config), shards=3)
    _same(model, WanModel.from_pretrained(path))


def test_missing_shard_is_named_with_the_directory(tmp_path, model):
    path = _write_official_dir(tmp_path / "wan14b", model.state_dict(), _official_config(model.config), shards=3)
    (path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"lists 3 shard\(s\) but 1 are missing from {re.escape(str(path))}: "
                                              r"\['diffusion_pytorch_model-00002-of-00003.safetensors'\]"):
        WanModel.from_pretrained(path)


@pytest.mark.parametrize("layout", ["comfy", "official"])
def test_single_safetensors_file_infers_the_preset(tmp_path, model, layout):
    file = tmp_path / "wan2.1_t2v_debug.safetensors"
    save_file(from_official(model.state_dict(), layout), file)
    loaded = WanModel.from_pretrained(file)
    assert loaded.config == model.config and loaded.preset_names == ("debug-t2v",)
    _same(model, loaded)


def test_official_pth_file(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "wan.pth")
    _same(model, WanModel.from_pretrained(tmp_path / "wan.pth"))


def test_copied_weights_file_keeps_its_config(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS).rename(tmp_path / "alone.safetensors")
    assert WanModel.from_pretrained(tmp_path / "alone.safetensors").config.text_len == 16  # not a preset default


def test_shapes_alone_give_head_dim_128_for_unknown_sizes(tmp_path, new_model):
    model = new_model("debug-t2v", dim=256, num_heads=2, ffn_dim=32)
    save_file(model.state_dict(), tmp_path / "custom.safetensors")
    loaded = WanModel.from_pretrained(tmp_path / "custom.safetensors")
    assert loaded.config.num_heads == 2 and loaded.preset_names == ()


def test_dtype_casts_while_keeping_fp32_parts(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    loaded = WanModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].modulation.dtype == loaded.head.head.weight.dtype == torch.float32


def test_release_directory_with_two_transformers(tmp_path, new_model):
    """NVIDIA ships transformer_t2v/ and transformer_i2v/ (diffusers layout) in one repo."""
    t2v = new_model("debug-t2v", patch=(1, 1, 1), in_dim=8, out_dim=8, text_len=512)
    i2v = new_model("debug-i2v", patch=(1, 1, 1), in_dim=20, out_dim=8)
    t2v.save_pretrained(tmp_path / "transformer_t2v", layout="diffusers")
    i2v.save_pretrained(tmp_path / "transformer_i2v", layout="diffusers")
    (tmp_path / "dc-ae-v-f32t4c32-1.0-bf16.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"subfolders holding a model: \['transformer_i2v/', 'transformer_t2v/'\]"):
        WanModel.from_pretrained(tmp_path)
    _same(t2v, WanModel.from_pretrained(tmp_path / "transformer_t2v"))
    _same(i2v, WanModel.from_pretrained(tmp_path / "transformer_i2v"))


# ---- errors ---------------------------------------------------------------------------------
def test_missing_path_and_missing_weights_list_where_we_looked(tmp_path):
    with pytest.raises(CheckpointError, match="the path does not exist"):
        WanModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"no DiT weights in {re.escape(str(tmp_path))}: looked for {WEIGHTS} "
                                              rf"or {re.escape(INDEX)} \(\+ its shards\); found \['config.json'\]"):
        WanModel.from_pretrained(tmp_path)


def test_wrong_preset_lists_keys_and_names_the_best_fit(tmp_path, model):
    model.save_pretrained(tmp_path / "m", layout="diffusers")
    with pytest.raises(CheckpointError) as err:
        WanModel.from_pretrained(tmp_path / "m", preset="debug-i2v")
    message = str(err.value)
    assert "(diffusers layout) does not fit the expected Wan DiT, preset debug-i2v" in message
    assert "missing key(s):\n    blocks.0.cross_attn.k_img.weight" in message
    assert "mis-shaped key(s):\n    patch_embedding.weight: file (32, 4, 1, 2, 2) vs model (32, 12, 1, 2, 2)" in message
    assert "closest preset: debug-t2v (69/69 of its keys match" in message


def test_leftover_and_missing_keys_are_listed(tmp_path, model):
    sd = dict(model.state_dict())
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    del sd["blocks.1.ffn.2.bias"]
    save_file(from_official(sd, "comfy"), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"\(comfy layout\)[\s\S]*1 missing key\(s\):\n    blocks\.1\.ffn\.2\.bias\n"
                                              r"  1 unexpected key\(s\):\n    blocks\.0\.extra\.weight"):
        WanModel.from_pretrained(tmp_path / "bad.safetensors", preset="debug-t2v")


def test_config_json_that_disagrees_with_the_weights(tmp_path, model):
    path = _write_official_dir(tmp_path / "m", model.state_dict(), _official_config(model.config) | {"ffn_dim": 48})
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\):\n    blocks\.0\.ffn\.0\.weight: file \(64, 32\) vs model \(48, 32\)"):
        WanModel.from_pretrained(path)


def test_unknown_layout_unknown_preset_and_unreadable_files(tmp_path, model):
    save_file({"encoder.conv1.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        WanModel.from_pretrained(tmp_path / "vae.safetensors")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown Wan preset 't2v-2B'"):
        WanModel.from_pretrained(tmp_path / "m", preset="t2v-2B")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .*broken.safetensors as safetensors"):
        WanModel.from_pretrained(tmp_path / "broken.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.onnx'"):
        WanModel.from_pretrained(tmp_path / "model.onnx")


def test_unusable_config_json(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    with pytest.raises(CheckpointError, match="is not a Wan DiT config .*'AutoencoderKLWan'"):
        WanModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "vace"}))
    with pytest.raises(CheckpointError, match="model_type 'vace' is not supported"):
        WanModel.from_pretrained(tmp_path / "m")


def test_shapes_that_do_not_give_num_heads(tmp_path, new_model):
    save_file(new_model("debug-t2v", dim=48, num_heads=3).state_dict(), tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot infer num_heads .*dim=48.*pass preset="):
        WanModel.from_pretrained(tmp_path / "odd.safetensors")


def test_single_file_and_index_together_is_ambiguous(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / INDEX).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="holds both"):
        WanModel.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds a sharded checkpoint"):
        model.save_pretrained(tmp_path / "m")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, model, new_model, monkeypatch):
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        new_model("debug-t2v", seed=9).save_pretrained(tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


@pytest.mark.parametrize("form", ["official-dir", "diffusers-dir", "comfy-file", "official-pth"])
def test_read_wan_config_equals_the_loaded_models_config(tmp_path, model, form):
    """`read_wan_config` (headers only; `dcvg-wan adapt` picks its task with it before any work)
    gives the architecture that loading the weights gives, in every layout."""
    if form.endswith("-dir"):
        model.save_pretrained(tmp_path / "m", layout=form.removesuffix("-dir"))
        path = tmp_path / "m"
    elif form == "comfy-file":
        path = tmp_path / "m.safetensors"
        save_file(from_official(model.state_dict(), "comfy"), path)
    else:
        path = tmp_path / "m.pth"
        torch.save(model.state_dict(), path)
    assert ckpt.read_wan_config(path) == WanModel.from_pretrained(path).config


def test_diffusers_folder_keeps_fields_its_config_json_cannot_carry(tmp_path, model):
    """diffusers' config.json has no text_len; our save keeps the whole config in the weights'
    metadata, so a text_len=16 model comes back with 16 (and the same outputs), not 512."""
    from tests.dcvg_wan.conftest import make_inputs

    assert model.config.text_len != 512
    model.save_pretrained(tmp_path / "d", layout="diffusers")
    assert "text_len" not in json.loads((tmp_path / "d" / "config.json").read_text())
    back = WanModel.from_pretrained(tmp_path / "d")
    assert back.config == model.config
    inputs = make_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs), model(**inputs), rtol=0, atol=0)


def test_wan_model_takes_torch_dtype_and_dtype_names(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    assert WanModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16).blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert WanModel.from_pretrained(tmp_path / "m", dtype="bfloat16").blocks[0].ffn[0].weight.dtype == torch.bfloat16
    from dcvg_wan.errors import InputError

    with pytest.raises(InputError, match="is not one of"):
        WanModel.from_pretrained(tmp_path / "m", dtype="int8")


def test_save_pretrained_comfy_points_to_the_single_file_writer(tmp_path, model):
    from dcvg_wan.errors import InputError

    with pytest.raises(InputError, match="save_single_file"):
        model.save_pretrained(tmp_path / "c", layout="comfy")
