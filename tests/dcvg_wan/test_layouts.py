"""State-dict adapters: exact round trips, per-layout key sets (against diffusers' own module at
debug size and at full size on the meta device), layout detection and its errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dcvg_wan import CheckpointError, WanModel, get_preset
from dcvg_wan.config_json import diffusers_config_json
from dcvg_wan.layouts import LAYOUTS, detect_layout, from_official, to_official

DEBUG = ["debug-t2v", "debug-i2v"]


def _diffusers_meta(cfg) -> WanTransformer3DModel:
    kwargs = {k: v for k, v in diffusers_config_json(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        return WanTransformer3DModel(**kwargs)


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", DEBUG)
@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_round_trip_is_exact(name, layout, new_model):
    sd = new_model(name).state_dict()
    there = from_official(sd, layout)
    assert len(there) == len(sd) and list(there) != list(sd)
    back = to_official(there, layout)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)  # renaming only: the very same tensors
    assert from_official(back, layout) == there


def test_diffusers_to_comfy_through_official(new_model):
    sd = new_model("debug-i2v").state_dict()
    comfy = from_official(to_official(from_official(sd, "diffusers"), "diffusers"), "comfy")
    assert to_official(comfy, "comfy") == sd
    assert all(k.startswith("model.diffusion_model.") for k in comfy)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("debug-t2v", {}), ("debug-t2v", {"cross_attn_norm": False}), ("debug-i2v", {}), ("debug-i2v", {"flf_pos_len": 514})],
)
def test_diffusers_key_set_and_shapes_match_diffusers_module(name, overrides):
    cfg = get_preset(name, **overrides)
    with torch.device("meta"):
        ours = from_official(WanModel(cfg).state_dict(), "diffusers")
    assert _shapes(ours) == _shapes(_diffusers_meta(cfg).state_dict())


@pytest.mark.parametrize("name", ["t2v-1.3B", "i2v-14B-480p", "dcvg-i2v-14B"])
def test_full_size_key_sets_match_diffusers_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        ours = WanModel(cfg).state_dict()
    theirs = _diffusers_meta(cfg).state_dict()
    assert _shapes(from_official(ours, "diffusers")) == _shapes(theirs)
    assert _shapes(to_official(theirs, "diffusers")) == _shapes(ours)


def test_norm3_is_diffusers_norm2(new_model):
    """The affine LayerNorm before cross-attention changes name (wan21.md pitfall 1)."""
    sd = new_model("debug-t2v").state_dict()
    d = from_official(sd, "diffusers")
    assert d["blocks.1.norm2.weight"] is sd["blocks.1.norm3.weight"]
    assert not any(".norm3." in k for k in d)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_detect_layout(layout, new_model):
    assert detect_layout(from_official(new_model("debug-i2v").state_dict(), layout)) == layout


def test_detect_layout_errors():
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*encoder\.conv1\.weight"):
        detect_layout(["encoder.conv1.weight", "decoder.conv1.weight"])
    with pytest.raises(CheckpointError, match="mixes official and diffusers"):
        detect_layout(["head.modulation", "condition_embedder.time_proj.weight"])
    with pytest.raises(CheckpointError, match="VACE is not supported"):
        detect_layout(["head.modulation", "vace_blocks.0.after_proj.bias"])
    with pytest.raises(ValueError, match="unknown layout 'kohya'; valid: official, diffusers, comfy"):
        to_official({}, "kohya")


def test_unknown_keys_pass_through_for_the_loader_to_report():
    assert to_official({"condition_embedder.extra.weight": 1}, "diffusers") == {"condition_embedder.extra.weight": 1}
