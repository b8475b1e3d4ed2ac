"""CLIP image encoder: official <-> transformers converter, parity with an independent re-implementation
of Wan's open-clip visual tower (penultimate block, preprocessing), loading from every layout."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from dcvg_wan import CheckpointError, ImageEncoder, InputError
from dcvg_wan.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PRESETS,
    OFFICIAL_FILE,
    ImageEncoderConfig,
    build_image_model,
    clip_from_official,
    clip_to_official,
    load_image_model,
)

CFG = IMAGE_PRESETS["debug"]


def make_clip(seed: int = 0):
    torch.manual_seed(seed)
    model = build_image_model("debug")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    return model.eval()


@pytest.fixture(scope="module")
def clip():
    return make_clip()


@pytest.fixture(scope="module")
def official_sd(clip):
    """The official file's content: the visual tower in official names plus a (dummy) text tower."""
    sd = {k: v.clone() for k, v in clip_to_official(clip.state_dict()).items()}
    sd["textual.token_embedding.weight"] = torch.zeros(5, 4)
    sd["log_scale"] = torch.tensor(2.6)
    return sd


# ---- the independent reference: Wan's VisionTransformer math on official-layout weights --------------
def official_visual(sd, pixels, blocks, cfg=CFG):
    """`VisionTransformer.forward` (pool 'token', pre_norm, exact GELU) over the first `blocks` blocks."""
    w, n = cfg.width, cfg.num_heads
    d = w // n
    x = F.conv2d(pixels, sd["visual.patch_embedding.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    b, s = x.shape[0], x.shape[1] + 1
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"], 1e-5)
    for i in range(blocks):
        p = f"visual.transformer.{i}."

        def ln(t, name, p=p):
            return F.layer_norm(t, (w,), sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-5)

        qkv = ln(x, "norm1") @ sd[p + "attn.to_qkv.weight"].T + sd[p + "attn.to_qkv.bias"]
        q, k, v = qkv.view(b, s, 3, n, d).unbind(2)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) / math.sqrt(d), dim=-1)
        o = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, s, w)
        x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.gelu(ln(x, "norm2") @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"])
        x = x + h @ sd[p + "mlp.2.weight"].T + sd[p + "mlp.2.bias"]
    return x


def official_preprocess(images, size):
    """`CLIPModel.visual` preprocessing: per image bicubic to size x size, [-1,1] -> [0,1], Normalize."""
    x = torch.cat([F.interpolate(u[None], size=(size, size), mode="bicubic", align_corners=False) for u in images])
    x = x.mul(0.5).add(0.5)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _images(n=2, h=40, w=52, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=gen) * 2 - 1


# ---- converter ---------------------------------------------------------------------------------------
def test_official_key_names_and_shapes(clip):
    sd = clip_to_official(clip.state_dict())
    w, m, tokens = CFG.width, CFG.mlp_dim, CFG.num_tokens
    expected = {
        "visual.patch_embedding.weight": (w, 3, CFG.patch_size, CFG.patch_size),  # no bias: pre-norm ViT
        "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, tokens, w),
        "visual.pre_norm.weight": (w,), "visual.pre_norm.bias": (w,),
        "visual.post_norm.weight": (w,), "visual.post_norm.bias": (w,),
        "visual.head": (w, CFG.projection_dim),
    }  # fmt: skip
    for i in range(CFG.num_layers):
        p = f"visual.transformer.{i}."
        expected |= {
            p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "norm2.weight": (w,), p + "norm2.bias": (w,),
            p + "attn.to_qkv.weight": (3 * w, w), p + "attn.to_qkv.bias": (3 * w,),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "mlp.0.weight": (m, w), p + "mlp.0.bias": (m,), p + "mlp.2.weight": (w, m), p + "mlp.2.bias": (w,),
        }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_round_trip(clip, official_sd):
    hf = clip.state_dict()
    back = clip_from_official(official_sd)  # text tower dropped on the way
    assert set(back) == set(hf)
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k
    assert set(clip_to_official(back)) == {k for k in official_sd if k.startswith("visual.")}


def test_parity_penultimate_block(clip, official_sd):
    """Our features == Wan's math with use_31_block (all blocks but the last), fp32 <= 1e-5."""
    pixels = official_preprocess(_images(), CFG.image_size)
    enc = ImageEncoder(clip)
    out = enc.encode(_images())
    ref = official_visual(official_sd, pixels, CFG.num_layers - 1)
    assert out.shape == (2, CFG.num_tokens, CFG.width)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full = official_visual(official_sd, pixels, CFG.num_layers)
    assert (full - ref).abs().max() > 1e-2  # the block selection matters


def test_parity_pooled_head(clip, official_sd):
    """post_norm and head map too: open-clip's pooled output post_norm(x[:, 0]) @ head."""
    pixels = official_preprocess(_images(), CFG.image_size)
    x = official_visual(official_sd, pixels, CFG.num_layers)[:, 0]
    sd = official_sd
    ref = F.layer_norm(x, (CFG.width,), sd["visual.post_norm.weight"], sd["visual.post_norm.bias"], 1e-5)
    with torch.no_grad():
        out = clip(pixel_values=pixels).image_embeds
    torch.testing.assert_close(out, ref @ sd["visual.head"], atol=1e-5, rtol=1e-5)


# ---- loading -------------------------------------------------------------------------------------
def test_load_official_file_and_directory(tmp_path, clip, official_sd):
    torch.save(official_sd, tmp_path / OFFICIAL_FILE)
    ref = ImageEncoder(clip).encode(_images())
    for path in (tmp_path, tmp_path / OFFICIAL_FILE):
        enc = ImageEncoder.from_pretrained(path)  # debug architecture recognised from the shapes
        assert enc.config == CFG
        torch.testing.assert_close(enc.encode(_images()), ref, atol=0, rtol=0)
    assert not any(t.is_meta for t in [*enc.model.parameters(), *enc.model.buffers()])
    torch.save({"model." + k: v for k, v in official_sd.items()}, tmp_path / "wrapped.pth")  # a wrapper's prefix
    torch.testing.assert_close(ImageEncoder.from_pretrained(tmp_path / "wrapped.pth").encode(_images()), ref)


def test_load_diffusers_directory_and_single_file(tmp_path, clip):
    clip.save_pretrained(str(tmp_path / "image_encoder"))
    ref = ImageEncoder(clip).encode(_images())
    for path in (tmp_path, tmp_path / "image_encoder"):
        torch.testing.assert_close(ImageEncoder.from_pretrained(path).encode(_images()), ref, atol=0, rtol=0)
    sd = {k: v.contiguous() for k, v in clip.state_dict().items() if k != "visual_projection.weight"}
    save_file(sd, tmp_path / "clip_vision_h.safetensors")  # ComfyUI-style, without the projection
    enc = ImageEncoder.from_pretrained(tmp_path / "clip_vision_h.safetensors", dtype=torch.float64)
    assert enc.config.projection_dim is None and enc.dtype == torch.float64
    torch.testing.assert_close(enc.encode(_images()).float(), ref, atol=1e-5, rtol=1e-5)


def test_load_transformers5_clip_vision_model_directory(tmp_path, clip):
    """transformers 5 saves `CLIPVisionModel` without the `vision_model.` prefix (and no projection)."""
    clip.config.save_pretrained(str(tmp_path))
    sd = {k.removeprefix("vision_model."): v.contiguous() for k, v in clip.state_dict().items()}
    sd.pop("visual_projection.weight")
    save_file(sd, tmp_path / "model.safetensors")
    enc = ImageEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(enc.encode(_images()), ImageEncoder(clip).encode(_images()), atol=0, rtol=0)


def test_pil_and_uint8_inputs(clip):
    enc = ImageEncoder(clip)
    arr = (np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8)
    as_tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    ref = enc.encode(as_tensor)
    torch.testing.assert_close(enc.encode([arr]), ref)
    torch.testing.assert_close(enc.encode([Image.fromarray(arr)]), ref)
    mixed = enc.encode([Image.fromarray(arr), _images(1)[0]])  # sizes may differ: each image resized alone
    assert mixed.shape == (2, CFG.num_tokens, CFG.width)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_images(clip):
    enc = ImageEncoder(clip)
    with pytest.raises(InputError, match=r"in \[-1, 1\]"):
        enc.encode(torch.full((1, 3, 8, 8), 200.0))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        enc.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="RGB image"):
        enc.encode([np.zeros((8, 8), dtype=np.float32)])


