"""Checkpoints: save/load round trips, NVIDIA's layouts, full-size architecture inference on the
meta device, actionable errors, and atomic writes."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dcae_v import DCAEV, PRESETS, CheckpointError
from dcae_v import checkpoint as ckpt
from dcae_v.checkpoint import describe_checkpoint, load_dcaev, save_nvidia_checkpoint

RELEASED = ["f32t4c32", "f32t4c64", "f32t4c128", "f32t4c256", "f64t4c128"]
MANIFESTS = Path(__file__).parent / "manifests"


@pytest.fixture(scope="module")
def other(make_model) -> DCAEV:
    """Same architecture, different weights (to tell EMA from model weights)."""
    return make_model(seed=1)


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(1, 3, 8, 32, 32) * 2 - 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "debug"
    model.save_pretrained(directory)
    return directory


def _assert_same_weights(a: DCAEV | dict, b: DCAEV | dict, dtype: torch.dtype | None = None) -> None:
    sa = a.state_dict() if isinstance(a, DCAEV) else a
    sb = b.state_dict() if isinstance(b, DCAEV) else b
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if dtype is not None:
            assert sa[k].dtype == sb[k].dtype == dtype, k
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _differs(a: DCAEV, b: DCAEV) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- our layout ------------------------------------------------------------------------------
def test_save_pretrained_round_trip(saved, model, video):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "DCAEV" and config["chunk_size"] == 8 and config["latent_channels"] == 8

    loaded = DCAEV.from_pretrained(saved)
    assert loaded.config == model.config
    assert not loaded.training
    _assert_same_weights(loaded, model, dtype=torch.float32)
    with torch.no_grad():
        z = model.encode(video)
        assert torch.equal(loaded.encode(video), z)
        assert torch.equal(loaded.decode(z), model.decode(z))


def test_save_pretrained_in_bf16_and_safetensors_file_beside_its_config(tmp_path, model):
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast
    loaded = load_dcaev(tmp_path / "model.safetensors")  # picks up config.json next to it
    assert loaded.config == model.config
    assert loaded.dtype == torch.bfloat16
    _assert_same_weights(loaded, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, torch.bfloat16)


def test_bare_safetensors_file_infers_the_architecture(tmp_path, model):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_dcaev(path)
    assert loaded.config == PRESETS["debug"]  # no config.json: inferred from the keys, preset defaults
    _assert_same_weights(loaded, model, dtype=torch.float32)


def test_model_safetensors_copied_alone_keeps_its_config(tmp_path, saved, model):
    """save_pretrained stores the config in the safetensors metadata too; a copy of the weights
    file without config.json should come back with it (here: chunk_size=8, not the preset's 40)."""
    lone = tmp_path / "debug-chunk8.safetensors"
    lone.write_bytes((saved / "model.safetensors").read_bytes())
    assert load_dcaev(lone).config == model.config


# ---- NVIDIA's layout -------------------------------------------------------------------------
def test_nvidia_layout_loads_the_ema_weights(tmp_path, model, other):
    assert _differs(model, other)
    path = tmp_path / "dc-ae-v-debug.pt"
    save_nvidia_checkpoint(path, model.state_dict(), ema_state_dict=other.state_dict(), ema_decay=0.9999)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict", "ema_model_state_dict"} and list(raw["ema_model_state_dict"]) == [0.9999]

    loaded = load_dcaev(path)
    assert loaded.config == PRESETS["debug"]
    _assert_same_weights(loaded, other)  # EMA, not model_state_dict
    assert _differs(loaded, model)


def test_nvidia_layout_takes_the_first_ema_entry(tmp_path, model, other):
    path = tmp_path / "two_decays.pt"
    torch.save({"ema_model_state_dict": {0.999: other.state_dict(), 0.9999: model.state_dict()}}, path)
    _assert_same_weights(load_dcaev(path), other)


def test_nvidia_layout_without_ema_loads_model_state_dict(tmp_path, model, video):
    path = tmp_path / "no_ema.pt"
    save_nvidia_checkpoint(path, model.state_dict())
    assert set(torch.load(path, weights_only=True)) == {"model_state_dict"}
    loaded = load_dcaev(path, chunk_size=8)
    assert loaded.config == model.config
    _assert_same_weights(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), model.encode(video))


def test_bf16_file_stays_bf16_unless_dtype_is_given(tmp_path, model):
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / "dc-ae-v-debug-bf16.pt"
    save_nvidia_checkpoint(path, bf16, ema_state_dict=bf16)
    loaded = load_dcaev(path)
    assert loaded.dtype == torch.bfloat16
    _assert_same_weights(loaded, bf16, torch.bfloat16)

    as_f32 = load_dcaev(path, dtype=torch.float32)
    assert as_f32.dtype == torch.float32
    _assert_same_weights(as_f32, {k: v.float() for k, v in bf16.items()}, torch.float32)


