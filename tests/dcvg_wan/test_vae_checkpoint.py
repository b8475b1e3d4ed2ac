"""WanVAE.from_pretrained over every layout on disk (official .pth and ckpt_dir, diffusers vae/
and pipeline dirs, ComfyUI files, our own dir), the config read from shapes, and the errors a
user can act on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dcvg_wan import CheckpointError, WanVAE, get_vae_preset
from dcvg_wan import vae_checkpoint as vc
from dcvg_wan.layouts import vae_diffusers


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(5)
    model = WanVAE.from_preset("debug").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _same(a: WanVAE, b: WanVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _sd(model: WanVAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- each layout loads --------------------------------------------------------------------
def test_official_pth_file_and_ckpt_dir(tmp_path, vae):
    torch.save(_sd(vae), tmp_path / "Wan2.1_VAE.pth")  # a flat state dict, as released
    loaded = WanVAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth")
    _same(loaded, vae)
    assert loaded.config == vae.config and loaded.preset_names == ("debug",)  # matched by shapes
    _same(WanVAE.from_pretrained(tmp_path), vae)  # the official --ckpt_dir holds the .pth


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_save_pretrained_round_trip(tmp_path, vae, layout):
    custom = WanVAE(vae.config.replace(latents_mean=(0.1, 0.2, 0.3, 0.4)))
    custom.load_state_dict(vae.state_dict())
    custom.save_pretrained(tmp_path / "vae", layout=layout)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == ("WanVAE" if layout == "official" else "AutoencoderKLWan")
    loaded = WanVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == custom.config  # statistics come back from config.json
    _same(loaded, custom)
    _same(WanVAE.from_pretrained(tmp_path), custom)  # a pipeline dir: its vae/ subfolder
    _same(WanVAE.from_pretrained(tmp_path / "vae" / vc.WEIGHTS_NAME), custom)


def test_save_pretrained_dtype(tmp_path, vae):
    vae.save_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = WanVAE.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert WanVAE.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_comfy_files(tmp_path, vae):
    save_file(_sd(vae), tmp_path / "wan_2.1_vae.safetensors")  # ComfyUI's VAE file: official names
    _same(WanVAE.from_pretrained(tmp_path / "wan_2.1_vae.safetensors"), vae)
    prefixed = {vc.COMFY_PREFIX + k: v for k, v in _sd(vae).items()}  # all-in-one checkpoints
    save_file(prefixed, tmp_path / "all_in_one.safetensors")
    _same(WanVAE.from_pretrained(tmp_path / "all_in_one.safetensors"), vae)


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfy"])
def test_layout_adapters_round_trip(vae, layout):
    sd = vae.state_dict()
    renamed = vc.from_official(sd, layout)
    assert vc.detect_vae_layout(renamed) == layout
    back = vc.to_official(renamed, layout)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_full_size_config_is_read_from_shapes():
    with torch.device("meta"):
        full = WanVAE.from_preset("wan2.1-vae").state_dict()
        custom = WanVAE.from_preset("wan2.1-vae", dim=8, num_res_blocks=1, temperal_downsample=(True, False, True))
        custom_sd = custom.state_dict()
    assert vc.infer_vae_config(full) is get_vae_preset("wan2.1-vae")
    assert vc.infer_vae_config(custom_sd) == custom.config  # z_dim 16: Wan-2.1 statistics
    assert vc.infer_vae_config(vae_diffusers.to_official(vae_diffusers.from_official(custom_sd))) == custom.config


# ---- errors ----------------------------------------------------------------------------------
def test_missing_and_misshaped_keys_are_listed_with_layout_and_closest_preset(tmp_path, vae):
    sd = vae_diffusers.from_official(_sd(vae))
    sd.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    sd["encoder.conv_in.bias"] = torch.zeros(3)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        WanVAE.from_pretrained(tmp_path / "broken.safetensors", preset="debug")
    msg = str(err.value)
    assert "diffusers layout" in msg and "preset debug" in msg
    assert "1 missing key(s):\n    decoder.upsamples.4.shortcut.weight" in msg  # named in the official layout
    assert "encoder.conv1.bias: file (3,) vs model (8,)" in msg
    assert "closest preset: debug" in msg


def test_wrong_preset_names_the_one_that_fits(tmp_path, vae):
    torch.save(_sd(vae), tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match=r"(?s)preset wan2.1-vae.*mis-shaped.*closest preset: debug"):
        WanVAE.from_pretrained(tmp_path / "vae.pth", preset="wan2.1-vae")


def test_missing_paths_say_where_they_looked(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        WanVAE.from_pretrained(tmp_path / "nope.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"looked for diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth.*notes"):
        WanVAE.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.txt'"):
        WanVAE.from_pretrained(tmp_path / "notes.txt")


def test_a_dit_checkpoint_is_named_as_such(tmp_path):
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="Wan DiT"):
        WanVAE.from_pretrained(tmp_path / "dit.safetensors")
    (tmp_path / "transformer").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "transformer" / vc.WEIGHTS_NAME)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(CheckpointError, match="not a Wan VAE config"):
        WanVAE.from_pretrained(tmp_path / "transformer")


def test_wan22_config_is_refused(tmp_path, vae):
    vae.save_pretrained(tmp_path, layout="diffusers")
    config = json.loads((tmp_path / "config.json").read_text()) | {"is_residual": True, "z_dim": 48}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Wan-2.2"):
        WanVAE.from_pretrained(tmp_path)


def test_non_16_channel_weights_without_config_need_a_preset(tmp_path):
    custom = WanVAE.from_preset("debug", num_res_blocks=1)  # 4 latent channels, fits no preset
    torch.save(_sd(custom), tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="4-channel VAE without a config.json has no latent mean/std; pass preset="):
        WanVAE.from_pretrained(tmp_path / "vae.pth")
    custom.save_pretrained(tmp_path / "with_config")
    assert WanVAE.from_pretrained(tmp_path / "with_config").config == custom.config
