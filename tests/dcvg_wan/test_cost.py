"""Cost model: token counts by hand, FLOPs against torch's FlopCounterMode on tiny WanModels,
the DC-VideoGen config against the presets, and the `dcvg-wan cost` command."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dcvg_wan.model as wan_model
from dcvg_wan import PRESETS, get_preset
from dcvg_wan.cli import main
from dcvg_wan.cost import (
    CLIP_TOKENS,
    STANDARD_SIZES,
    cost_table,
    dcvg_config,
    format_table,
    forward_flops,
    latent_grid,
    parse_size,
    step_cost,
)
from dcvg_wan.errors import InputError


def naive_attention(q, k, v, backend="sdpa"):
    """softmax(QK^T/sqrt(d))V with plain matmuls, so FlopCounterMode sees them (it does not
    count CPU SDPA kernels)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


@pytest.mark.parametrize(
    "name,overrides,latent",
    [
        ("debug-t2v", {}, (3, 6, 10)),
        ("debug-t2v", {"patch": (1, 1, 1), "in_dim": 8, "out_dim": 8}, (2, 3, 5)),  # DC-style patch 1
        ("debug-i2v", {}, (2, 4, 6)),  # CLIP tokens + image k/v
    ],
)
def test_flops_match_flop_counter(name, overrides, latent, monkeypatch, new_model, inputs_for):
    model = new_model(name, **overrides)
    inputs = inputs_for(model, batch=1, latent=latent)
    with torch.no_grad():
        ref = model(**inputs)  # SDPA
        monkeypatch.setattr(wan_model, "attention", naive_attention)
        with FlopCounterMode(display=False) as counter:
            out = model(**inputs)
    assert torch.allclose(out, ref, atol=1e-4)  # the counted forward is the same computation
    predicted = forward_flops(model.config, latent)
    print(f"{name} {overrides}: counted {counter.get_total_flops():,}, predicted {sum(predicted.values()):,}")
    assert counter.get_total_flops() == sum(predicted.values())


def test_attention_part_closed_form():
    cfg = get_preset("debug-t2v")  # dim 32, 2 layers, text_len 16, patch (1,2,2)
    parts = forward_flops(cfg, (3, 6, 10))  # 3*3*5 = 45 tokens
    assert parts["self_attn"] == 2 * 4 * 45 * 45 * 32
    assert parts["cross_attn"] == 2 * 4 * 45 * 16 * 32


def test_dcvg_config_matches_the_presets():
    assert dcvg_config(PRESETS["t2v-14B"]) == PRESETS["dcvg-t2v-14B"]
    assert dcvg_config(PRESETS["i2v-14B-720p"]) == PRESETS["dcvg-i2v-14B"]
    small = dcvg_config(PRESETS["t2v-1.3B"])
    assert (small.patch, small.in_dim, small.out_dim, small.dim, small.num_layers) == ((1, 1, 1), 32, 32, 1536, 30)


def test_tokens_by_hand():
    """wan21.md: 832x480x81 -> 32 760 and 1280x720x81 -> 75 600 (Wan VAE); 720p/80 frames on
    DC-AE-V -> 20x22x40 = 17 600."""
    rows = {r.requested: r for r in cost_table("t2v-1.3B")}
    assert rows[(832, 480)].base.tokens == 21 * 30 * 52 == 32760
    assert rows[(832, 480)].dc.tokens == 20 * 15 * 26
    assert rows[(1280, 720)].base.tokens == 75600
    assert rows[(1280, 720)].dc.tokens == 17600 and rows[(1280, 720)].dc.size == (1280, 704)
    assert rows[(1920, 1080)].base.latent == (16, 21, 134, 240)  # 1080 -> 1072 rows (multiple of 16)
    assert rows[(3840, 2160)].dc.latent == (32, 20, 67, 120)


