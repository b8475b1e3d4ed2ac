"""LoRA through peft: peft-format save/load, merge, and the ComfyUI/kohya export reloading to the
same outputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ae_adapt import AdaptError, lora_finetune, lora_io
from ae_adapt.example_dit import PRESETS, ExampleDiT
from ae_adapt.trainer import TrainConfig

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


def test_load_lora_on_a_model_without_the_new_ends_names_the_fix(tmp_path):
    """The adapter belongs to the adapted model: on the base model (old embedder shapes) loading is
    refused with what to call first, and the model is left without a LoRA."""
    _, model = _adapted()
    lora_io.save_lora(model, tmp_path)
    torch.manual_seed(0)
    base = ExampleDiT(PRESETS["tiny"])
    with pytest.raises(AdaptError, match="replace_patch_embedder"):
        lora_io.load_lora(base, tmp_path)
    assert not lora_io.has_lora(base)


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


# ---- peft interop: save_lora writes what PeftModel.save_pretrained writes -----------------------
def _save_old_format(model, directory):
    """What save_lora wrote before it matched peft: keys without `base_model.model.`, the raw config."""
    directory.mkdir(parents=True)
    config = model.peft_config["default"]
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    lora_io.save_lora(model, directory / "ends")  # embedder/head files are unchanged
    for name in ("embedder.safetensors", "head.safetensors"):
        (directory / "ends" / name).rename(directory / name)


def _trained_adapter(base_dit, pairs, run_dir):
    """A LoRA stage run a few steps on the clip world; returns (base with the trained new ends)."""
    model = copy.deepcopy(base_dit)
    model.replace_patch_embedder(8, (1, 1, 1))
    model.replace_output_head(8, (1, 1, 1))
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4, progress=False)
    lora_finetune(model, pairs[:8], cfg, run_dir, rank=4, alpha=8)
    plain = copy.deepcopy(base_dit)
    plain.replace_patch_embedder(8, (1, 1, 1)).load_state_dict(load_file(str(run_dir / "adapter/embedder.safetensors")))
    plain.replace_output_head(8, (1, 1, 1)).load_state_dict(load_file(str(run_dir / "adapter/head.safetensors")))
    return model.eval(), plain.eval()


def test_peft_model_from_pretrained_loads_the_saved_adapter(base_dit, pairs, tmp_path):
    trained, plain = _trained_adapter(base_dit, pairs, tmp_path)
    adapter = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft only warns when it finds none of the adapter's keys
        peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), str(adapter)).eval()
    ours = copy.deepcopy(base_dit)
    ours.replace_patch_embedder(8, (1, 1, 1))  # new shapes, untrained: load_lora fills them in
    ours.replace_output_head(8, (1, 1, 1))
    ours = lora_io.load_lora(ours, adapter).eval()
    assert all(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)  # not peft's inference_mode
    torch.testing.assert_close(_out(peft_model), _out(ours), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(trained), rtol=0, atol=0)
    assert not torch.allclose(_out(plain), _out(ours), atol=1e-4)  # the LoRA is applied


def test_saved_adapter_is_what_peft_save_pretrained_writes(tmp_path):
    base, model = _adapted()
    lora_io.save_lora(model, tmp_path / "ours")
    PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).save_pretrained(str(tmp_path / "peft"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["task_type"] is None
    assert config["auto_mapping"] == {"base_model_class": "ExampleDiT", "parent_library": "ae_adapt.example_dit"}
    assert "base_model.model.blocks.0.cross_kv.lora_A.weight" in load_file(str(tmp_path / "ours/adapter_model.safetensors"))


def test_saved_adapter_records_the_models_name_or_path_as_peft_does(tmp_path):
    _, model = _adapted()
    model.name_or_path = "org/tiny-dit"
    lora_io.save_lora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-dit"


def test_load_lora_reads_adapters_written_without_the_peft_prefix(tmp_path):
    base, model = _adapted()
    _save_old_format(model, tmp_path / "old")
    assert "blocks.0.qkv.lora_A.weight" in load_file(str(tmp_path / "old/adapter_model.safetensors"))
    old = lora_io.load_lora(copy.deepcopy(base), tmp_path / "old")
    torch.testing.assert_close(_out(old), _out(model), rtol=0, atol=0)
    assert all(p.requires_grad for n, p in old.named_parameters() if "lora_" in n)  # trainable, as before


@pytest.mark.parametrize("fmt, strip", [("kohya", ""), ("comfy", ""), ("comfy", "blocks.")])
def test_export_of_a_peft_format_adapter_equals_the_old_format_export(fmt, strip, tmp_path):
    _, model = _adapted()
    lora_io.save_lora(model, tmp_path / "new")
    _save_old_format(model, tmp_path / "old")
    new = lora_io.convert_peft_adapter(tmp_path / "new", fmt, strip_prefix=strip)
    old = lora_io.convert_peft_adapter(tmp_path / "old", fmt, strip_prefix=strip)
    assert new.keys() == old.keys() == lora_io.export_lora(model, fmt, strip_prefix=strip).keys()
    for k, v in old.items():
        assert torch.equal(new[k], v), k


def test_loading_an_adapter_that_lacks_some_lora_weights_is_an_error(tmp_path):
    base, model = _adapted()
    lora_io.save_lora(model, tmp_path)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    del weights["base_model.model.blocks.1.fc2.lora_B.weight"]
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdaptError, match="blocks.1.fc2.lora_B"):
        lora_io.load_lora(copy.deepcopy(base), tmp_path)
