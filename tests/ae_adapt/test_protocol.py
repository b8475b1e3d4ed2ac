"""The protocol: the example DiT satisfies it, a model missing a member is named, and importing
ae_adapt pulls in no Wan or DC-AE-V code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ae_adapt import AdaptableDiT, ProtocolError, ShapeError, check_adaptable
from ae_adapt.example_dit import PRESETS, ExampleDiT
from ae_adapt.flow import add_noise, diffusion_loss, sample_sigma, shift_sigma


def test_import_does_not_pull_wan_or_dcae():
    code = (
        "import sys, ae_adapt, ae_adapt.stages, ae_adapt.cache, ae_adapt.example_dit; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dcvg_wan', 'dcae_v', 'dcvg_kernels')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_example_dit_satisfies_the_protocol():
    model = ExampleDiT(PRESETS["tiny"])
    assert isinstance(model, AdaptableDiT) and check_adaptable(model) is model
    x, t, ctx = torch.randn(2, 4, 3, 8, 6), torch.rand(2), torch.randn(2, 5, 16)
    assert model.token_grid(x.shape) == (3, 4, 3)
    out = model(x, t, ctx)
    assert out.shape == x.shape
    # get_patch_embedder is self-contained: a copy embeds like the model
    tokens, grid = model.patch_embed(x)
    copy_tokens, copy_grid = __import__("copy").deepcopy(model.get_patch_embedder())(x)
    assert grid == copy_grid and torch.equal(tokens, copy_tokens)
    model.replace_patch_embedder(12, (1, 1, 1))
    model.replace_output_head(12, (1, 1, 1))
    y = torch.randn(2, 12, 3, 4, 3)
    assert model.token_grid(y.shape) == (3, 4, 3) and model(y, t, ctx).shape == y.shape
    with pytest.raises(ShapeError, match="takes 12 channels"):
        model.patch_embed(x)


def test_example_dit_tokens_are_frame_patches_through_a_linear():
    model = ExampleDiT(PRESETS["tiny"])
    x = torch.randn(1, 4, 2, 4, 4)
    tokens, _grid = model.patch_embed(x)
    patch = x[0, :, 1, 2:4, 0:2].reshape(-1)  # frame 1, patch row 1, col 0, laid out (c, ph, pw)
    torch.testing.assert_close(tokens[0, 1 * 4 + 2 + 0], model.x_embedder.proj(patch))
    with pytest.raises(ShapeError, match="cannot be tiled"):
        model.token_grid((1, 4, 2, 5, 4))


class _NoHead(nn.Module):
    def token_grid(self, s):
        return tuple(s[-3:])

    def patch_embed(self, x):
        return x, ()

    def forward_from_embeddings(self, tokens, grid, t, **cond):
        return tokens

    def get_patch_embedder(self):
        return self

    def replace_patch_embedder(self, c, p):
        return self

    def flow_target(self, x0, noise):
        return noise - x0

    flow_timestep = flow_target


def test_a_model_missing_members_is_named():
    with pytest.raises(ProtocolError, match=r"_NoHead .* missing get_output_head, replace_output_head"):
        check_adaptable(_NoHead())
    with pytest.raises(ProtocolError, match="must be a torch.nn.Module"):
        check_adaptable(object())


def test_flow_matching_closed_forms():
    assert torch.equal(shift_sigma(torch.tensor([0.0, 0.5, 1.0]), 1.0), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(shift_sigma(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))  # 1.5 / 2
    x0, noise = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    xt = add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    s = sample_sigma(1000, torch.Generator().manual_seed(0), shift=5.0)
    assert 0 < s.min() and s.max() < 1 and s.mean() > 0.7  # shift > 1 moves mass to high noise


def test_diffusion_loss_is_mse_to_noise_minus_x0():
    model = ExampleDiT(PRESETS["tiny"])
    x0, ctx = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 3, 16)
    loss = diffusion_loss(model, x0, torch.Generator().manual_seed(3), context=ctx)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(2, generator=g)
    xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    expected = ((model(xt, sigma, ctx) - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
