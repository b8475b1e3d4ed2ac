"""Wan LoRA files merged into WanModel: diffusers' Wan LoRA loader (ComfyUI keys converted by
`WanPipeline.lora_state_dict`, run through peft) and peft's own merge are the references; every
naming scheme of one LoRA merges to the same weights; foreign or broken files are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dcvg_wan import WanModel, get_preset
from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.layouts import to_official
from dcvg_wan.lora import merge_lora, read_lora_file
from tests.dcvg_wan.conftest import make_inputs, make_model, randomize_

TARGETS = ("self_attn.q", "self_attn.o", "cross_attn.v", "ffn.0", "ffn.2")


def comfy_lora(cfg, seed: int = 1, rank: int = 4, alpha: float = 8.0, i2v: bool = False) -> dict:
    """A random LoRA in ComfyUI's keys (lora_down/lora_up/alpha, diff_b on a bias)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q": (cfg.dim, cfg.dim), "self_attn.o": (cfg.dim, cfg.dim), "cross_attn.v": (cfg.dim, cfg.dim),
              "ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    if i2v:
        shapes["cross_attn.k_img"] = shapes["cross_attn.v_img"] = (cfg.dim, cfg.dim)
    state = {}
    for i in range(cfg.num_layers):
        for name, (out, inp) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            state[f"{key}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
            state[f"{key}.alpha"] = torch.tensor(alpha)
        state[f"diffusion_model.blocks.{i}.cross_attn.o.diff_b"] = torch.randn(cfg.dim, generator=gen) * 0.1
    return state


@pytest.mark.parametrize("preset", ["debug-t2v", "debug-i2v"])
def test_comfy_lora_merges_as_diffusers_applies_it(preset):
    from diffusers import WanPipeline

    from tests.dcvg_wan.test_parity_diffusers import diffusers_forward, diffusers_twin

    cfg = get_preset(preset)
    ref = diffusers_twin(cfg, 0, randomize_)
    ours = WanModel(cfg).eval()
    ours.load_state_dict(to_official(ref.state_dict(), "diffusers"))
    state = comfy_lora(cfg, i2v=cfg.image_dim is not None)
    # diffusers' converter scales some of its input tensors in place: give it a copy
    ref.load_lora_adapter(WanPipeline.lora_state_dict(copy.deepcopy(state)), prefix="transformer", adapter_name="x")
    ref.set_adapters(["x"], weights=[0.7])
    inputs = make_inputs(ours)
    with torch.no_grad():
        before = ours(**inputs)
    report = merge_lora(ours, state, strength=0.7)
    with torch.no_grad():
        after = ours(**inputs)
    torch.testing.assert_close(after, diffusers_forward(ref, cfg, inputs), rtol=0, atol=1e-4)
    assert (after - before).abs().max() > 1e-2  # the LoRA does something
    assert len(report.layers) == cfg.num_layers * (len(TARGETS) + 2 * (cfg.image_dim is not None))
    assert report.diffs == [f"blocks.{i}.cross_attn.o.diff_b" for i in range(cfg.num_layers)]
    # the same LoRA as diffusers saves it (its converter's output: alphas folded, lora_B.bias)
    as_diffusers = WanModel(cfg).eval()
    as_diffusers.load_state_dict(to_official(diffusers_twin(cfg, 0, randomize_).state_dict(), "diffusers"))
    merge_lora(as_diffusers, WanPipeline.lora_state_dict(copy.deepcopy(state)), strength=0.7)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(as_diffusers.state_dict()[key], value, rtol=0, atol=1e-6)


def _rename(state: dict, scheme: str) -> dict:
    """The same LoRA in another trainer's keys (diffusers/peft: alpha folded into lora_A, as
    diffusers saves a LoRA without alphas)."""
    from dcvg_wan.layouts import from_official

    out = {}
    for key, value in state.items():
        name = key.removeprefix("diffusion_model.")
        if ".lora_" in name:
            module, _, part = name.partition(".lora_")
            part = "lora_" + part
        else:
            module, _, part = name.rpartition(".")
        if scheme == "kohya":
            out[f"lora_unet_{module.replace('.', '_')}.{part}"] = value
        elif scheme == "kohya-diffusers":  # kohya's flattening of diffusers' module names
            theirs = next(iter(from_official({module + ".weight": None}, "diffusers"))).removesuffix(".weight")
            out[f"lora_unet_{theirs.replace('.', '_')}.{part}"] = value
        elif scheme in ("diffusers", "peft"):
            if part == "alpha":
                continue
            part = "lora_B.bias" if part == "diff_b" else part
            if part == "lora_down.weight":
                value = value * state[f"diffusion_model.{module}.alpha"] / value.shape[0]
            theirs = next(iter(from_official({module + ".weight": None}, "diffusers"))).removesuffix(".weight")
            part = part.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
            prefix = "transformer." if scheme == "diffusers" else "base_model.model."
            out[f"{prefix}{theirs}.{part}"] = value
        else:
            out[key] = value
    return out


def test_every_naming_scheme_merges_to_the_same_weights(tmp_path):
    state = comfy_lora(get_preset("debug-t2v"))
    merged = {}
    for scheme in ("comfy", "kohya", "kohya-diffusers", "diffusers", "peft"):
        model = make_model("debug-t2v")
        path = tmp_path / scheme
        path.mkdir()
        file = path / ("adapter_model.safetensors" if scheme == "peft" else "lora.safetensors")
        save_file(_rename(state, scheme), str(file))
        report = merge_lora(model, read_lora_file(path if scheme == "peft" else file), 0.5)
        assert len(report.layers) == 2 * len(TARGETS)
        merged[scheme] = model.state_dict()
    for scheme in ("kohya", "kohya-diffusers", "diffusers", "peft"):
        for key, value in merged["comfy"].items():
            torch.testing.assert_close(merged[scheme][key], value, rtol=0, atol=1e-6, msg=f"{scheme} {key}")
    assert not torch.equal(merged["comfy"]["blocks.0.ffn.0.weight"], make_model("debug-t2v").blocks[0].ffn[0].weight)


def _trained_peft_lora(model, alpha: float, targets: list[str], seed: int):
    """A copy of `model` with peft LoRA layers (rank 4) holding random, non-zero weights."""
    from ae_adapt.lora_io import add_lora

    wrapped = add_lora(copy.deepcopy(model), rank=4, alpha=alpha, target_modules=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return wrapped


def test_an_ae_adapt_export_merges_like_peft():
    """ae-adapt trains LoRA with peft and exports it for ComfyUI: merging the export here equals
    peft's own merge of the trained adapter."""
    from ae_adapt.lora_io import export_lora
    from ae_adapt.lora_io import merge_lora as peft_merge

    model = make_model("debug-t2v")
    wrapped = _trained_peft_lora(model, 8, ["self_attn.q", "ffn.2"], seed=3)
    exported = export_lora(wrapped, "comfy")
    merge_lora(model, exported)
    for key, value in peft_merge(wrapped).state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_a_peft_adapter_folder_uses_its_configs_alpha(tmp_path):
    """peft keeps lora_alpha in adapter_config.json: reading the folder (as PeftModel would) merges
    what peft's merge gives."""
    from ae_adapt.lora_io import merge_lora as peft_merge
    from ae_adapt.lora_io import save_lora

    model = make_model("debug-t2v")
    wrapped = _trained_peft_lora(model, 16, ["cross_attn.k", "ffn.0"], seed=4)
    save_lora(wrapped, tmp_path / "adapter")
    merge_lora(model, read_lora_file(tmp_path / "adapter"))
    for key, value in peft_merge(wrapped).state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_norm_deltas_apply_and_zero_ones_are_skipped():
    model = make_model("debug-t2v")
    norm = model.blocks[0].norm3.weight.detach().clone()
    delta = torch.full_like(norm, 0.25)
    report = merge_lora(model, {"diffusion_model.blocks.0.norm3.diff": delta,
                                "diffusion_model.blocks.1.norm3.diff": torch.zeros_like(norm)}, strength=2.0)
    torch.testing.assert_close(model.blocks[0].norm3.weight, norm + 0.5)
    assert report.diffs == ["blocks.0.norm3.diff"] and report.skipped == ["blocks.1.norm3.diff"]


@pytest.mark.parametrize("state, message", [
    ({"diffusion_model.unet.down_blocks.0.lora_down.weight": torch.zeros(4, 8),
      "diffusion_model.unet.down_blocks.0.lora_up.weight": torch.zeros(8, 4)}, "match no layer"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 7),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4)}, "does not fit"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32)}, "not its pair"),
    ({"diffusion_model.blocks.0.self_attn.q.scale": torch.zeros(1)}, "unrecognised LoRA key"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 32),
      "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 32)}, "twice"),
])
def test_foreign_or_broken_loras_are_refused(state, message):
    model = make_model("debug-t2v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        merge_lora(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-merged


def _frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_cli_lora_on_the_demo_model(tmp_path, capsys, monkeypatch):
    from dcvg_wan.cli import main
    from dcvg_wan.generate import embedded_default

    demo = WanModel.from_pretrained(embedded_default()[0].dit)
    cfg = demo.config
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(cfg.num_layers):
        lora[f"diffusion_model.blocks.{i}.ffn.2.lora_down.weight"] = torch.randn(2, cfg.ffn_dim, generator=gen)
        lora[f"diffusion_model.blocks.{i}.ffn.2.lora_up.weight"] = torch.randn(cfg.dim, 2, generator=gen)
    save_file(lora, str(tmp_path / "demo.safetensors"))
    run = ["generate", "--prompt", "a red circle moving left", "--frame_num", "8", "--sample_steps", "2",
           "--base_seed", "0"]
    assert main([*run, "--save_file", str(tmp_path / "plain.mp4")]) == 0
    assert main([*run, "--save_file", str(tmp_path / "zero.mp4"), "--lora", str(tmp_path / "demo.safetensors"),
                 "--lora_strength", "0"]) == 0
    assert main([*run, "--save_file", str(tmp_path / "lora.mp4"), "--lora", str(tmp_path / "demo.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"LoRA {tmp_path / 'demo.safetensors'} (strength 1): {cfg.num_layers} layers" in out
    plain = _frames(tmp_path / "plain.mp4")
    np.testing.assert_array_equal(_frames(tmp_path / "zero.mp4"), plain)
    assert np.abs(_frames(tmp_path / "lora.mp4").astype(int) - plain).max() > 10
    # bad input is refused before any model loads
    assert main([*run, "--lora", str(tmp_path / "missing.safetensors")]) == 3
    assert "no such file" in capsys.readouterr().err
    assert main([*run, "--lora", str(tmp_path / "demo.safetensors"), "--lora_strength", "1", "--lora_strength", "2"]) == 3
    assert "--lora_strength" in capsys.readouterr().err
    # a LoRA for another model is refused before the DiT loads (checked on a meta-device skeleton)
    save_file(comfy_lora(get_preset("debug-t2v")), str(tmp_path / "other.safetensors"))
    from dcvg_wan.pipelines import T2VPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the LoRA was checked")

    monkeypatch.setattr(T2VPipeline, "from_pretrained", no_loading)
    assert main([*run, "--lora", str(tmp_path / "other.safetensors")]) == 4
    assert "does not fit" in capsys.readouterr().err


def test_pipeline_merge_lora_changes_its_dit_as_the_function_does(tmp_path):
    from dcvg_wan.pipelines import T2VPipeline
    from tests.dcvg_wan.test_dcvg_release import dcgen_folder

    pipe = T2VPipeline.from_pretrained(dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False), dtype=torch.float32)
    reference = copy.deepcopy(pipe.dit)
    state = {k.replace("self_attn.q", "self_attn.k"): v for k, v in comfy_lora(pipe.dit.config).items()
             if "self_attn.q" in k}
    save_file(state, str(tmp_path / "l.safetensors"))
    report = pipe.merge_lora(tmp_path / "l.safetensors", strength=0.3)
    merge_lora(reference, state, 0.3)
    assert report.layers == [f"blocks.{i}.self_attn.k" for i in range(pipe.dit.config.num_layers)]
    for key, value in reference.state_dict().items():
        assert torch.equal(pipe.dit.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="match no layer"):
        pipe.merge_lora({"diffusion_model.nope.lora_A.weight": torch.zeros(1, 1),
                         "diffusion_model.nope.lora_B.weight": torch.zeros(1, 1)})


def test_a_diffusers_lora_file_uses_the_alpha_in_its_header(tmp_path):
    """diffusers' save_lora_weights keeps lora_alpha/r in the safetensors header (lora_adapter_metadata):
    a LoRA trained with alpha != r merges as diffusers loads it back."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tests.dcvg_wan.test_parity_diffusers import diffusers_forward, diffusers_twin

    cfg = get_preset("debug-t2v")
    ref = diffusers_twin(cfg, 0, randomize_)
    ours = WanModel(cfg).eval()
    ours.load_state_dict(to_official(ref.state_dict(), "diffusers"))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v"], init_lora_weights=False)
    ref.add_adapter(config, adapter_name="default")
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                  transformer_lora_adapter_metadata=config.to_dict())
    merge_lora(ours, read_lora_file(tmp_path))
    inputs = make_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), diffusers_forward(ref, cfg, inputs), rtol=0, atol=1e-4)


def test_a_refused_lora_changes_nothing_and_bad_strengths_or_files_are_refused(tmp_path):
    model = make_model("debug-t2v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = comfy_lora(model.config)  # block 0 fits; block 1's q is made for another width
    state["diffusion_model.blocks.1.self_attn.q.lora_down.weight"] = torch.zeros(4, 7)
    with pytest.raises(CheckpointError, match="blocks.1.self_attn.q"):
        merge_lora(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="finite"):
        merge_lora(model, comfy_lora(model.config), strength=float("nan"))
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match="no tensors"):
        read_lora_file(tmp_path / "empty.safetensors")
