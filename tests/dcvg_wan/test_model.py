"""The DiT's API: pieces that compose to forward, padding and broadcasting rules, dtype policy,
and actionable errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dcvg_wan import InputError, WanModel
from dcvg_wan.model import keeps_fp32


def _run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def test_forward_is_patch_embed_then_forward_from_embeddings(i2v, inputs_for):
    inputs = inputs_for(i2v)
    with torch.no_grad():
        tokens, grid = i2v.patch_embed(torch.cat([inputs["x"], inputs["y"]], dim=1))
        pieces = i2v.forward_from_embeddings(tokens, grid, inputs["t"], inputs["context"], inputs["clip_fea"])
    assert grid == (4, 4, 4) and tokens.shape == (2, 64, 32)
    assert torch.equal(pieces, _run(i2v, **inputs))


def test_tokens_are_in_f_h_w_order(t2v, inputs_for):
    x = inputs_for(t2v)["x"]
    with torch.no_grad():
        tokens, _grid = t2v.patch_embed(x)
        conv = t2v.patch_embedding(x)  # [B, dim, F', H', W']
    assert torch.equal(tokens[:, 1 * 16 + 2 * 4 + 3], conv[:, :, 1, 2, 3])


def test_unpatchify_inverts_the_official_token_layout(new_model):
    model = new_model("debug-t2v", patch=(2, 2, 2))
    video = torch.randn(2, 4, 4, 6, 8)
    tokens = rearrange(video, "b c (f p) (h q) (w r) -> b (f h w) (p q r c)", p=2, q=2, r=2)
    assert torch.equal(model.unpatchify(tokens, model.token_grid(video.shape)), video)


def test_context_is_zero_padded_to_text_len(t2v, inputs_for):
    inputs = inputs_for(t2v, text_rows=5)
    padded = dict(inputs, context=F.pad(inputs["context"], (0, 0, 0, 11)))
    assert torch.equal(_run(t2v, **inputs), _run(t2v, **padded))
    assert not torch.allclose(_run(t2v, **inputs), _run(t2v, **dict(inputs, context=inputs["context"][:, :4])))


def test_scalar_t_broadcasts_and_samples_are_independent(t2v, inputs_for):
    inputs = inputs_for(t2v)
    both = _run(t2v, **dict(inputs, t=torch.tensor([300.0, 300.0])))
    assert torch.equal(both, _run(t2v, **dict(inputs, t=300)))
    first = _run(t2v, x=inputs["x"][:1], t=torch.tensor([300.0]), context=inputs["context"][:1])
    assert torch.allclose(both[:1], first, atol=1e-6)


def test_deterministic(i2v, inputs_for):
    inputs = inputs_for(i2v)
    assert torch.equal(_run(i2v, **inputs), _run(i2v, **inputs))


def test_set_dtype_keeps_the_fp32_parts(new_model, inputs_for):
    model = new_model("debug-i2v")
    inputs = inputs_for(model)
    reference = _run(model, **inputs)
    model.set_dtype(torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["blocks.0.modulation"] == dtypes["head.head.weight"] == dtypes["time_projection.1.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["img_emb.proj.1.weight"] == torch.bfloat16
    assert all((d == torch.float32) == keeps_fp32(k) for k, d in dtypes.items())
    out = _run(model, **inputs)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_dcvg_i2v_variant_forward_shape(new_model):
    """patch (1,1,1), in 68 = noise 32 + mask 4 + image chunk 32, out 32 (debug width)."""
    model = new_model("debug-i2v", patch=(1, 1, 1), in_dim=68, out_dim=32)
    out = _run(model, x=torch.randn(1, 32, 2, 3, 5), t=500, context=torch.randn(1, 4, 32),
               clip_fea=torch.randn(1, 257, 16), y=torch.randn(1, 36, 2, 3, 5))
    assert out.shape == (1, 32, 2, 3, 5)
    assert model.token_grid(out.shape) == (2, 3, 5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"x": torch.randn(2, 4, 4, 8)}, r"x must be a latent tensor \[B, C, F, H, W\], got shape \(2, 4, 4, 8\)"),
        ({"x": torch.randn(2, 5, 4, 8, 8)}, "x has 5 channels, the model takes in_dim=4"),
        ({"x": torch.randn(2, 4, 4, 7, 8)}, r"\(4, 7, 8\) must be non-zero multiples of the patch \(1, 2, 2\)"),
        ({"context": torch.randn(2, 17, 32)}, "context has 17 rows, more than text_len=16"),
        ({"context": torch.randn(2, 7, 31)}, r"context must be \[B=2, L, text_dim=32\]"),
        ({"t": torch.tensor([1.0, 2.0, 3.0])}, r"t must be a scalar or \[B=2\] timesteps"),
        ({"y": torch.randn(2, 8, 4, 8, 8)}, "T2V model .* pass neither clip_fea nor y"),
    ],
)
def test_t2v_input_errors(t2v, inputs_for, change, match):
    with pytest.raises(InputError, match=match):
        _run(t2v, **(inputs_for(t2v) | change))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"clip_fea": None}, r"I2V model: clip_fea \[B, 257, 16\] and y are required"),
        ({"y": torch.randn(2, 4, 4, 8, 8)}, r"y must be \[2, 8, 4, 8, 8\] so that x and y give in_dim=12 channels, got shape \(2, 4, 4, 8, 8\)"),
        ({"clip_fea": torch.randn(2, 257, 15)}, r"clip_fea must be \[1\*B, N, image_dim=16\]"),
    ],
)
def test_i2v_input_errors(i2v, inputs_for, change, match):
    with pytest.raises(InputError, match=match):
        _run(i2v, **(inputs_for(i2v) | change))


def test_flf2v_needs_two_frames_of_clip_tokens(new_model, inputs_for):
    model = new_model("debug-i2v", flf_pos_len=514)
    inputs = inputs_for(model)
    assert _run(model, **inputs).shape == (2, 4, 4, 8, 8)
    with pytest.raises(InputError, match=r"clip_fea must be \[2\*B, N, image_dim=16\]"):
        _run(model, **(inputs | {"clip_fea": inputs["clip_fea"][:2]}))


def test_from_preset_on_meta_builds_full_size_without_memory():
    model = WanModel.from_preset("dcvg-i2v-14B", device="meta")
    assert model.patch_embedding.weight.shape == (5120, 68, 1, 1, 1)
    assert model.head.head.weight.shape == (32, 5120)
    assert model.preset_names == ("dcvg-i2v-14B",)


def test_gradients_flow_after_an_inference_mode_call(new_model, inputs_for):
    """The cached RoPE tables must not be inference tensors (ae-adapt trains this model)."""
    model = new_model("debug-t2v")
    inputs = inputs_for(model)
    with torch.inference_mode():
        model(**inputs)
    model(**inputs).square().mean().backward()
    assert model.patch_embedding.weight.grad is not None and model.head.head.weight.grad.abs().sum() > 0
