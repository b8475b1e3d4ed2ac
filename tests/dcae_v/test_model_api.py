"""The public `DCAEV` API: shapes, images, any-size reconstruct, dtypes, and clear input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dcae_v
from dcae_v import DCAEV


def _video(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


@torch.no_grad()
def test_encode_and_decode_shapes_for_a_batch(model):
    x = _video(2, 3, 8, 64, 32)
    z = model.encode(x)
    assert z.shape == (2, 8, 2, 2, 1) and z.dtype == torch.float32  # [B, c, T/4, H/f, W/f]
    y = model.decode(z)
    assert y.shape == (2, 3, 8, 64, 32) and y.dtype == torch.float32
    assert torch.allclose(model.encode(x[1:]), z[1:], atol=1e-5)  # batch items are independent


def test_facts_and_scaling_factor(model):
    assert model.scaling_factor == 1.0
    assert (model.spatial_compression, model.temporal_compression, model.latent_channels) == (32, 4, 8)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert DCAEV.from_preset("f32t4c32", device="meta").scaling_factor == pytest.approx(0.7241)
    assert DCAEV.from_preset("f64t4c128", device="meta").spatial_compression == 64
    assert DCAEV.from_preset("debug", scaling_factor=0.5).scaling_factor == 0.5
    assert isinstance(vars(DCAEV)["scaling_factor"], property)  # read from the config, not settable


@torch.no_grad()
def test_single_image_is_a_four_frame_still(model):
    image = _video(1, 3, 1, 32, 64)
    z = model.encode(image)
    assert z.shape == (1, 8, 1, 1, 2)
    assert torch.allclose(z, model.encode(image.repeat(1, 1, 4, 1, 1)), atol=1e-6)
    assert model.decode(z).shape == (1, 3, 4, 32, 64)
    y = model.reconstruct(image)
    assert y.shape == image.shape
    assert torch.isfinite(y).all()


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 3, 6, 40, 50), (2, 3, 10, 33, 31), (1, 3, 1, 20, 70)])
def test_reconstruct_any_size_returns_the_input_shape(model, shape):
    x = _video(*shape)
    y = model.reconstruct(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()


@torch.no_grad()
def test_reconstruct_equals_encode_decode_when_no_padding_is_needed(model):
    x = _video(1, 3, 8, 32, 32)
    assert torch.equal(model.reconstruct(x), model.decode(model.encode(x)))


@torch.no_grad()
def test_float64_model_accepts_float32_input(make_model):
    m32, m64 = make_model(), make_model().to(torch.float64)
    x = _video(1, 3, 8, 32, 32)
    z = m64.encode(x)
    assert z.dtype == torch.float64
    assert torch.allclose(z.float(), m32.encode(x), atol=1e-4)
    y = m64.decode(z.float())  # float32 latent on a float64 model
    assert y.dtype == torch.float64 and torch.allclose(y.float(), m32.decode(z.float()), atol=1e-4)
    assert m64.reconstruct(x).dtype == torch.float64


@torch.no_grad()
def test_bfloat16_model_accepts_float32_input(make_model):
    m = make_model().to(torch.bfloat16)
    z = m.encode(_video(1, 3, 4, 32, 32))
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()


# ---- bad input -----------------------------------------------------------------------------
def _nan() -> torch.Tensor:
    x = torch.zeros(1, 3, 8, 32, 32)
    x[0, 1, 2, 3, 4] = float("nan")
    return x


def _inf() -> torch.Tensor:
    x = torch.zeros(1, 3, 8, 32, 32)
    x[0, 0, 0, 0, 0] = float("inf")
    x[0, 2, 7, 31, 31] = -float("inf")
    return x


BAD_VIDEOS = {
    "numpy array": (lambda: np.zeros((1, 3, 8, 32, 32), np.float32), r"expected a video tensor \[B, 3, T, H, W\] as a torch\.Tensor, got ndarray"),
    "list": (lambda: [[0.0]], r"expected a video tensor .* as a torch\.Tensor, got list"),
    "4-D (no batch)": (lambda: torch.zeros(3, 8, 32, 32), r"expected a video tensor \[B, 3, T, H, W\], got shape \(3, 8, 32, 32\)"),
    "6-D": (lambda: torch.zeros(1, 1, 3, 8, 32, 32), r"expected a video tensor \[B, 3, T, H, W\], got shape \(1, 1, 3, 8, 32, 32\)"),
    "RGBA": (lambda: torch.zeros(1, 4, 8, 32, 32), r"\[B, 3, T, H, W\], got shape \(1, 4, 8, 32, 32\)"),
    "gray": (lambda: torch.zeros(1, 1, 8, 32, 32), r"\[B, 3, T, H, W\], got shape \(1, 1, 8, 32, 32\)"),
    "channels last": (lambda: torch.zeros(1, 8, 32, 32, 3), r"\[B, 3, T, H, W\], got shape \(1, 8, 32, 32, 3\)"),
    "uint8": (lambda: torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8), r"float pixels in \[-1, 1\], got dtype torch\.uint8; use dcae_v\.io\.to_model_range"),
    "T=6": (lambda: torch.zeros(1, 3, 6, 32, 32), r"frame count 6 is not a multiple of 4 \(or 1 for an image\); pad it .*reconstruct\(\)"),
    "T=0": (lambda: torch.zeros(1, 3, 0, 32, 32), r"the video has no frames"),
    "H=48": (lambda: torch.zeros(1, 3, 8, 48, 32), r"frame size 48x32 is not a \(non-zero\) multiple of the spatial compression 32; pad it"),
    "W=16 (< 32)": (lambda: torch.zeros(1, 3, 8, 32, 16), r"frame size 32x16 is not a \(non-zero\) multiple of the spatial compression 32"),
    "H=W=8 image": (lambda: torch.zeros(1, 3, 1, 8, 8), r"frame size 8x8 .*multiple of the spatial compression 32"),
    "NaN": (_nan, r"input video contains 1 NaN/Inf value\(s\)"),
    "Inf": (_inf, r"input video contains 2 NaN/Inf value\(s\)"),
}


@pytest.mark.parametrize("case", list(BAD_VIDEOS))
def test_bad_video_raises_input_error(model, case):
    make, match = BAD_VIDEOS[case]
    with pytest.raises(dcae_v.InputError, match=match):
        model.encode(make())


def test_input_error_is_a_value_error_and_a_dcaev_error(model):
    with pytest.raises(ValueError):
        model.encode(torch.zeros(1, 3, 6, 32, 32))
    assert issubclass(dcae_v.InputError, dcae_v.DCAEVError)


RECONSTRUCT_BAD = {
    **{k: BAD_VIDEOS[k] for k in ("numpy array", "list", "uint8", "RGBA", "NaN")},
    # odd sizes make reconstruct() pad before anything else looks at the input
    "numpy array, odd size": (lambda: np.zeros((1, 3, 6, 40, 50), np.float32), r"expected a video tensor .* as a torch\.Tensor, got ndarray"),
    "uint8, odd size": (lambda: torch.zeros(1, 3, 6, 40, 50, dtype=torch.uint8), r"float pixels in \[-1, 1\], got dtype torch\.uint8"),
}


@pytest.mark.parametrize("case", list(RECONSTRUCT_BAD))
def test_reconstruct_reports_bad_input_the_same_way(model, case):
    """reconstruct() pads first; bad input must still be an InputError, not a torch crash."""
    make, match = RECONSTRUCT_BAD[case]
    with pytest.raises(dcae_v.InputError, match=match):
        model.reconstruct(make())


@pytest.mark.parametrize("make", [lambda: torch.zeros(32, 32), lambda: torch.zeros(1, 3, 0, 32, 32)], ids=["2-D", "T=0"])
def test_reconstruct_rejects_empty_or_flat_tensors(model, make):
    with pytest.raises(dcae_v.InputError, match=r"video tensor \[B, (C|3), T, H, W\]"):
        model.reconstruct(make())


BAD_LATENTS = {
    "4 channels": (lambda: torch.zeros(1, 4, 2, 1, 1), r"latent has 4 channels but this f32t4c8 model decodes 8; was it encoded with another DC-AE-V preset\?"),
    "32 channels": (lambda: torch.zeros(1, 32, 2, 1, 1), r"latent has 32 channels .*decodes 8"),
    "4-D": (lambda: torch.zeros(1, 8, 2, 1), r"expected a latent tensor \[B, 8, T, H, W\], got shape \(1, 8, 2, 1\)"),
    "not a tensor": (lambda: np.zeros((1, 8, 2, 1, 1)), r"expected a latent tensor \[B, 8, T, H, W\] as a torch\.Tensor, got ndarray"),
    "empty": (lambda: torch.zeros(1, 8, 0, 1, 1), r"latent has an empty dimension: shape \(1, 8, 0, 1, 1\)"),
    "NaN": (lambda: torch.full((1, 8, 2, 1, 1), float("nan")), r"latent contains 16 NaN/Inf value\(s\)"),
}


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_bad_latent_raises_input_error(model, case):
    make, match = BAD_LATENTS[case]
    with pytest.raises(dcae_v.InputError, match=match):
        model.decode(make())


def test_wrong_latent_channels_name_the_presets():
    big = DCAEV.from_preset("f32t4c64", device="meta")
    with pytest.raises(dcae_v.InputError, match=r"latent has 32 channels but this f32t4c64 model decodes 64"):
        big.decode(torch.zeros(1, 32, 1, 1, 1, device="meta"))


def test_reconstruct_names_the_shape_it_was_given():
    """A channels-last tensor by mistake: the error shows the caller's shape, not the padded one."""
    from dcae_v import InputError

    model = DCAEV.from_preset("debug")
    with pytest.raises(InputError, match=r"got shape \(1, 8, 64, 64, 3\)"):
        model.reconstruct(torch.rand(1, 8, 64, 64, 3))
