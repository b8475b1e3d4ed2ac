"""Numerical parity with diffusers' WanTransformer3DModel (test-only dependency) on tiny random
configs in fp32: same weights (converted by our diffusers adapter), same inputs, max abs diff
<= 1e-4. diffusers takes I2V conditioning already concatenated on channels (its pipeline does
`torch.cat([latents, condition], dim=1)`) and text already zero-padded to 512 rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from dcvg_wan import WanConfig, WanModel, get_preset
from dcvg_wan.layouts import to_official

TOL = 1e-4

CASES = {
    "t2v": get_preset("debug-t2v"),  # head_dim 16: RoPE split 8/4/4
    "t2v-head_dim-12": get_preset("debug-t2v", dim=36, num_heads=3),  # RoPE split 4/4/4
    "t2v-head_dim-128": get_preset("debug-t2v", dim=128, num_heads=1, num_layers=1),  # the real 44/42/42
    "t2v-no-cross-attn-norm": get_preset("debug-t2v", cross_attn_norm=False),
    "i2v": get_preset("debug-i2v"),  # 257 CLIP tokens, 512 text rows
    "flf2v": get_preset("debug-i2v", flf_pos_len=514),  # first+last frame CLIP tokens
    "dcvg-i2v-patch1": get_preset("debug-i2v", patch=(1, 1, 1), in_dim=20, out_dim=8),  # noise 8 + mask 4 + cond 8
}


def diffusers_twin(cfg: WanConfig, seed: int, randomize) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=cfg.patch,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim is not None else None,
        pos_embed_seq_len=cfg.flf_pos_len,
    )
    return randomize(model, seed).eval()


def diffusers_forward(ref: WanTransformer3DModel, cfg: WanConfig, inputs: dict) -> torch.Tensor:
    x = inputs["x"] if inputs.get("y") is None else torch.cat([inputs["x"], inputs["y"]], dim=1)
    context = F.pad(inputs["context"], (0, 0, 0, cfg.text_len - inputs["context"].shape[1]))
    with torch.no_grad():
        return ref(x, inputs["t"], context, encoder_hidden_states_image=inputs.get("clip_fea"), return_dict=False)[0]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_diffusers(case, randomize, inputs_for):
    cfg = CASES[case]
    ref = diffusers_twin(cfg, seed=3, randomize=randomize)
    model = WanModel(cfg).eval()
    model.load_state_dict(to_official(ref.state_dict(), "diffusers"), strict=True)
    latent = (3, 4, 5) if cfg.patch == (1, 1, 1) else (3, 6, 10)  # F', H', W' all different
    inputs = inputs_for(model, latent=latent)
    with torch.no_grad():
        ours = model(**inputs)
    theirs = diffusers_forward(ref, cfg, inputs)
    diff = (ours - theirs).abs().max().item()
    print(f"parity {case}: max abs diff {diff:.2e} (output max {theirs.abs().max().item():.2f})")
    assert ours.shape == theirs.shape == (2, cfg.out_dim, *latent)
    assert diff <= TOL


def test_diffusers_loads_our_diffusers_directory(tmp_path, new_model, inputs_for):
    model = new_model("debug-i2v", seed=4)
    model.save_pretrained(tmp_path / "transformer", layout="diffusers")
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    inputs = inputs_for(model)
    with torch.no_grad():
        diff = (model(**inputs) - diffusers_forward(ref, model.config, inputs)).abs().max().item()
    print(f"parity diffusers.from_pretrained(our save): max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", ["t2v", "dcvg-i2v-patch1"])
def test_we_load_a_directory_written_by_diffusers(case, tmp_path, randomize, inputs_for):
    cfg = CASES[case]
    ref = diffusers_twin(cfg, seed=5, randomize=randomize)
    ref.save_pretrained(tmp_path / "transformer")
    model = WanModel.from_pretrained(tmp_path / "transformer")
    assert model.config == cfg.replace(text_len=512)  # diffusers configs carry no text_len
    inputs = inputs_for(model, latent=(3, 4, 6))
    with torch.no_grad():
        diff = (model(**inputs) - diffusers_forward(ref, model.config, inputs)).abs().max().item()
    print(f"parity our from_pretrained(diffusers save, {case}): max abs diff {diff:.2e}")
    assert diff <= TOL
