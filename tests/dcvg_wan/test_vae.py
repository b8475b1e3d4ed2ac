"""The Wan-2.1 VAE: presets and the official architecture (key manifest), shapes, causality and
the streaming cache, latent normalisation, and the errors for bad input.
Numerical parity with diffusers is in test_vae_parity.py, checkpoints in test_vae_checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcvg_wan import InputError, WanVAE, WanVAEConfig, get_vae_preset
from dcvg_wan.vae_config import VAE_PRESETS

MANIFEST = Path(__file__).parent / "manifests" / "wan21_vae_manifest.json"
# The 16 constants of the official WanVAE wrapper (wan/modules/vae.py), typed in independently.
OFFICIAL_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
OFFICIAL_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def make_vae(seed: int = 0, **overrides) -> WanVAE:
    """A debug VAE with every parameter random (gammas around 1, biases around 0, the zero-init
    attention projection too), so a dropped norm, bias or block changes the output."""
    torch.manual_seed(seed)
    vae = WanVAE.from_preset("debug", **overrides).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "proj.weight")):
                p.copy_(0.2 * torch.randn_like(p))
    return vae


def video(b: int = 1, t: int = 9, h: int = 16, w: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return make_vae()


# ---- presets and architecture --------------------------------------------------------------
def test_full_preset_is_the_official_config():
    cfg = get_vae_preset("wan2.1-vae")
    assert (cfg.dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
    assert cfg.temperal_downsample == (False, True, True)
    assert list(cfg.latents_mean) == OFFICIAL_MEAN and list(cfg.latents_std) == OFFICIAL_STD
    assert (cfg.spatial_compression, cfg.temporal_compression) == (8, 4)
    debug = get_vae_preset("debug")
    assert (debug.spatial_compression, debug.temporal_compression, debug.z_dim) == (8, 4, 4)


def test_full_size_meta_build_matches_the_official_key_manifest():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        vae = WanVAE.from_preset("wan2.1-vae")
    sd = vae.state_dict()
    assert list(sd) == list(manifest["keys"])  # names and order of Wan2.1_VAE.pth
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["keys"]
    assert sum(v.numel() for v in sd.values()) == manifest["num_params"] == 126_892_531
    assert sum(v.numel() for k, v in sd.items() if k.startswith("decoder.")) == manifest["decoder"]["num_params"]
    assert (vae.latent_channels, vae.spatial_compression, vae.temporal_compression) == (16, 8, 4)
    assert vae.preset_names == ("wan2.1-vae",)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"temperal_downsample": (False, True)}, "one entry per downsample"),
        ({"latents_mean": (0.0,) * 3}, "needs z_dim=4"),
        ({"latents_std": (1.0, 1.0, 0.0, 1.0)}, "must be positive"),
        ({"dim": 0}, "dim must be a positive"),
        ({"dim_mult": ()}, "dim_mult must be non-empty"),
        ({"nonsense": 1}, "unknown WanVAEConfig field"),
    ],
)
def test_invalid_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_vae_preset("debug", **overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="wan2.1-vae, debug"):
        WanVAE.from_preset("wan2.2-vae")


def test_config_dict_round_trip():
    for cfg in VAE_PRESETS.values():
        assert WanVAEConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ---- shapes, causality, streaming ------------------------------------------------------------
def test_encode_decode_shapes_and_range(vae):
    x = video(b=2)
    z = vae.encode(x)
    assert z.shape == (2, 4, 3, 2, 3) and z.dtype == torch.float32
    assert vae.latent_shape(9, 16, 24) == (4, 3, 2, 3)
    out = vae.decode(z)
    assert out.shape == (2, 3, 9, 16, 24) and out.dtype == torch.float32
    saturated = make_vae()
    saturated.decoder.head[2].bias.fill_(5.0)  # pre-clamp output > 1 everywhere
    assert torch.equal(saturated.decode(z), torch.ones_like(out))  # clamped like the official decode
    image = vae.encode(x[:, :, :1])
    assert image.shape == (2, 4, 1, 2, 3) and vae.decode(image).shape == (2, 3, 1, 16, 24)


def test_encoding_is_causal_and_exact_across_chunks(vae):
    """Latent frame k depends only on frames <= 4k, and a clip's prefix encodes like the clip's
    first latents: the feature cache carries exactly the history the one-shot conv would see."""
    x = video(t=13)
    z = vae.encode(x)
    assert torch.allclose(vae.encode(x[:, :, :5]), z[:, :, :2], atol=1e-5)
    changed = x.clone()
    changed[:, :, 9:] = -changed[:, :, 9:]
    z2 = vae.encode(changed)
    assert torch.equal(z2[:, :, :3], z[:, :, :3])
    assert (z2[:, :, 3] - z[:, :, 3]).abs().max() > 1e-4


def test_decoding_is_causal(vae):
    z = torch.randn(1, 4, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    full = vae.decode(z)
    assert full.shape[2] == 13
    assert torch.allclose(vae.decode(z[:, :, :2]), full[:, :, :5], atol=1e-5)
    later = z.clone()
    later[:, :, 3] += 1
    assert torch.allclose(vae.decode(later)[:, :, :9], full[:, :, :9], atol=1e-5)


def test_decode_frames_streams_with_constant_memory(vae):
    z = torch.randn(1, 4, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    pieces = list(vae.decode_frames(z))
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4, 4]
    assert torch.equal(torch.cat(pieces, 2), vae.decode(z))
    cache: dict = {}
    held = []
    for _ in vae._decode_frames(z, True, cache):
        held.append(sum(v.numel() for v in cache.values() if isinstance(v, torch.Tensor)))
    assert held[2] == held[3] == held[4]  # the state stops growing once every conv has 2 frames
    assert held[1] < z.shape[2] * pieces[1].numel() * 8  # and is not the decoded video


def test_batch_elements_are_independent(vae):
    x = video(b=2, t=5)
    z = vae.encode(x)
    assert torch.allclose(z[1:], vae.encode(x[1:]), atol=1e-5)
    assert torch.allclose(vae.decode(z)[:1], vae.decode(z[:1]), atol=1e-5)


# ---- normalisation ---------------------------------------------------------------------------
def test_latents_are_normalised_with_the_config_statistics(vae):
    x = video(t=5)
    mu, logvar = vae.encode_moments(x)
    assert mu.shape == logvar.shape == (1, 4, 2, 2, 3)
    assert torch.equal(vae.encode(x, normalize=False), mu)
    mean = torch.tensor(OFFICIAL_MEAN[:4]).view(1, 4, 1, 1, 1)
    std = torch.tensor(OFFICIAL_STD[:4]).view(1, 4, 1, 1, 1)
    assert torch.allclose(vae.encode(x), (mu - mean) / std, atol=1e-6)
    z = torch.randn(1, 4, 2, 2, 3)
    assert torch.allclose(vae.denormalize(z), z * std + mean, atol=1e-6)
    assert torch.allclose(vae.decode(z), vae.decode(z * std + mean, normalized=False), atol=1e-5)


def test_bf16_weights_return_float32_close_to_fp32(vae):
    x = video(t=5)
    half = make_vae().to(torch.bfloat16)
    z = half.encode(x)
    assert z.dtype == torch.float32 and half.decode(z).dtype == torch.float32
    assert (z - vae.encode(x)).abs().max() < 0.25


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 3, 8, 16, 16), r"1 \+ 4k frames .* got 8; use 5 or 9"),
        (torch.zeros(1, 3, 0, 16, 16), "got 0"),
        (torch.zeros(1, 3, 5, 12, 16), "multiples of 8"),
        (torch.zeros(1, 4, 5, 16, 16), r"\[B, 3, T, H, W\]"),
        (torch.zeros(3, 5, 16, 16), r"\[B, 3, T, H, W\]"),
        (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), "float pixels"),
        (torch.full((1, 3, 5, 16, 16), float("nan")), "NaN"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_video_raises_input_error(vae, x, match):
    with pytest.raises(InputError, match=match):
        vae.encode(x)


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.zeros(1, 16, 2, 2, 2), r"latent \[B, 4, T, H, W\], got shape \(1, 16"),
        (torch.zeros(1, 4, 2, 2), "got shape"),
        (torch.zeros(1, 4, 0, 2, 2), "empty"),
        (torch.full((1, 4, 2, 2, 2), float("inf")), "NaN/Inf"),
    ],
)
def test_bad_latent_raises_input_error(vae, z, match):
    with pytest.raises(InputError, match=match):
        vae.decode(z)


# ---- spatial tiling ------------------------------------------------------------------------
def test_tiled_decode_streams_and_equals_the_whole_tiled_decode(vae):
    """decode_frames with tiling yields per latent frame what decode returns at once, and small
    frames (not larger than a tile) are not tiled at all."""
    z = torch.randn(1, vae.latent_channels, 3, 5, 9, generator=torch.Generator().manual_seed(4))
    plain = vae.decode(z)
    small = z[..., :2, :2]  # 16 x 16 px: not larger than a tile
    small_plain = vae.decode(small)
    vae.enable_tiling(16, 16, 8, 8)
    try:
        whole = vae.decode(z)
        pieces = list(vae.decode_frames(z))
        assert [p.shape[2] for p in pieces] == [1, 4, 4]
        torch.testing.assert_close(torch.cat(pieces, 2), whole, atol=0, rtol=0)
        assert whole.shape == plain.shape and not torch.equal(whole, plain)
        torch.testing.assert_close(vae.decode(small), small_plain, atol=0, rtol=0)
    finally:
        vae.disable_tiling()


@pytest.mark.parametrize("tiles, match", [((12, 16, 8, 8), "multiple of 8"), ((16, 16, 24, 8), "must not exceed")])
def test_bad_tiles_raise_input_error(vae, tiles, match):
    with pytest.raises(InputError, match=match):
        vae.enable_tiling(*tiles)
    assert vae.tiling is None
