"""The AE-Adapt-V stages on the tiny ExampleDiT: each test fails if the method is wrong."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ae_adapt import (
    AdaptError,
    ProtocolError,
    ShapeError,
    align_embedder,
    align_head,
    get_preset,
    lora_finetune,
    run_all,
)
from ae_adapt.example_dit import LORA_TARGETS
from ae_adapt.flow import diffusion_loss
from ae_adapt.lora_io import lora_layers
from ae_adapt.stages import PRESETS, EmbedderAlignTask, pool_tokens
from ae_adapt.trainer import TrainConfig

FAST = {"batch_size": 8, "progress": False}


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _eval_loss(model, samples, key="new"):
    g = torch.Generator().manual_seed(99)
    x0 = torch.stack([s[key] for s in samples])
    ctx = torch.stack([s["context"] for s in samples])
    with torch.no_grad():
        return sum(float(diffusion_loss(model, x0, g, context=ctx)) for _ in range(4)) / 4


def test_pool_tokens_is_the_mean_of_each_2x2_block():
    grid, target = (2, 4, 6), (2, 2, 3)
    tokens = torch.randn(3, 48, 5)
    x = tokens.reshape(3, *grid, 5)
    expected = x.reshape(3, 2, 2, 2, 3, 2, 5).mean(dim=(3, 5)).reshape(3, 12, 5)
    torch.testing.assert_close(pool_tokens(tokens, grid, target), expected)
    with pytest.raises(ShapeError, match="must not be finer"):
        pool_tokens(tokens, grid, (2, 8, 3))


def test_stage1_lowers_embedding_mse_and_changes_only_the_new_embedder(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    base_embedder = copy.deepcopy(model.get_patch_embedder())
    before = {k: v for k, v in _snapshot(model).items() if not k.startswith("x_embedder.")}
    cfg = TrainConfig(lr=1e-2, steps=30, **FAST)
    result = align_embedder(model, pairs, cfg, tmp_path, in_channels=8, patch=(1, 1, 1))
    # the loss is the MSE between the new tokens and the 2x2-pooled base tokens
    batch = {k: torch.stack([s[k] for s in pairs]) for k in ("base", "new")}
    with torch.no_grad():
        mse = float(EmbedderAlignTask(model, base_embedder)(batch))
        untrained = copy.deepcopy(base_dit)
        untrained.replace_patch_embedder(8, (1, 1, 1))
        mse0 = float(EmbedderAlignTask(untrained, base_embedder)(batch))
    assert mse < 0.25 * mse0, (mse, mse0)
    assert result.losses[-1] < 0.25 * result.losses[0]
    after = _snapshot(model)
    assert {k for k in after if k.startswith("x_embedder.")} == {"x_embedder.proj.weight", "x_embedder.proj.bias"}
    assert after["x_embedder.proj.weight"].shape == (48, 8)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert (tmp_path / "embedder.safetensors").is_file()


def test_stage2_leaves_every_block_parameter_bit_identical(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    align_embedder(model, pairs, TrainConfig(lr=1e-2, steps=5, **FAST), tmp_path / "1", in_channels=8, patch=(1, 1, 1))
    frozen = {k: v for k, v in _snapshot(model).items() if not k.startswith(("x_embedder.", "final_layer."))}
    embedder = _snapshot(model.get_patch_embedder())
    result = align_head(
        model, pairs, TrainConfig(lr=3e-3, steps=8, **FAST), tmp_path / "2", out_channels=8, patch=(1, 1, 1)
    )
    after = _snapshot(model)
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"{k} changed in stage 2"
    assert not torch.equal(after["x_embedder.proj.weight"], embedder["proj.weight"]), "embedder must train too"
    assert after["final_layer.linear.weight"].shape == (8, 48)
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]


def test_aligned_init_beats_random_init_after_the_same_steps(base_dit, twin_pairs, clip_world):
    """Fig. 11: the same stage-2 budget from an aligned embedder vs a random one (deterministic:
    fixed seeds, fixed evaluation noise; margin observed: 0.019 on each seed)."""
    held_out = clip_world.samples(16, start=1000, new=clip_world.twin_encode)
    for seed in (0, 1):
        cfg = TrainConfig(lr=1e-2, steps=30, seed=seed, **FAST)
        aligned = copy.deepcopy(base_dit)
        align_embedder(aligned, twin_pairs, cfg, _tmp(seed, "a1"), in_channels=16, patch=(1, 1, 1))
        align_head(aligned, twin_pairs, cfg, _tmp(seed, "a2"), out_channels=16, patch=(1, 1, 1))
        rand = copy.deepcopy(base_dit)
        torch.manual_seed(seed)
        rand.replace_patch_embedder(16, (1, 1, 1))
        align_head(rand, twin_pairs, cfg, _tmp(seed, "r2"), out_channels=16, patch=(1, 1, 1))
        la, lr = _eval_loss(aligned, held_out), _eval_loss(rand, held_out)
        assert la < lr - 0.005, (seed, la, lr)


def _tmp(seed, name):
    import tempfile

    return tempfile.mkdtemp(prefix=f"ae-adapt-{name}-{seed}-")


def test_plateau_stops_stage2_early(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    model.replace_patch_embedder(8, (1, 1, 1))
    cfg = TrainConfig(lr=1e-9, steps=50, plateau_patience=3, plateau_min_delta=0.05, **FAST)
    result = align_head(model, pairs, cfg, tmp_path, out_channels=8, patch=(1, 1, 1))
    assert result.stopped_on_plateau and result.step < 50


def test_lora_stage_trains_only_adapters_embedder_and_head(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    model.replace_patch_embedder(8, (1, 1, 1))
    model.replace_output_head(8, (1, 1, 1))
    before = _snapshot(model)
    targets = ("qkv", "proj", "fc1", "fc2")
    lora_finetune(
        model, pairs, TrainConfig(lr=1e-2, steps=4, **FAST), tmp_path, rank=4, alpha=8, target_modules=targets
    )
    assert len(lora_layers(model)) == 4 * len(model.blocks)  # x_embedder.proj is not a target
    after = _snapshot(model)
    plain = {k: k.replace(".base_layer", "") for k in after}
    changed = {k for k, v in after.items() if plain[k] not in before or not torch.equal(v, before[plain[k]])}
    assert changed, "nothing trained"
    for k in changed:
        assert "lora_" in k or k.startswith(("x_embedder.", "final_layer.")), f"{k} must stay frozen"
    assert any(k.startswith("x_embedder.") for k in changed) and any(k.startswith("final_layer.") for k in changed)
    assert any("lora_B" in k for k in changed)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_table8_is_the_default_preset():
    p = get_preset("wan-14B")
    assert (p.embedder.lr, p.embedder.batch_size, p.embedder.steps, p.embedder.warmup_steps) == (1e-4, 4, 20_000, 0)
    assert (p.head.lr, p.head.batch_size, p.head.steps) == (1e-4, 32, 3_000)
    assert PRESETS["wan-1.3B"].head.steps == 4_000 and PRESETS["wan-1.3B"].lora.steps == 20_000
    assert (p.lora.lr, p.lora.warmup_steps, p.lora.steps, p.lora.batch_size, p.lora.weight_decay) == (
        5e-5,
        1_000,
        6_000,
        32,
        1e-3,
    )
    assert p.embedder.betas == p.head.betas == p.lora.betas == (0.9, 0.999)
    assert (p.lora_rank, p.lora_alpha) == (256, 512)
    assert p.resolution == (("480px-720px", 1000), ("720px-1080px", 500), ("1080px-2160px", 200))
    assert get_preset("wan-14B", lora_rank=64).lora_rank == 64
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("wan-2B")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lora_rank = 1


def test_run_all_runs_every_stage_and_resumes_as_a_no_op(base_dit, pairs, tmp_path):
    preset = get_preset("debug", lora_targets=("qkv", "fc2"))
    model = copy.deepcopy(base_dit)
    assert run_all(
        model,
        pairs[:8],
        preset,
        tmp_path,
        in_channels=8,
        out_channels=8,
        patch=(1, 1, 1),
        resolution_data=[pairs[8:16]],
    )
    for sub in ("1-align-embedder", "2-align-head", "3-lora", "4-debug-up"):
        assert (tmp_path / sub / "checkpoint.pt").is_file() and (tmp_path / sub / "done.json").is_file(), sub
    again = copy.deepcopy(base_dit)
    assert run_all(
        again,
        pairs[:8],
        preset,
        tmp_path,
        in_channels=8,
        out_channels=8,
        patch=(1, 1, 1),
        resolution_data=[pairs[8:16]],
    )
    x = torch.stack([s["new"] for s in pairs[:2]])
    ctx = torch.stack([s["context"] for s in pairs[:2]])
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, ctx), model(x, t, ctx), rtol=0, atol=0)
    # without data for the resolution stage: said, not silently skipped
    with pytest.warns(UserWarning, match="resolution stage\\(s\\) debug-up will not run: resolution_data has 0 of the 1"):
        assert run_all(copy.deepcopy(base_dit), pairs[:8], preset, tmp_path, in_channels=8, out_channels=8,
                       patch=(1, 1, 1))


def test_run_all_checks_the_lora_targets_before_training_anything(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    model.lora_target_modules = None  # a model without the hook, and a preset without lora_targets
    with pytest.raises(ProtocolError, match="has no lora_target_modules"):
        run_all(model, pairs[:8], get_preset("debug"), tmp_path / "a", in_channels=8, out_channels=8, patch=(1, 1, 1))
    with pytest.raises(AdaptError, match="match no layer"):
        run_all(
            copy.deepcopy(base_dit),
            pairs[:8],
            get_preset("debug", lora_targets=("to_q",)),
            tmp_path / "b",
            in_channels=8,
            out_channels=8,
            patch=(1, 1, 1),
        )
    assert not list(tmp_path.iterdir()), "a stage ran before the LoRA targets were checked"


def test_run_all_with_example_dit_uses_its_own_lora_targets(base_dit, pairs, tmp_path):
    model = copy.deepcopy(base_dit)
    preset = get_preset("debug")
    assert preset.lora_targets is None
    assert run_all(
        model, pairs[:8], preset, tmp_path, in_channels=8, out_channels=8, patch=(1, 1, 1), resolution_data=[pairs[8:16]]
    )
    assert (tmp_path / "3-lora" / "done.json").is_file() and (tmp_path / "4-debug-up" / "done.json").is_file()
    assert set(lora_layers(model)) == {f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in LORA_TARGETS}
