"""Finding a pipeline's files in official, diffusers and NVIDIA DC-VideoGen checkpoint folders."""

from __future__ import annotations

import pytest

from dcvg_wan.components import locate_components
from dcvg_wan.errors import CheckpointError


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(b"")


def test_official_folder(tmp_path):
    _touch(tmp_path, "config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
           "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json",
           "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    paths = locate_components(tmp_path, i2v=True)
    assert paths.dit == tmp_path
    assert paths.vae.name == "Wan2.1_VAE.pth"
    assert paths.text_encoder.name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert paths.tokenizer == tmp_path / "google/umt5-xxl"
    assert paths.image_encoder.name.startswith("models_clip")
    assert paths.dcae is None


def test_diffusers_folder_with_sharded_transformer(tmp_path):
    _touch(tmp_path, "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
           "vae/config.json", "text_encoder/config.json", "tokenizer/")
    paths = locate_components(tmp_path, i2v=False)
    assert (paths.dit, paths.vae, paths.text_encoder, paths.tokenizer) == (
        tmp_path / "transformer", tmp_path / "vae", tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert paths.image_encoder is None


def test_nvidia_dc_videogen_folder(tmp_path):
    _touch(tmp_path, "transformer_t2v/config.json", "transformer_t2v/diffusion_pytorch_model.safetensors",
           "transformer_i2v/config.json", "transformer_i2v/diffusion_pytorch_model.safetensors.index.json",
           "dc-ae-v-f32t4c32-1.0-bf16.pt", "text_encoder/model.safetensors", "tokenizer/",
           "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    t2v = locate_components(tmp_path, i2v=False, ae="dcae-v")
    assert t2v.dit == tmp_path / "transformer_t2v" and t2v.dcae.name == "dc-ae-v-f32t4c32-1.0-bf16.pt"
    assert t2v.vae is None
    i2v = locate_components(tmp_path, i2v=True, ae="dcae-v")
    assert i2v.dit == tmp_path / "transformer_i2v" and i2v.image_encoder is not None


def test_missing_files_are_all_listed(tmp_path):
    _touch(tmp_path, "config.json", "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        locate_components(tmp_path, i2v=True)
    text = str(err.value)
    for expected in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "models_clip", str(tmp_path)):
        assert expected in text
    assert "DiT" not in text  # the DiT was found


def test_explicit_paths_override_and_missing_explicit_path(tmp_path):
    _touch(tmp_path, "dit/config.json", "dit/diffusion_pytorch_model.safetensors", "t5.pth", "tok/", "ae.pt")
    paths = locate_components(None, i2v=False, ae="dcae-v", dit=tmp_path / "dit", text_encoder=tmp_path / "t5.pth",
                              tokenizer=tmp_path / "tok", dcae=tmp_path / "ae.pt")
    assert paths.dcae == tmp_path / "ae.pt"
    with pytest.raises(CheckpointError, match="given explicitly"):
        locate_components(None, i2v=False, ae="dcae-v", dit=tmp_path / "dit", text_encoder=tmp_path / "t5.pth",
                          tokenizer=tmp_path / "tok", dcae=tmp_path / "nope.pt")


def test_not_a_directory_and_unknown_autoencoder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        locate_components(tmp_path / "missing", i2v=False)
    with pytest.raises(CheckpointError, match="wan-vae or dcae-v"):
        locate_components(tmp_path, i2v=False, ae="sdxl-vae")


def test_dcae_default_means_the_shipped_autoencoder(tmp_path):
    _touch(tmp_path, "config.json", "diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
           "google/umt5-xxl/")
    with pytest.raises(CheckpointError, match="--dcae_ckpt default"):
        locate_components(tmp_path, i2v=False, ae="dcae-v")
    assert locate_components(tmp_path, i2v=False, ae="dcae-v", dcae="default").dcae is None
