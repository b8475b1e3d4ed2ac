"""Presets on the meta device: tensor counts derived in wan21.md §3, parameter counts from a
closed-form count of the official modules, and the config's validation."""

from __future__ import annotations

import pytest
import torch

from dcvg_wan import PRESETS, WanConfig, WanModel, get_preset
from dcvg_wan.config import preset_names
from dcvg_wan.rope import axis_dims

TENSORS = {"t2v-1.3B": 825, "t2v-14B": 1095, "i2v-14B-480p": 1303, "i2v-14B-720p": 1303}


def closed_form_params(c: WanConfig) -> int:
    """Official WanModel parameters counted module by module (Linear = w + b)."""
    d, f, p = c.dim, c.ffn_dim, c.patch_volume
    lin = lambda i, o: i * o + o
    attn = 4 * lin(d, d) + 2 * d  # q k v o + RMSNorm q, k
    block = 2 * attn + 2 * d + lin(d, f) + lin(f, d) + 6 * d  # self, cross, norm3, ffn, modulation
    top = d * c.in_dim * p + d + lin(c.text_dim, d) + lin(d, d) + lin(c.freq_dim, d) + lin(d, d) + lin(d, 6 * d)
    top += lin(d, p * c.out_dim) + 2 * d  # head + its modulation
    if c.image_dim is not None:
        block += 2 * lin(d, d) + d  # k_img, v_img, norm_k_img
        top += 2 * c.image_dim + lin(c.image_dim, c.image_dim) + lin(c.image_dim, d) + 2 * d
        top += (c.flf_pos_len or 0) * c.image_dim  # FLF2V: img_emb.emb_pos
    return c.num_layers * block + top


def _meta(name: str) -> WanModel:
    with torch.device("meta"):
        return WanModel(get_preset(name))


@pytest.mark.parametrize("name", TENSORS)
def test_tensor_counts_match_the_official_layout(name):
    assert len(_meta(name).state_dict()) == TENSORS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(model.config)


def test_known_sizes():
    """Derived totals, pinned: 1.42 B for "1.3B", 14.29 B for T2V-14B, 16.39 B for I2V-14B."""
    counts = {n: closed_form_params(get_preset(n)) for n in ("t2v-1.3B", "t2v-14B", "i2v-14B-480p")}
    assert counts == {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584, "i2v-14B-480p": 16_394_878_784}


def test_preset_values():
    assert get_preset("t2v-1.3B").head_dim == get_preset("t2v-14B").head_dim == 128
    assert get_preset("i2v-14B-480p") == get_preset("i2v-14B-720p")
    assert preset_names(get_preset("i2v-14B-720p")) == ["i2v-14B-480p", "i2v-14B-720p"]
    dc_t2v, dc_i2v = get_preset("dcvg-t2v-14B"), get_preset("dcvg-i2v-14B")
    assert (dc_t2v.patch, dc_t2v.in_dim, dc_t2v.out_dim) == ((1, 1, 1), 32, 32)
    assert (dc_i2v.patch, dc_i2v.in_dim, dc_i2v.out_dim, dc_i2v.image_dim) == ((1, 1, 1), 68, 32, 1280)
    assert [get_preset(n).model_type for n in ("t2v-14B", "i2v-14B-480p")] == ["t2v", "i2v"]


def test_rope_split_rule_matches_official_pair_split():
    """Official rope_apply splits c = head_dim/2 pairs as [c - 2*(c//3), c//3, c//3]; its tables
    are built with d - 4*(d//6) and 2*(d//6) channels. Both agree with axis_dims for every even d."""
    for d in range(6, 258, 2):
        c = d // 2
        assert axis_dims(d) == (2 * (c - 2 * (c // 3)), 2 * (c // 3), 2 * (c // 3)) == (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


def test_rope_split_at_128():
    assert axis_dims(128) == (44, 42, 42)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_heads": 5}, "dim=32 is not divisible by num_heads=5"),
        ({"dim": 36, "num_heads": 9}, "head_dim=4 .* must be even and >= 6"),
        ({"patch": (1, 2)}, "patch must have 3 entries"),
        ({"freq_dim": 15}, "freq_dim must be even"),
        ({"flf_pos_len": 514}, "needs an image path"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_preset("debug-t2v", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown Wan preset 't2v-2B'; valid presets: t2v-1.3B, t2v-14B"):
        get_preset("t2v-2B")
    with pytest.raises(ValueError, match=r"unknown WanConfig field\(s\) \['hidden'\]"):
        get_preset("debug-t2v", hidden=3)


def test_config_dict_round_trip():
    cfg = get_preset("dcvg-i2v-14B")
    assert WanConfig.from_dict(cfg.to_dict()) == cfg
