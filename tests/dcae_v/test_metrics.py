"""dcae_v.metrics against independent implementations (scikit-image, scipy) and its error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dcae_v.errors import InputError
from dcae_v.metrics import (
    FVD,
    LPIPS,
    PSNR_CAP_DB,
    feature_stats,
    frechet_distance,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_per_frame,
)


def _pair(shape, seed, dtype):
    """A structured video and a noisy copy of it (uint8, or float in [0, 1])."""
    rng = np.random.default_rng(seed)
    t, h, w, _ = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([np.sin(6 * xx + k) * 0.4 + 0.5 * yy + 0.1 * c for k in range(t) for c in range(3)], -1)
    a = np.clip(base.reshape(h, w, t, 3).transpose(2, 0, 1, 3), 0, 1)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    if dtype == np.uint8:
        return (a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8)
    return a.astype(dtype), b.astype(dtype)


def _sk_ssim(a, b, data_range):
    return structural_similarity(
        a, b, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


SHAPES = [(2, 11, 11, 3), (3, 16, 24, 3), (2, 17, 13, 3), (1, 33, 40, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.float64, np.float32])
def test_psnr_and_ssim_match_skimage(shape, dtype):
    a, b = _pair(shape, seed=sum(shape), dtype=dtype)
    rng = 255 if dtype == np.uint8 else 1.0
    sk_psnr = [peak_signal_noise_ratio(x, y, data_range=rng) for x, y in zip(a, b)]
    sk_ssim = [_sk_ssim(x.astype(np.float64), y.astype(np.float64), rng) for x, y in zip(a, b)]
    tol = 1e-12 if dtype != np.float32 else 1e-6  # float32 inputs: skimage and we both widen to float64
    np.testing.assert_allclose(psnr_per_frame(a, b).numpy(), sk_psnr, rtol=tol)
    np.testing.assert_allclose(ssim_per_frame(torch.from_numpy(a), torch.from_numpy(b)).numpy(), sk_ssim, atol=tol)
    assert psnr(a, b) == pytest.approx(np.mean(sk_psnr), rel=tol)
    assert ssim(a, b) == pytest.approx(np.mean(sk_ssim), abs=tol)


def test_random_frames_and_data_range():
    rng = np.random.default_rng(7)
    a, b = rng.random((2, 20, 20, 3)) * 4, rng.random((2, 20, 20, 3)) * 4
    assert ssim(a, b, data_range=4.0) == pytest.approx(np.mean([_sk_ssim(x, y, 4.0) for x, y in zip(a, b)]), abs=1e-12)
    assert psnr(a, b, data_range=4.0) == pytest.approx(
        np.mean([peak_signal_noise_ratio(x, y, data_range=4.0) for x, y in zip(a, b)]), rel=1e-12
    )


def test_identical_frames():
    a, b = _pair((3, 12, 12, 3), seed=0, dtype=np.uint8)
    b[1] = a[1]
    per_frame = psnr_per_frame(a, b)
    assert math.isinf(per_frame[1]) and math.isfinite(per_frame[0])
    assert psnr(a, b) == pytest.approx((per_frame[0] + PSNR_CAP_DB + per_frame[2]).item() / 3)
    assert psnr(a, a) == PSNR_CAP_DB
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 15, 3), np.uint8), {}, "differ in shape"),
        (np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3)), {}, "differ in dtype"),
        (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8), {}, r"image\[None\]"),
        (np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.uint8), {"data_range": 1.0}, "255"),
        (np.full((1, 16, 16, 3), np.nan), np.zeros((1, 16, 16, 3)), {}, "NaN"),
        (np.zeros((1, 16, 16, 3), np.int64), np.zeros((1, 16, 16, 3), np.int64), {}, "uint8 or float"),
    ],
)
def test_bad_metric_input(a, b, kwargs, match):
    with pytest.raises(InputError, match=match):
        psnr(a, b, **kwargs)


def test_ssim_needs_the_window_size():
    a = np.zeros((1, 10, 32, 3), np.uint8)
    with pytest.raises(InputError, match="11x11"):
        ssim(a, a)
    assert psnr(a, a) == PSNR_CAP_DB  # PSNR has no size limit


# ---- FVD ---------------------------------------------------------------------------------------
def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real))


@pytest.mark.parametrize("n, d", [(50, 8), (200, 32), (10, 16)])  # (10, 16): rank-deficient covariances
def test_frechet_distance_matches_scipy(n, d):
    rng = np.random.default_rng(n + d)
    f1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    f2 = rng.normal(0.3, 1.2, size=(n, d)) @ rng.normal(size=(d, d))
    (mu1, s1), (mu2, s2) = feature_stats(torch.from_numpy(f1)), feature_stats(torch.from_numpy(f2))
    np.testing.assert_allclose(s1.numpy(), np.cov(f1, rowvar=False, bias=True), rtol=1e-10)
    expected = _scipy_frechet(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * float(s1.trace()))


def test_frechet_distance_rejects_mismatched_stats():
    with pytest.raises(InputError, match="shapes"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(InputError, match=r"N >= 2"):
        feature_stats(torch.zeros(1, 5))


class _FakeI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt; features = per-channel moments."""

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        x = x.float() / 127.5 - 1 if rescale else x.float()
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fvd_with_a_torchscript_detector(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_FakeI3D()).save(str(path))
    fvd = FVD.from_weights(path)
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (12, 4, 8, 8, 3), dtype=np.uint8))
    fake = torch.from_numpy(rng.integers(0, 128, (12, 4, 8, 8, 3), dtype=np.uint8))
    features = fvd.features(real, batch_size=5)
    assert features.shape == (12, 9) and features.dtype == torch.float64
    assert fvd.distance(real, real) == pytest.approx(0, abs=1e-9)
    assert fvd.distance(real, fake) > 0.1
    with pytest.raises(InputError, match=r"uint8 clips \[N, T, H, W, 3\]"):
        fvd.features(real.float())


