"""Loss terms against closed forms and independent implementations; the video discriminator."""

import pytest
import torch
import torch.nn.functional as F

from dcae_v import metrics
from dcae_v.train import losses
from dcae_v.train.discriminator import VideoDiscriminator, minibatch_std


def test_pixel_loss_closed_form():
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 4, 8, 8), torch.randn(3, 3, 4, 8, 8)
    got = losses.pixel_loss(y, x, l1=0.5, mse=2.0)
    want = torch.stack([0.5 * (y[i] - x[i]).abs().mean() + 2.0 * (y[i] - x[i]).square().mean() for i in range(3)])
    torch.testing.assert_close(got, want)


def test_ssim_substitute_matches_metrics_ssim():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 24, 28)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    got = losses.ssim_frames(a, b)
    want = metrics.ssim_per_frame(a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1), data_range=1.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_perceptual_substitute_warns_and_is_not_zero():
    with pytest.warns(UserWarning, match="substitute 1 - SSIM"):
        p = losses.PerceptualLoss()
    x = torch.rand(2, 3, 2, 32, 32) * 2 - 1
    d = p(x.flip(-1), x)
    assert d.shape == (2,) and (d > 0.05).all()
    assert p(x, x).abs().max() < 1e-5


def test_perceptual_with_local_lpips_weights(tmp_path):
    torch.manual_seed(0)
    ref = metrics.LPIPS()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.uniform_(0, 0.1)
    sd = ref.state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "alex.pth")
    torch.save({f"lin{k}.model.1.weight": sd[f"heads.{k}.weight"] for k in range(5)}, tmp_path / "heads.pth")
    p = losses.PerceptualLoss(str(tmp_path / "alex.pth"), str(tmp_path / "heads.pth"))
    assert p.kind == "lpips"
    x, y = torch.rand(2, 3, 2, 32, 32) * 2 - 1, torch.rand(2, 3, 2, 32, 32) * 2 - 1
    want = torch.stack([ref(y[i].transpose(0, 1), x[i].transpose(0, 1)).mean() for i in range(2)])
    torch.testing.assert_close(p(y, x), want)
    y.requires_grad_(True)
    p(y, x).sum().backward()
    assert y.grad.abs().sum() > 0  # gradients reach the reconstruction


def test_gan_losses_closed_form():
    r, f = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.5])
    torch.testing.assert_close(losses.d_loss(r, f, "hinge"), torch.tensor([0.0, 0.5 + 1.3, 2.0 + 2.5]))
    torch.testing.assert_close(losses.g_loss(f, "hinge"), -f)
    torch.testing.assert_close(losses.d_loss(r, f, "non_saturating"), F.softplus(-r) + F.softplus(f))
    torch.testing.assert_close(losses.g_loss(f, "non_saturating"), F.softplus(-f))


def test_r1_penalty_linear_discriminator():
    w = torch.randn(3, 2, 4, 4)

    class Linear(torch.nn.Module):
        def forward(self, x):
            return (x * w).flatten(1).sum(1) ** 2 / 2  # grad_x = (w . x) w

    x = torch.randn(2, 3, 2, 4, 4)
    got = losses.r1_penalty(Linear(), x)
    s = (x * w).flatten(1).sum(1)
    torch.testing.assert_close(got, s**2 * w.square().sum())


def test_adaptive_weight_is_gradient_norm_ratio():
    last = torch.nn.Parameter(torch.randn(5))
    a, b = torch.randn(5), torch.randn(5)
    got = losses.adaptive_weight((last * a).sum(), (last * b).sum(), last, 1e4)
    torch.testing.assert_close(got, a.norm() / (b.norm() + 1e-4))
    assert losses.adaptive_weight((last * a).sum(), (last * b * 0).sum(), last, 7.0) == 7.0  # clamped


def test_scheduled_weight():
    assert losses.scheduled_weight(9, 0.5, start=10, ramp=4) == 0.0
    assert losses.scheduled_weight(10, 0.5, start=10, ramp=4) == 0.125
    assert losses.scheduled_weight(20, 0.5, start=10, ramp=4) == 0.5
    assert losses.scheduled_weight(10, 0.5, start=10, ramp=0) == 0.5


def test_minibatch_std_closed_form():
    x = torch.randn(4, 2, 1, 2, 2)
    y = minibatch_std(x, group=2)
    assert y.shape == (4, 3, 1, 2, 2)
    # groups pair sample i with i + 2 (StyleGAN2's reshape(G, -1, ...))
    want0 = ((x[0] - x[2]).abs() / 2).add(0).square().add(1e-8).sqrt().mean()
    torch.testing.assert_close(y[0, 2, 0, 0, 0], want0)
    torch.testing.assert_close(y[2, 2], y[0, 2])
    assert minibatch_std(x, group=3).shape == (4, 3, 1, 2, 2)  # falls back to a divisor (2)


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_discriminator_video_and_images(frames):
    torch.manual_seed(0)
    d = VideoDiscriminator(32, channels=8, max_channels=16, mbstd_group=2)
    x = torch.randn(4, 3, frames, 32, 32, requires_grad=True)
    out = d(x)
    assert out.shape == (4,) and torch.isfinite(out).all()
    r1 = losses.r1_penalty(d, x)
    r1.sum().backward()  # double backward through the whole net
    assert all(p.grad is not None for n, p in d.named_parameters() if n != "out.bias")  # the bias has no grad_x


def test_discriminator_non_power_of_two():
    d = VideoDiscriminator(96, channels=4, max_channels=8)
    assert d(torch.randn(2, 3, 4, 96, 96)).shape == (2,)