@pytest.mark.parametrize("name, wrap", [
    ("flat.pt", lambda sd: sd),
    ("ddp.pth", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    ("compiled.pt", lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),
    ("ddp_in_nvidia_layout.pt", lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}),
])
def test_flat_and_prefixed_state_dicts_load(tmp_path, model, name, wrap):
    path = tmp_path / name
    torch.save(wrap(model.state_dict()), path)
    _assert_same_weights(load_dcaev(path), model)


# ---- full size, without memory ---------------------------------------------------------------
@pytest.mark.parametrize("preset", RELEASED)
def test_full_size_release_infers_its_preset_on_meta(tmp_path, preset):
    sd = {k: v.to(torch.bfloat16) for k, v in DCAEV.from_preset(preset, device="meta").state_dict().items()}
    assert all(v.is_meta for v in sd.values())
    path = tmp_path / f"dc-ae-v-{preset}-1.0-bf16.pt"
    torch.save({"ema_model_state_dict": {0.9999: sd}}, path)  # NVIDIA's layout, written as they do
    assert path.stat().st_size < 1_000_000  # meta tensors carry no data

    loaded = load_dcaev(path, device="meta")
    assert loaded.config == PRESETS[preset]
    assert loaded.scaling_factor == PRESETS[preset].scaling_factor
    assert loaded.dtype == torch.bfloat16
    assert all(p.is_meta for p in loaded.parameters())
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}  # no missing and no leftover key

    info = describe_checkpoint(path)
    manifest = json.loads((MANIFESTS / f"dcaev_{preset}_manifest.json").read_text())
    assert info["layout"] == "NVIDIA .pt" and info["preset"] == preset
    assert info["parameters"] == manifest["num_params"] and info["keys"] == len(sd)
    assert info["dtypes"] == ["bfloat16"] and info["loads"].startswith("yes")


@pytest.fixture(scope="module")
def f32t4c32_file(tmp_path_factory) -> Path:
    sd = {k: v.to(torch.bfloat16) for k, v in DCAEV.from_preset("f32t4c32", device="meta").state_dict().items()}
    path = tmp_path_factory.mktemp("release") / "dc-ae-v-f32t4c32-1.0-bf16.pt"
    torch.save({"ema_model_state_dict": {0.9999: sd}}, path)
    return path


def test_wrong_preset_lists_mis_shaped_keys_and_names_the_closest(f32t4c32_file):
    with pytest.raises(CheckpointError, match=r"does not fit DC-AE-V f32t4c64") as e:
        load_dcaev(f32t4c32_file, preset="f32t4c64", device="meta")
    msg = str(e.value)
    assert str(f32t4c32_file) in msg and "NVIDIA .pt" in msg
    assert re.search(r"3 mis-shaped key\(s\)", msg), msg
    assert "encoder.project_out.conv.weight: file (32, 1024, 3, 3, 3) vs model (64, 1024, 3, 3, 3)" in msg
    assert "decoder.project_in.conv.weight: file (1024, 32, 3, 3, 3) vs model (1024, 64, 3, 3, 3)" in msg
    assert "encoder.project_out.conv.bias: file (32,) vs model (64,)" in msg
    assert "missing" not in msg and "unexpected" not in msg
    assert "closest preset: f32t4c32" in msg


def test_debug_file_loaded_as_f32t4c32_lists_every_kind_of_problem(saved):
    with pytest.raises(CheckpointError, match=r"does not fit DC-AE-V f32t4c32") as e:
        load_dcaev(saved, preset="f32t4c32")
    msg = str(e.value)
    for title in ("missing key(s)", "unexpected key(s)", "mis-shaped key(s)"):
        assert re.search(rf"\d+ {re.escape(title)}", msg), (title, msg)
    assert re.search(r"\.\.\. and \d+ more", msg)  # long lists are cut, with a count
    assert "closest preset: debug" in msg


# ---- errors ------------------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope\.pt: the path does not exist"):
        load_dcaev(tmp_path / "nope.pt")


@pytest.mark.parametrize("present, missing", [
    ([], "config.json, model.safetensors"),
    (["model.safetensors"], "config.json"),
    (["config.json"], "model.safetensors"),
])
def test_directory_names_what_is_missing(tmp_path, saved, present, missing):
    d = tmp_path / "partial"
    d.mkdir()
    for name in present:
        (d / name).write_bytes((saved / name).read_bytes())
    with pytest.raises(CheckpointError, match=rf"not a DC-AE-V checkpoint directory: missing {missing} \(found: "):
        load_dcaev(d)