def test_fvd_missing_or_bad_weights(tmp_path):
    with pytest.raises(InputError, match="i3d_torchscript.pt"):
        FVD.from_weights(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_text("not a model")
    with pytest.raises(InputError, match="not a TorchScript file"):
        FVD.from_weights(tmp_path / "bad.pt")


# ---- LPIPS -------------------------------------------------------------------------------------
ALEX = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


def _lpips_files(tmp_path, drop=None):
    """Random weights in torchvision's alexnet and lpips' alex.pth key layouts."""
    g = torch.Generator().manual_seed(0)
    backbone = {}
    for i, (cout, cin, k) in ALEX.items():
        backbone[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        backbone[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # present in the real file, unused
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c[0], 1, 1, generator=g) for k, c in enumerate(ALEX.values())}
    for sd in (backbone, heads):
        sd.pop(drop, None)
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    return tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth"


def _reference_lpips(backbone, heads, x0, x1):
    """LPIPS written out step by step, the way the lpips package computes it."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        h, out = (x - shift) / scale, []
        for n, (i, (_, _, k)) in enumerate(ALEX.items()):
            if n in (1, 2):
                h = torch.nn.functional.max_pool2d(h, kernel_size=3, stride=2)
            weight, bias = backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"]
            pad = {11: 2, 5: 2, 3: 1}[k]
            h = torch.relu(torch.nn.functional.conv2d(h, weight, bias, stride=4 if i == 0 else 1, padding=pad))
            out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x0), feats(x1))):
        na = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        nb = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        total = total + torch.nn.functional.conv2d((na - nb) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=(2, 3))
    return total.flatten()


def test_lpips_with_random_weights(tmp_path):
    backbone_path, heads_path = _lpips_files(tmp_path)
    model = LPIPS.from_weights(backbone_path, heads_path)
    a, b = _pair((3, 40, 36, 3), seed=1, dtype=np.uint8)
    per_frame = model.per_frame(a, b)
    assert per_frame.shape == (3,) and (per_frame > 0).all()
    assert model.per_frame(a, a).abs().max() < 1e-6
    x0 = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    x1 = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    backbone, heads = torch.load(backbone_path), torch.load(heads_path)
    torch.testing.assert_close(per_frame, _reference_lpips(backbone, heads, x0, x1), rtol=1e-4, atol=1e-6)
    assert model.mean(a, b) == pytest.approx(per_frame.mean().item())
    as_float = model.mean(a.astype(np.float32) / 255, b.astype(np.float32) / 255)
    assert as_float == pytest.approx(per_frame.mean().item(), rel=1e-5)


def test_lpips_load_errors(tmp_path):
    with pytest.raises(InputError, match=r"not found.*alexnet-owt-7be5be79\.pth.*alex\.pth"):
        LPIPS.from_weights(tmp_path / "nope.pth", tmp_path / "alex.pth")
    backbone_path, heads_path = _lpips_files(tmp_path, drop="lin3.model.1.weight")
    with pytest.raises(InputError, match=r"lin3\.model\.1\.weight"):
        LPIPS.from_weights(backbone_path, heads_path)
    backbone_path, heads_path = _lpips_files(tmp_path, drop="features.8.bias")
    with pytest.raises(InputError, match=r"features\.8\.bias"):
        LPIPS.from_weights(backbone_path, heads_path)
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(InputError, match="cannot read weights"):
        LPIPS.from_weights(tmp_path / "junk.pth", heads_path)
    with pytest.raises(InputError, match=r"features\.0\.weight.*lin0"):  # swapped files: every key is missing
        LPIPS.from_weights(heads_path, backbone_path)


def test_lpips_rejects_small_frames(tmp_path):
    model = LPIPS.from_weights(*_lpips_files(tmp_path))
    a = np.zeros((1, 24, 40, 3), np.uint8)
    with pytest.raises(InputError, match="31x31"):
        model.per_frame(a, a)
