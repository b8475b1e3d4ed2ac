"""Parity with diffusers' AutoencoderKLWan (test-only dependency): key names against diffusers'
own converter, and encode/decode outputs on tiny random configs in fp32 (max abs diff <= 1e-4)
with the weights moved through our diffusers adapter or through save_pretrained.

Normalisation on the diffusers side is written as its Wan pipelines do it:
latents = (mean - latents_mean) * (1 / latents_std); decode(latents / (1 / latents_std) + latents_mean).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from dcvg_wan import WanVAE, WanVAEConfig
from dcvg_wan.layouts import vae_diffusers
from tests.dcvg_wan.test_vae import make_vae

TOL = 1e-4

CASES = {
    "debug": {},
    "one-res-block": {"num_res_blocks": 1},  # other flat decoder indices -> up_blocks grouping
    "time-down-early": {"temperal_downsample": (True, True, False)},  # the official class default
    "three-stages": {"dim_mult": (1, 2, 2), "temperal_downsample": (False, True)},  # f4t2
}


def diffusers_twin(cfg: WanVAEConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=cfg.dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
        scale_factor_spatial=cfg.spatial_compression,
        scale_factor_temporal=cfg.temporal_compression,
    ).eval()


def diffusers_stats(ref: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, inv_std


def assert_parity(ours: WanVAE, ref: AutoencoderKLWan, frames: int, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, frames, *size, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    mean, inv_std = diffusers_stats(ref)
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        mu, logvar = ours.encode_moments(x)
        assert (mu - posterior.mode()).abs().max() <= TOL
        assert (logvar - posterior.logvar).abs().max() <= TOL
        z_ref = (posterior.mode() - mean) * inv_std
        z = ours.encode(x)
        assert z.shape == z_ref.shape
        assert (z - z_ref).abs().max() <= TOL
        out_ref = ref.decode(z_ref / inv_std + mean).sample
        out = ours.decode(z_ref)
        assert out.shape == out_ref.shape == x.shape
        assert (out - out_ref).abs().max() <= TOL


# ---- key names -----------------------------------------------------------------------------
def test_full_size_adapter_agrees_with_diffusers_converter_and_model():
    with torch.device("meta"):
        ours = WanVAE.from_preset("wan2.1-vae").state_dict()
        ref = AutoencoderKLWan().state_dict()  # diffusers' defaults are the Wan-2.1 VAE
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    converted = vae_diffusers.from_official(shapes)
    assert converted == convert_wan_vae_to_diffusers(shapes)  # diffusers' single-file converter
    assert converted == {k: tuple(v.shape) for k, v in ref.items()}
    assert list(vae_diffusers.to_official(converted)) == list(shapes)  # exact round trip, order kept


@pytest.mark.parametrize("case", CASES)
def test_adapter_round_trip_on_debug_configs(case):
    with torch.device("meta"):
        ours = WanVAE.from_preset("debug", **CASES[case])
        ref = diffusers_twin(ours.config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    converted = vae_diffusers.from_official(shapes)
    assert converted == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert vae_diffusers.to_official(converted) == shapes


# ---- numbers -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_encode_decode_match_diffusers(case):
    ours = make_vae(seed=1, **CASES[case])
    ref = diffusers_twin(ours.config)
    ref.load_state_dict(vae_diffusers.from_official(ours.state_dict()), strict=True)
    tc = ours.temporal_compression
    assert_parity(ours, ref, frames=1 + 2 * tc, size=(16, 24))
    if case == "debug":
        assert_parity(ours, ref, frames=1, size=(16, 16))  # an image
        assert_parity(ours, ref, frames=9, size=(32, 16))


def test_save_pretrained_diffusers_dir_loads_in_diffusers_and_back(tmp_path):
    ours = make_vae(seed=2)
    ours.save_pretrained(tmp_path / "vae", layout="diffusers")
    ref = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    assert ref.config.base_dim == 8 and list(ref.config.latents_std) == list(ours.config.latents_std)
    assert_parity(ours, ref, frames=5, size=(16, 16))
    ref.save_pretrained(tmp_path / "from_diffusers")  # diffusers writes its own directory
    back = WanVAE.from_pretrained(tmp_path / "from_diffusers")
    assert back.config == ours.config
    sa, sb = ours.state_dict(), back.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- spatial tiling ------------------------------------------------------------------------
@pytest.mark.parametrize("tiles", [(32, 32, 24, 24), (32, 48, 16, 40)], ids=["square", "uneven"])
def test_tiled_encode_decode_match_diffusers_tiling(tiles):
    """enable_tiling on both sides (small tiles so a 40x72 frame is a grid with ragged edges):
    the moments and the decoded video equal diffusers' tiled_encode / tiled_decode."""
    ours = make_vae(seed=3)
    ref = diffusers_twin(ours.config)
    ref.load_state_dict(vae_diffusers.from_official(ours.state_dict()), strict=True)
    ours.enable_tiling(*tiles)
    ref.enable_tiling(*tiles)
    x = torch.rand(1, 3, 5, 40, 72, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mean, inv_std = diffusers_stats(ref)
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        mu, logvar = ours.encode_moments(x)
        assert (mu - posterior.mode()).abs().max() <= TOL and (logvar - posterior.logvar).abs().max() <= TOL
        z = (posterior.mode() - mean) * inv_std
        out_ref = ref.decode(z / inv_std + mean).sample
        out = ours.decode(z)
        assert out.shape == out_ref.shape == x.shape
        assert (out - out_ref).abs().max() <= TOL
        ours.disable_tiling()
        untiled = ours.decode(z)
    assert (untiled - out).abs().max() > 1e-3  # tiling really happened (zero-padded tile borders differ)
