"""LoRA through peft: peft-format save/load, merge, and the ComfyUI/kohya export reloading to the
same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from ae_adapt import AdaptError, lora_io
from ae_adapt.example_dit import PRESETS, ExampleDiT

TARGETS = ("qkv", "proj", "cross_q", "cross_kv", "fc1", "fc2")


def _adapted(seed=0):
    """A model with new ends and a LoRA whose B is non-zero (as after training)."""
    torch.manual_seed(seed)
    model = ExampleDiT(PRESETS["tiny"])
    model.replace_patch_embedder(8, (1, 1, 1))
    model.replace_output_head(8, (1, 1, 1))
    base = copy.deepcopy(model)
    lora_io.add_lora(model, rank=4, alpha=8, target_modules=TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return base.eval(), model.eval()


def _out(model):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 8, 2, 4, 4, generator=g), torch.randn(2, 3, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.2, 0.9]), ctx)


def test_no_lora_on_embedder_or_head_even_if_a_target_matches():
    _, model = _adapted()
    assert "x_embedder.proj" not in lora_io.lora_layers(model)  # "proj" is a target
    assert len(lora_io.lora_layers(model)) == len(TARGETS) * len(model.blocks)


def test_peft_save_and_load_give_the_same_outputs(tmp_path):
    base, model = _adapted()
    lora_io.save_lora(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "embedder.safetensors",
        "head.safetensors",
    }
    fresh = copy.deepcopy(base)
    with torch.no_grad():  # the saved embedder/head must overwrite these
        fresh.get_output_head().linear.weight.zero_()
    lora_io.load_lora(fresh, tmp_path)
    torch.testing.assert_close(_out(fresh), _out(model), rtol=0, atol=0)
    assert not torch.allclose(_out(base), _out(model), atol=1e-3)


def test_merge_equals_unmerged():
    _, model = _adapted()
    expected = _out(model)
    lora_io.merge_lora(model)
    assert not lora_io.has_lora(model)
    torch.testing.assert_close(_out(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_exported_lora_reloads_to_the_same_outputs(fmt, tmp_path):
    base, model = _adapted()
    path = lora_io.save_export(model, tmp_path / "lora.safetensors", fmt)
    state = load_file(str(path))
    if fmt == "kohya":
        assert {
            "lora_unet_blocks_0_qkv.lora_down.weight",
            "lora_unet_blocks_0_qkv.lora_up.weight",
            "lora_unet_blocks_0_qkv.alpha",
        } <= state.keys()
        assert state["lora_unet_blocks_1_fc2.lora_down.weight"].shape == (4, 96)
    else:
        assert "diffusion_model.blocks.1.cross_kv.lora_B.weight" in state
    assert float(state[next(k for k in state if k.endswith(".alpha"))]) == 8.0
    changed = lora_io.apply_exported_lora(base, state)
    assert len(changed) == len(TARGETS) * 2
    torch.testing.assert_close(_out(base), _out(model), rtol=1e-5, atol=1e-5)


def test_exported_lora_with_unknown_layers_is_refused():
    base, model = _adapted()
    state = lora_io.export_lora(model, "kohya")
    state["lora_unet_blocks_9_qkv.lora_down.weight"] = torch.zeros(4, 48)
    with pytest.raises(AdaptError, match="blocks_9_qkv"):
        lora_io.apply_exported_lora(base, state)
    with pytest.raises(ValueError, match="kohya, comfy"):
        lora_io.export_lora(model, "a1111")


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_export_from_a_saved_adapter_alone_matches_the_model_export(fmt, tmp_path):
    _, model = _adapted()
    lora_io.save_lora(model, tmp_path)
    from_files = lora_io.convert_peft_adapter(tmp_path, fmt)
    from_model = lora_io.export_lora(model, fmt)
    assert from_files.keys() == from_model.keys()
    for k, v in from_model.items():
        assert torch.equal(from_files[k], v), k
