"""The Wan binding follows NVIDIA's DC-Gen training code where it states a fact: the new ends'
initialisation, the LoRA scope variant, the null prompt of text dropout, and a run on the
DC-Gen noise-level grid with text dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ae_adapt import CacheError, build_cache, lora_io
from ae_adapt.trainer import TrainConfig
from dcvg_wan.adapt import WanAdaptable, run_adapt
from dcvg_wan.adapt_command import DCGEN_I2V_NULL_PROMPT, DCGEN_NULL_PROMPT, null_prompt
from dcvg_wan.sampling import NEGATIVE_PROMPT


def test_new_embedder_is_xavier_with_a_fan_in_bias(t2v):
    model = WanAdaptable(copy.deepcopy(t2v))
    torch.manual_seed(0)
    conv = model.replace_patch_embedder(8, (1, 2, 2)).conv
    fan_in, fan_out = 8 * 4, t2v.config.dim  # weight viewed as [dim, in * prod(patch)]
    bound = math.sqrt(6 / (fan_in + fan_out))
    w = conv.weight.detach().abs()
    # uniform on [-bound, bound]: with 1024 draws the largest is within 3% of the bound (a default
    # Conv3d init, bound 1/sqrt(fan_in) = 0.18 here, would be far below 0.97 * 0.31)
    assert float(w.max()) <= bound and float(w.max()) >= 0.97 * bound
    assert float(conv.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    b = conv.bias.detach().abs()
    assert float(b.max()) <= 1 / math.sqrt(fan_in)


def test_new_head_starts_at_zero_with_the_base_modulation(t2v):
    model = WanAdaptable(copy.deepcopy(t2v))
    model.replace_patch_embedder(8, (1, 1, 1))
    head = model.replace_output_head(8, (1, 1, 1))
    assert not head.head.weight.any() and not head.head.bias.any()
    assert torch.equal(head.modulation, t2v.head.modulation)
    with torch.no_grad():
        out = model(torch.randn(2, 8, 2, 4, 4), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 32))
    assert not out.any()


@pytest.mark.parametrize("fixture,extra", [("t2v", 5), ("i2v", 7)])
def test_all_linear_lora_scope_adds_the_embedding_linears(fixture, extra, request):
    dit = request.getfixturevalue(fixture)
    per_block = 10 if dit.config.image_dim is None else 12
    blocks = WanAdaptable(copy.deepcopy(dit))
    wide = WanAdaptable(copy.deepcopy(dit), lora_scope="all-linear")
    for model, n in ((blocks, per_block * len(dit.blocks)), (wide, per_block * len(dit.blocks) + extra)):
        lora_io.add_lora(model, rank=2, alpha=4, target_modules=model.lora_target_modules())
        assert len(lora_io.lora_layers(model)) == n
    names = set(lora_io.lora_layers(wide))
    assert {"dit.text_embedding.0", "dit.text_embedding.2", "dit.time_embedding.0", "dit.time_projection.1"} <= names
    assert not any(n.startswith(("dit.head", "dit.patch_embedding")) for n in names)
    with pytest.raises(ValueError, match="lora_scope"):
        WanAdaptable(dit, lora_scope="everything")


def test_null_prompt_is_the_wan_negative_prompt_as_dcgen_writes_it():
    assert DCGEN_NULL_PROMPT == NEGATIVE_PROMPT.replace("，", ",")
    assert DCGEN_I2V_NULL_PROMPT == "镜头晃动," + DCGEN_NULL_PROMPT
    assert null_prompt("t2v-1.3B") == DCGEN_NULL_PROMPT and null_prompt("i2v-14B") == DCGEN_I2V_NULL_PROMPT


def _cache(path, with_null: bool):
    g = torch.Generator().manual_seed(0)
    latents = [(torch.randn(4, 2, 8, 8, generator=g), torch.randn(8, 2, 4, 4, generator=g)) for _ in range(4)]
    texts = {str(i): torch.randn(3 + i, 32, generator=g) for i in range(4)} | {"null": torch.randn(6, 32, generator=g)}
    build_cache(
        [{"video": torch.full((1,), float(i)), "prompt": str(i)} for i in range(4)],
        path,
        base_encode=lambda v: latents[int(v.sum())][0],
        new_encode=lambda v: latents[int(v.sum())][1],
        text_encode=lambda p: texts[p],
        base_ae="wan-vae",
        new_ae="dc-ae-v",
        null_prompt="null" if with_null else None,
    )
    return path


def test_run_adapt_on_the_dcgen_grid_with_text_dropout(t2v, tmp_path):
    fast = {"batch_size": 4, "progress": False, "lr": 1e-2}
    overrides = {
        "embedder": TrainConfig(steps=2, **fast),
        "head": TrainConfig(steps=3, **fast),
        "lora": TrainConfig(steps=2, **fast),
        "resolution": (),
        "timesteps": "dcgen",
        "flow_shift": 5.0,
        "cond_dropout": 0.5,
    }
    args = {"base_ae": "wan-vae", "new_ae": "dc-ae-v", "new_channels": 8, "preset": "debug", "overrides": overrides}
    with pytest.raises(CacheError, match="null-prompt"):
        run_adapt(copy.deepcopy(t2v), _cache(tmp_path / "bare", False), tmp_path / "out0", **args)
    dit = run_adapt(copy.deepcopy(t2v), _cache(tmp_path / "cache", True), tmp_path / "out", **args)
    assert dit.head.head.weight.any()  # trained away from its zero start
    state = torch.load(tmp_path / "out" / "2-align-head" / "checkpoint.pt", weights_only=False)
    assert state["fingerprint"]["timesteps"] == "dcgen" and state["fingerprint"]["cond_dropout"] == 0.5


def test_i2v_embedder_bias_bound_counts_only_the_latent_channels(i2v):
    """DC-Gen's WanI2VPatchEmbedding bounds the bias by 1/sqrt(cfg.in_channels * prod(patch)),
    cfg.in_channels being the latent's channels, while its conv also takes the 4 mask and the
    image-latent channels; the weight's Xavier fan still counts every input channel."""
    model = WanAdaptable(copy.deepcopy(i2v))
    latent, patch = 8, (1, 2, 2)
    torch.manual_seed(0)
    conv = model.replace_patch_embedder(latent + 4 + latent, patch).conv
    b = conv.bias.detach().abs()
    assert float(b.max()) <= 1 / math.sqrt(latent * 4)
    assert float(b.max()) > 1 / math.sqrt((2 * latent + 4) * 4)  # above a bound over all channels
    w = conv.weight.detach().abs()
    assert float(w.max()) <= math.sqrt(6 / ((2 * latent + 4) * 4 + i2v.config.dim))
