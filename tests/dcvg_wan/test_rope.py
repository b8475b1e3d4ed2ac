"""3D RoPE against the official formulation: complex float64 tables per axis (rope_params),
split by complex pairs, multiplied into the complex view of adjacent channel pairs."""

from __future__ import annotations

import pytest
import torch

from dcvg_wan import InputError
from dcvg_wan.rope import apply_rope, rope_cos_sin


def official_style_rope(x: torch.Tensor, grid, head_dim: int) -> torch.Tensor:
    """x [1, L, H, D]: the official computation re-derived (wan/modules/model.py rope_apply)."""

    def table(dim):  # rope_params(1024, dim)
        angles = torch.outer(torch.arange(1024), 1.0 / torch.pow(10000, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
        return torch.polar(torch.ones_like(angles), angles)

    d = head_dim
    freqs = torch.cat([table(d - 4 * (d // 6)), table(2 * (d // 6)), table(2 * (d // 6))], dim=1)
    c = d // 2
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    per_token = torch.cat(
        [ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
         fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x[0].to(torch.float64).reshape(f * h * w, x.shape[2], -1, 2))
    return torch.view_as_real(xc * per_token).flatten(2)[None].float()


@pytest.mark.parametrize(("grid", "head_dim"), [((3, 4, 5), 128), ((2, 3, 7), 16), ((5, 2, 2), 12), ((21, 6, 40), 128)])
def test_matches_official_formulation(grid, head_dim):
    torch.manual_seed(0)
    x = torch.randn(1, grid[0] * grid[1] * grid[2], 2, head_dim)
    ours = apply_rope(x, *rope_cos_sin(grid, head_dim))
    assert (ours - official_style_rope(x, grid, head_dim)).abs().max() < 1e-5


def test_position_zero_is_identity_and_norm_is_kept():
    x = torch.randn(1, 24, 2, 128)
    out = apply_rope(x, *rope_cos_sin((2, 3, 4), 128))
    assert torch.allclose(out[:, 0], x[:, 0])
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_more_than_1024_positions_per_axis_is_refused():
    with pytest.raises(InputError, match=r"token grid \(1, 1025, 4\) exceeds 1024 positions per axis"):
        rope_cos_sin((1, 1025, 4), 128)