def test_garbage_pt(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 this is not a torch file" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read .*garbage\.pt with torch\.load\(weights_only=True\)"):
        load_dcaev(path)


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read .*garbage\.safetensors as safetensors"):
        load_dcaev(path)


def test_truncated_safetensors(tmp_path, saved):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes((saved / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"may be truncated or not safetensors"):
        load_dcaev(path)


def test_pickle_with_objects_is_refused(tmp_path, model):
    path = tmp_path / "training_state.pt"
    torch.save({"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*Only plain tensor checkpoints"):
        load_dcaev(path)


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "not_weights.pt"
    torch.save({"model_state_dict": {"step": 3}}, path)
    with pytest.raises(CheckpointError, match=r"no state dict found .*'model_state_dict'"):
        load_dcaev(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type '\.onnx'.*\.safetensors"):
        load_dcaev(path)


@pytest.mark.parametrize("text, match", [
    ("{not json", r"config\.json is not a valid DC-AE-V config"),
    (json.dumps({"latent_channels": 8, "widths": [16, 32], "depths": [1, 1], "color": "red"}), r"unknown field.*color"),
    (json.dumps(PRESETS["debug"].to_dict() | {"chunk_size": 42}), r"not a valid DC-AE-V config.*chunk_size"),
    (json.dumps({"widths": [16, 32]}), r"not a valid DC-AE-V config"),
])
def test_invalid_config_json(tmp_path, saved, text, match):
    d = tmp_path / "bad_config"
    d.mkdir()
    (d / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_dcaev(d)


def test_keys_that_fit_no_architecture(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"vae.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"could not infer a DC-AE-V architecture.*closest preset: .*Pass preset="):
        load_dcaev(path)


# ---- overrides -------------------------------------------------------------------------------
def test_runtime_overrides_are_accepted(saved, model):
    loaded = load_dcaev(saved, temporal="causal", chunk_size=16)
    assert (loaded.config.temporal, loaded.config.chunk_size) == ("causal", 16)
    assert loaded.config.replace(temporal="chunk_causal", chunk_size=8) == model.config
    _assert_same_weights(loaded, model)
    assert DCAEV.from_pretrained(saved, scaling_factor=0.5).scaling_factor == 0.5


@pytest.mark.parametrize("overrides", [dict(latent_channels=16), dict(widths=(16,) * 7), dict(depths=(0, 1, 1, 1, 1, 1, 2))])
def test_architecture_overrides_are_refused(saved, overrides):
    name = next(iter(overrides))
    with pytest.raises(CheckpointError, match=rf"cannot override \['{name}'\] when loading weights; allowed: .*chunk_size"):
        load_dcaev(saved, **overrides)


# ---- atomic writes -----------------------------------------------------------------------------
def test_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, model, other, monkeypatch):
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def save_file_that_dies(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", save_file_that_dies)
    with pytest.raises(OSError, match="No space left"):
        DCAEV.save_pretrained(other, d)
    with pytest.raises(OSError, match="No space left"):
        DCAEV.save_pretrained(other, tmp_path / "new")
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # same files, same bytes, no temp file
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []
    _assert_same_weights(load_dcaev(d), model)


def test_save_pretrained_overwrites_and_files_are_readable(tmp_path, model, other):
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    other.save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o666 & ~umask}  # not mkstemp's 0600
    _assert_same_weights(load_dcaev(d), other)


# ---- describe ----------------------------------------------------------------------------------
def test_describe_checkpoint(saved, model, tmp_path):
    info = describe_checkpoint(saved)
    assert info["layout"] == "dcae-v directory" and info["preset"] == "debug" and info["architecture"] == "f32t4c8"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["keys"] == len(model.state_dict())
    assert info["dtypes"] == ["float32"] and info["loads"].startswith("yes")
    assert info["config"] == model.config.to_dict()
    json.dumps(info)  # the CLI prints it as JSON

    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    sd["decoder.project_in.conv.bias"] = sd["decoder.project_in.conv.bias"].float()
    del sd["encoder.project_out.conv.bias"]
    path = tmp_path / "partial.pt"
    save_nvidia_checkpoint(path, sd)
    info = describe_checkpoint(path)
    assert info["layout"] == "NVIDIA .pt" and info["dtypes"] == ["bfloat16", "float32"]
    assert "1 missing key(s)" in info["loads"] and "encoder.project_out.conv.bias" in info["loads"]