def test_ratios_grow_with_resolution_and_sit_next_to_the_paper():
    rows = cost_table("t2v-1.3B")
    flop_ratios = [r.flop_ratio for r in rows]
    assert flop_ratios == sorted(flop_ratios) and all(4 < x < 20 for x in flop_ratios)
    assert all(4.1 < r.token_ratio < 4.4 for r in rows)  # ~ (32/16)^2 spatial * 21/20 temporal
    assert [r.paper[2] for r in rows] == [6.2, 8.2, 11.2, 14.8]
    assert rows[-1].base.attention_share > 0.95  # 2160p: self-attention is nearly everything
    text = format_table(rows)
    assert "6.2x" in text and "14.8x" in text and "32,760" in text and "generates 1280x704" in text


def test_i2v_counts_clip_tokens():
    t2v = forward_flops(PRESETS["t2v-14B"], (21, 90, 160))
    i2v = forward_flops(PRESETS["i2v-14B-720p"], (21, 90, 160))
    tokens, d, n = 21 * 45 * 80, 5120, 40
    assert i2v["cross_attn"] - t2v["cross_attn"] == n * 4 * tokens * CLIP_TOKENS * d
    assert i2v["embed"] - t2v["embed"] == 2 * tokens * d * 4 * 20  # 20 more input channels x patch 4


def test_latent_grid_and_sizes():
    assert latent_grid("wan-vae", 832, 480, 81, (1, 2, 2)) == (21, 60, 104)
    assert latent_grid("dcae-v", 832, 480, 81, (1, 1, 1)) == (20, 15, 26)
    assert step_cost(get_preset("t2v-1.3B"), "wan-vae", 832, 480, 17).frames == 17
    assert parse_size("832*480") == (832, 480) and parse_size("720p") == STANDARD_SIZES["720p"]
    with pytest.raises(InputError, match="W\\*H"):
        parse_size("big")
    with pytest.raises(InputError, match="positive"):
        latent_grid("dcae-v", 16, 16, 0, (1, 1, 1))


@pytest.mark.parametrize("ae, patch", [("wan-vae", (1, 2, 2)), ("dcae-v", (1, 1, 1))])
@pytest.mark.parametrize("frames, width, height", [(81, 832, 480), (1, 16, 16), (3, 40, 33), (17, 1280, 720), (2, 8, 900)])
def test_latent_grid_is_what_the_pipelines_generate(ae, patch, frames, width, height):
    """`cost` counts the video `generate` makes: the pipelines' own rounding (latent_spaces) is the reference."""
    from types import SimpleNamespace

    from dcvg_wan.latent_spaces import DCAEVSpace, WanVAESpace
    from dcvg_wan.latent_spaces import LatentSpace as LatentSpaceBase

    model = SimpleNamespace(latent_channels=16 if ae == "wan-vae" else 32, config=SimpleNamespace(chunk_size=None))
    space = WanVAESpace.__new__(WanVAESpace) if ae == "wan-vae" else DCAEVSpace.__new__(DCAEVSpace)
    LatentSpaceBase.__init__(space, model, patch)
    r = space.round_size(frames, height, width)
    grid = latent_grid(ae, width, height, frames, patch)
    assert grid == (space.latent_frames(r.frames), r.height // space.spatial, r.width // space.spatial)
    assert step_cost(get_preset("t2v-1.3B" if ae == "wan-vae" else "dcvg-t2v-14B"), ae, width, height, frames).frames == r.frames
    with pytest.raises(InputError, match="unknown task 'x'.*t2v-1.3B"):
        cost_table("x")


def test_cli_cost(capsys):
    assert main(["cost", "--task", "t2v-1.3B", "--size", "832*480", "--frame_num", "81"]) == 0
    out = capsys.readouterr().out
    assert "832x480" in out and "32,760" in out and "6.2x" in out and "1280x720" not in out
    assert main(["cost"]) == 0
    assert "3840x2160" in capsys.readouterr().out


def test_cli_cost_bad_input_exit_code(capsys):
    assert main(["cost", "--task", "nope"]) == 3
    assert "unknown task 'nope'" in capsys.readouterr().err

