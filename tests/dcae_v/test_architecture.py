"""The architecture is checkpoint-exact: keys, shapes, order and parameter counts of every
released preset equal NVIDIA's (manifests derived from the public reference code)."""

import json
from pathlib import Path

import pytest
import torch

from dcae_v import DCAEV, PRESETS, DCAEVConfig, get_preset

MANIFESTS = Path(__file__).parent / "manifests"
RELEASED = ["f32t4c32", "f32t4c64", "f32t4c128", "f32t4c256", "f64t4c128"]


@pytest.mark.parametrize("preset", RELEASED)
def test_state_dict_matches_nvidia_manifest(preset):
    manifest = json.loads((MANIFESTS / f"dcaev_{preset}_manifest.json").read_text())
    model = DCAEV.from_preset(preset, device="meta")
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == [[k, shape] for k, shape, _ in manifest["keys"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert sum(p.numel() for p in model.encoder.parameters()) == manifest["encoder"]["num_params"]
    assert sum(p.numel() for p in model.decoder.parameters()) == manifest["decoder"]["num_params"]
    assert list(model.buffers()) == []


@pytest.mark.parametrize("preset", RELEASED)
def test_preset_facts(preset):
    manifest = json.loads((MANIFESTS / f"dcaev_{preset}_manifest.json").read_text())
    cfg = get_preset(preset)
    facts = manifest["facts"]
    assert cfg.latent_channels == facts["latent_channels"]
    assert cfg.spatial_compression == facts["spatial_compression"]
    assert cfg.temporal_compression == facts["temporal_compression"]
    assert list(cfg.widths) == facts["width_list"] and list(cfg.depths) == facts["depth_list"]
    assert cfg.chunk_size == facts["chunk_frames_input"] and cfg.latent_chunk_size == facts["chunk_frames_latent"]
    assert cfg.temporal == "chunk_causal"


def test_nvidia_names_are_aliases():
    assert get_preset("dc-ae-v-f32t4c32-1.0-bf16") is PRESETS["f32t4c32"]
    assert get_preset("dc-ae-v-1.0-f64t4c128") is PRESETS["f64t4c128"]


def test_full_size_f32t4c32_on_meta_and_param_count():
    model = DCAEV.from_preset("f32t4c32", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 2_138_635_436
    assert model.scaling_factor == pytest.approx(0.7241)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_overrides_and_unknown_names():
    cfg = get_preset("f32t4c32", temporal="causal", chunk_size=20)
    assert (cfg.temporal, cfg.chunk_size, cfg.latent_chunk_size) == ("causal", 20, 5)
    with pytest.raises(ValueError, match="unknown DC-AE-V preset 'f16'.*f32t4c32"):
        get_preset("f16")
    with pytest.raises(ValueError, match="unknown DCAEVConfig field"):
        get_preset("debug", chunk=8)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(chunk_size=42), "multiple of temporal_compression"),
        (dict(temporal="bidirectional"), "temporal must be one of"),
        (dict(widths=(16, 16, 16, 48, 32, 64, 64)), "do not fit a x4 resampling"),
        (dict(depths=(0, 1, 0, 1, 1, 1, 1)), "only leading stages may have depth 0"),
        (dict(depths=(0, 1, 1)), "one entry per stage"),
    ],
)
def test_invalid_configs_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_preset("debug", **overrides)


def test_config_json_round_trip():
    cfg = get_preset("debug", temporal="causal")
    assert DCAEVConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_output_has_no_activation():
    """The decoder head ends in a conv: outputs are unclamped (no tanh)."""
    torch.manual_seed(0)
    model = DCAEV.from_preset("debug")
    with torch.no_grad():
        model.decoder.project_out.op_list[2].conv.conv.bias.fill_(5.0)
        y = model.decode(torch.zeros(1, 8, 1, 1, 1))
    assert y.max() > 1.5
