"""Building blocks against closed forms (channel order, residual-autoencoding shortcuts, norm)."""

import torch
import torch.nn.functional as F

from dcae_v.blocks import (
    AveragingShortcut,
    DuplicatingShortcut,
    RMSNorm3d,
    channel_to_space_time,
    space_time_to_channel,
)


def test_space_time_to_channel_index_formula():
    x = torch.randn(2, 3, 8, 6, 4)
    u = space_time_to_channel(x, 2, 4)
    assert u.shape == (2, 3 * 16, 2, 3, 2)
    for c, dt, dh, dw, t, i, j in [(0, 0, 0, 0, 0, 0, 0), (2, 3, 1, 0, 1, 2, 1), (1, 1, 0, 1, 0, 1, 0)]:
        assert u[1, c * 16 + dt * 4 + dh * 2 + dw, t, i, j] == x[1, c, t * 4 + dt, i * 2 + dh, j * 2 + dw]
    assert torch.equal(channel_to_space_time(u, 2, 4), x)


def test_averaging_shortcut_closed_forms():
    x = torch.randn(1, 8, 4, 6, 6)
    # G = 4, spatial 2: 2x2 average pooling per channel
    assert torch.allclose(AveragingShortcut(8, 8, 2, 1)(x), F.avg_pool3d(x, (1, 2, 2)), atol=1e-6)
    # G = 4, temporal 4: 4-frame average
    assert torch.allclose(AveragingShortcut(8, 8, 1, 4)(x), x.mean(dim=2, keepdim=True), atol=1e-6)
    # G = 2 (width doubles): short[o, i, j] = mean_dw x[o // 2, 2i + o % 2, 2j + dw]
    y = AveragingShortcut(8, 16, 2, 1)(x)
    for o, i, j in [(0, 0, 0), (5, 2, 1), (15, 1, 2)]:
        expect = (x[0, o // 2, :, 2 * i + o % 2, 2 * j] + x[0, o // 2, :, 2 * i + o % 2, 2 * j + 1]) / 2
        assert torch.allclose(y[0, o, :, i, j], expect, atol=1e-6)


def test_duplicating_shortcut_closed_forms():
    x = torch.randn(1, 8, 2, 3, 3)
    # R = 4, spatial 2: nearest 2x upsampling
    assert torch.equal(DuplicatingShortcut(8, 8, 2, 1)(x), F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    # R = 4, temporal 4: each frame repeated 4 times
    assert torch.equal(DuplicatingShortcut(8, 8, 1, 4)(x), x.repeat_interleave(4, dim=2))
    # R = 2 (width halves): out[k, 2i + dh, 2j + dw] = x[2k + dh, i, j]
    y = DuplicatingShortcut(8, 4, 2, 1)(x)
    for k, i, j, dh, dw in [(0, 0, 0, 0, 0), (3, 2, 1, 1, 0), (1, 1, 2, 1, 1)]:
        assert torch.equal(y[0, k, :, 2 * i + dh, 2 * j + dw], x[0, 2 * k + dh, :, i, j])


def test_rms_norm_formula():
    norm = RMSNorm3d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    ref = x / torch.sqrt((x**2).mean(1, keepdim=True) + 1e-5) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    assert torch.allclose(norm(x), ref, atol=1e-5)
    assert sorted(k for k, _ in norm.named_parameters()) == ["bias", "weight"]


def test_rms_norm_low_precision_op_order():
    """In bf16 the norm must round exactly like NVIDIA's formula (divide by sqrt, in the input dtype,
    then weight and bias), so bf16 outputs are bit-identical to theirs and not just close."""
    torch.manual_seed(0)
    norm = RMSNorm3d(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(2, 64, 3, 8, 8) * 3 + 1).to(torch.bfloat16)
    w, b = norm.weight.view(1, -1, 1, 1, 1), norm.bias.view(1, -1, 1, 1, 1)
    ref = x / torch.sqrt(x.square().mean(1, keepdim=True) + 1e-5) * w + b
    assert norm(x).dtype == torch.bfloat16
    assert torch.equal(norm(x), ref)