def test_missing_and_mismatched_files(tmp_path, official_sd):
    with pytest.raises(CheckpointError, match=r"(?s)no CLIP image encoder weights in .*image_encoder/ subfolder"):
        ImageEncoder.from_pretrained(tmp_path)
    bad = dict(official_sd)
    bad.pop("visual.transformer.1.mlp.2.bias")
    torch.save(bad, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match=r"(?s)1 missing key.*layers\.1\.mlp\.fc2\.bias"):
        load_image_model(tmp_path / "clip.pth", config="debug")
    odd = ImageEncoderConfig(image_size=28, patch_size=7, width=24, num_layers=1, num_heads=3, mlp_dim=8)
    with torch.device("meta"):
        sd = clip_to_official(build_image_model(odd).state_dict())
    torch.save({k: torch.zeros(v.shape) for k, v in sd.items()}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="head count is not stored.*pass config="):
        load_image_model(tmp_path / "odd.pth")
    assert load_image_model(tmp_path / "odd.pth", config=odd).config.num_attention_heads == 3


def test_full_size_preset_on_meta():
    cfg = IMAGE_PRESETS["vit-h-14"]
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_image_model(cfg)
    assert time.perf_counter() - start < 10
    assert cfg.num_tokens == 257
    per_block = 4 * 1280 * 1280 + 2 * 1280 * 5120 + 4 * 1280 + 5120 + 1280 + 4 * 1280
    embeddings = 1280 * 3 * 14 * 14 + 1280 + 257 * 1280 + 4 * 1280
    assert sum(p.numel() for p in model.parameters()) == embeddings + 32 * per_block + 1024 * 1280
    assert model.config.hidden_act == "gelu" and model.config.layer_norm_eps == 1e-5
    pixels = torch.empty(1, 3, 224, 224, device="meta")
    features = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert features.shape == (1, 257, 1280)
