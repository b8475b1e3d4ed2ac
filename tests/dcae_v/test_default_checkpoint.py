"""The checkpoint shipped inside dcae-v: small, f32t4 chunk-causal, loads with no path, and
reconstructs held-out clips better than non-learned compression to a coarser grid."""

import importlib.util
from pathlib import Path

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
    assert model.dtype == torch.float16  # stored in fp16; callers choose the compute dtype


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
