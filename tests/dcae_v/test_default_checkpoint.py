"""The checkpoint shipped inside dcae-v: small, f32t4 chunk-causal, loads with no path, and
reconstructs held-out clips better than non-learned compression to a coarser grid."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcae_v import DCAEV
from dcae_v.checkpoint import DEFAULT_CHECKPOINT
from dcae_v.io import to_model_range, to_uint8
from dcae_v.metrics import psnr

ROOT = Path(__file__).resolve().parents[2]


def _world():
    spec = importlib.util.spec_from_file_location("clip_world", ROOT / "tools/world/clip_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_checkpoint_is_small_and_f32t4_chunk_causal():
    weights = DEFAULT_CHECKPOINT / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    model = DCAEV.from_pretrained()
    cfg = model.config
    assert (cfg.spatial_compression, cfg.temporal_compression, cfg.temporal) == (32, 4, "chunk_causal")
    assert 0 < model.scaling_factor < 10
    # stored in fp16 (half the file), loaded in fp32: in fp16 its activations overflow and the
    # decoded video is NaN, which is what `from_pretrained()` used to hand a new user on the CPU
    assert model.dtype == torch.float32
    x = torch.rand(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.isfinite(model.decode(model.encode(x))).all()
    assert DCAEV.from_pretrained(dtype=torch.float16).dtype == torch.float16  # on request


@torch.no_grad()
def test_default_checkpoint_beats_block_averaging_on_held_out_clips():
    """Held-out photos/seeds only (clip world split rule). The baseline keeps one colour per
    32x32x4 block and interpolates it back: any learned f32t4 model must do better."""
    world = _world()
    model = DCAEV.from_pretrained(dtype=torch.float32)
    ours, baseline = [], []
    for source, seed in [("photo_panzoom", 1_000_000_001), ("synth_shapes", 1_000_000_002), ("photo_pan", 1_000_000_003)]:
        clip = torch.from_numpy(world.make_clip(source, seed, 16, 128, 128))
        x = to_model_range(clip)
        ours.append(psnr(clip, to_uint8(model.reconstruct(x))))
        blocks = F.interpolate(F.avg_pool3d(x, (4, 32, 32)), scale_factor=(4, 32, 32), mode="trilinear")
        baseline.append(psnr(clip, to_uint8(blocks)))
    assert sum(ours) / 3 > sum(baseline) / 3 + 1.0, (ours, baseline)


def test_tiny_preset_is_the_shipped_default():
    """The preset named after the shipped checkpoint has its architecture and runtime fields, so a
    weights-only copy of it (e.g. NVIDIA's .pt layout) loads with chunks of 8 and its scaling."""
    from dcae_v.config import get_preset

    assert get_preset("tiny-f32t4c64") == DCAEV.from_pretrained().config


def test_dtype_by_name_and_diffusers_torch_dtype():
    """diffusers users write torch_dtype=, and names are common in configs: both are accepted;
    anything else is one clear error, not a TypeError from Module.to."""
    from dcae_v.errors import InputError

    assert DCAEV.from_pretrained(torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert DCAEV.from_pretrained(dtype="float16").dtype == torch.float16
    assert DCAEV.from_pretrained(dtype="bf16", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    for bad in ({"dtype": "int8"}, {"dtype": torch.float32, "torch_dtype": torch.float16}):
        with pytest.raises(InputError):
            DCAEV.from_pretrained(**bad)
