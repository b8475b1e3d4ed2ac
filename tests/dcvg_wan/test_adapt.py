"""Wan under the ae-adapt protocol: same numbers as WanModel, replaceable ends that update the
config, the stages run on a debug Wan, and the ComfyUI LoRA export applies to a plain WanModel."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from ae_adapt import ShapeError, align_embedder, check_adaptable, lora_finetune, lora_io
from ae_adapt.trainer import TrainConfig
from dcvg_wan import WanModel
from dcvg_wan.adapt import WanAdaptable

FAST = {"batch_size": 4, "progress": False}


def _data(n=8, text_dim=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        video = torch.randn(3, 2, 16, 16, generator=g)
        base = torch.nn.functional.avg_pool3d(video[None], (1, 2, 2))[0]  # [3, 2, 8, 8] -> pad to 4 ch
        base = torch.cat([base, base[:1]], dim=0)
        new = torch.nn.functional.pixel_unshuffle(video.transpose(0, 1), 4).transpose(0, 1)[:8]  # [8, 2, 4, 4]
        out.append({"base": base, "new": new, "context": torch.randn(5, text_dim, generator=g)})
    return out


def _adapted(t2v, channels=8):
    model = WanAdaptable(copy.deepcopy(t2v))
    torch.manual_seed(0)
    model.replace_patch_embedder(channels, (1, 1, 1))
    head = model.replace_output_head(channels, (1, 1, 1))
    with torch.no_grad():  # the new projection starts at zero (DC-Gen): give it weights, as after stage 2
        head.head.weight.normal_(0, 0.2)
        head.head.bias.normal_(0, 0.2)
    return model


def test_wan_satisfies_the_protocol_with_the_same_numbers(t2v, inputs_for):
    model = check_adaptable(WanAdaptable(t2v))
    inputs = inputs_for(t2v)
    tokens, grid = model.patch_embed(inputs["x"])
    view_tokens, view_grid = model.get_patch_embedder()(inputs["x"])
    assert grid == view_grid == (4, 4, 4) and torch.equal(tokens, view_tokens)
    sigma = inputs["t"] / 1000
    out = model.forward_from_embeddings(tokens, grid, model.flow_timestep(sigma), context=inputs["context"])
    with torch.no_grad():
        torch.testing.assert_close(out, t2v(**inputs), rtol=0, atol=0)
    assert (
        model.lora_target_modules()[-2:] == ("ffn.0", "ffn.2") and "cross_attn.k_img" not in model.lora_target_modules()
    )


def test_replacing_the_ends_updates_the_config_and_keeps_the_blocks(t2v):
    model = _adapted(t2v, channels=8)
    cfg = model.dit.config
    assert (cfg.in_dim, cfg.out_dim, cfg.patch) == (8, 8, (1, 1, 1))
    assert torch.equal(model.dit.head.modulation, t2v.head.modulation)  # embedding-space modulation kept
    for (k, v), v2 in zip(t2v.blocks.state_dict().items(), model.dit.blocks.state_dict().values()):
        assert torch.equal(v, v2), k
    x = torch.randn(1, 8, 2, 4, 4)
    assert model(x, torch.tensor([500.0]), torch.randn(1, 5, 32)).shape == x.shape
    with pytest.raises(ShapeError, match="one patch"):
        model.replace_output_head(8, (1, 2, 2))


def test_stage1_on_wan_aligns_only_the_new_embedder(t2v, tmp_path):
    model = WanAdaptable(copy.deepcopy(t2v))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "patch_embedding" not in k}
    result = align_embedder(
        model, _data(), TrainConfig(lr=1e-2, steps=15, **FAST), tmp_path, in_channels=8, patch=(1, 1, 1)
    )
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert model.dit.patch_embedding.weight.shape == (32, 8, 1, 1, 1)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_lora_on_wan_exports_comfy_keys_that_apply_to_a_plain_wan_model(t2v, tmp_path):
    model = _adapted(t2v)
    plain = copy.deepcopy(model.dit)  # the aligned model, without LoRA
    lora_finetune(model, _data(), TrainConfig(lr=1e-2, steps=3, **FAST), tmp_path, rank=4, alpha=8)
    assert len(lora_io.lora_layers(model)) == 10 * len(model.dit.blocks)
    path = lora_io.save_export(model, tmp_path / "lora.safetensors", "comfy", strip_prefix="dit.")
    state = load_file(str(path))
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in state
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in state
    plain.load_state_dict(
        {
            k.removeprefix("dit."): v
            for k, v in model.state_dict().items()
            if "lora_" not in k and ".base_layer" not in k
        }
        | {
            k.removeprefix("dit.").replace(".base_layer", ""): v
            for k, v in model.state_dict().items()
            if ".base_layer" in k
        }
    )
    lora_io.apply_exported_lora(plain, state)
    x, ctx, t = torch.randn(2, 8, 2, 4, 4), torch.randn(2, 5, 32), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, ctx), model(x, t, ctx), rtol=1e-4, atol=1e-5)


def test_adapted_wan_saves_and_reloads_as_a_wan_checkpoint(t2v, tmp_path):
    model = _adapted(t2v)
    model.dit.save_pretrained(tmp_path)
    again = WanModel.from_pretrained(tmp_path)
    assert again.config == model.dit.config
    x, ctx, t = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 5, 32), torch.tensor([300.0])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, ctx), model(x, t, ctx), rtol=0, atol=1e-6)


def test_gradient_checkpointing_on_wan_gives_the_same_gradients(t2v):
    a, b = _adapted(t2v), _adapted(t2v)
    b.enable_gradient_checkpointing()
    x, ctx, t = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 5, 32), torch.tensor([300.0])
    for m in (a, b):
        m(x, t, ctx).square().mean().backward()
    for (k, p), p2 in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=k)


def test_run_adapt_end_to_end_on_a_debug_wan(t2v, tmp_path):
    from ae_adapt import CacheError, build_cache
    from dcvg_wan.adapt import run_adapt

    data = _data(4)
    clips = [{"video": torch.full((1,), float(i)), "prompt": str(i)} for i in range(4)]
    build_cache(
        clips,
        tmp_path / "cache",
        base_encode=lambda v: data[int(v.sum())]["base"],
        new_encode=lambda v: data[int(v.sum())]["new"],
        text_encode=lambda p: data[int(p)]["context"],
        base_ae="wan-vae-f8t4c16",
        new_ae="dc-ae-v-f32t4c32",
    )
    fast = {
        "embedder": TrainConfig(lr=1e-2, steps=2, **FAST),
        "head": TrainConfig(lr=1e-2, steps=2, **FAST),
        "lora": TrainConfig(lr=1e-2, steps=2, **FAST),
        "resolution": (),
    }
    with pytest.raises(CacheError, match="dc-ae-v-f64t4c128"):
        run_adapt(
            copy.deepcopy(t2v),
            tmp_path / "cache",
            tmp_path / "out",
            base_ae="wan-vae-f8t4c16",
            new_ae="dc-ae-v-f64t4c128",
            new_channels=8,
            preset="debug",
            overrides=fast,
        )
    dit = run_adapt(
        copy.deepcopy(t2v),
        tmp_path / "cache",
        tmp_path / "out",
        base_ae="wan-vae-f8t4c16",
        new_ae="dc-ae-v-f32t4c32",
        new_channels=8,
        preset="debug",
        overrides=fast,
    )
    assert (dit.config.in_dim, dit.config.out_dim, dit.config.patch) == (8, 8, (1, 1, 1))
    assert not lora_io.has_lora(dit)
    again = WanModel.from_pretrained(tmp_path / "out" / "model")
    x, ctx, t = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 5, 32), torch.tensor([300.0])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, ctx), dit(x, t, ctx), rtol=0, atol=1e-6)
    assert (tmp_path / "out" / "lora_comfy.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()

    # with EMA on: the adapter and the merged model are the EMA, the checkpoint keeps the raw weights
    ema = {k: v.replace(ema_decay=0.9) if isinstance(v, TrainConfig) else v for k, v in fast.items()}
    dit_ema = run_adapt(copy.deepcopy(t2v), tmp_path / "cache", tmp_path / "out_ema", base_ae="wan-vae-f8t4c16",
                        new_ae="dc-ae-v-f32t4c32", new_channels=8, preset="debug", overrides=ema)
    checkpoints = sorted((tmp_path / "out_ema").rglob("checkpoint.pt"))
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "out_ema" / "adapter" / "adapter_model.safetensors"))
    lora_names = [n for n in state["ema"] if "lora_A" in n]
    assert lora_names and len(adapter) == 2 * len(lora_names)
    for name in lora_names:
        stored = next(v for k, v in adapter.items() if k.endswith(name.split("dit.", 1)[-1].replace(".default", "")))
        torch.testing.assert_close(stored, state["ema"][name].to(stored.dtype), rtol=0, atol=0)
        assert not torch.equal(state["ema"][name], state["weights"][name])
    with torch.no_grad():
        assert not torch.allclose(dit_ema(x, t, ctx), dit(x, t, ctx))
