"""The whole sampling loop (our WanModel + our UniPC + CFG) against diffusers' WanPipeline with a
tiny random WanTransformer3DModel holding the same weights: transformer part only (prompt
embeddings passed in, no text encoder, latents out, no VAE). fp32, sampled latents <= 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from dcvg_wan import WanModel, get_preset
from dcvg_wan.layouts import to_official
from dcvg_wan.sampling import make_noise, sample, wan_denoiser
from tests.dcvg_wan.test_parity_diffusers import diffusers_twin

TOL = 1e-3


class OfficialSigmasUniPC(UniPCMultistepScheduler):
    """diffusers' flow sigmas are linspace(1, 1/1000, N+1)[:-1]; the official Wan2.1 ones are
    linspace(0.999, 0, N+1)[:-1]. Both are shifted by flow_shift; feed the official ones."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        sigma_max = float(np.float32(0.999))
        base = np.linspace(sigma_max, 0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=base)


def twin(cfg, randomize) -> WanTransformer3DModel:
    return diffusers_twin(cfg, 11, randomize)


@pytest.mark.parametrize("steps,shift,guide", [(6, 5.0, 5.0), (4, 3.0, 1.0)])
def test_sampling_matches_diffusers_wan_pipeline(steps, shift, guide, randomize):
    cfg = get_preset("debug-t2v")
    ref = twin(cfg, randomize)
    model = WanModel(cfg).eval()
    model.load_state_dict(to_official(ref.state_dict(), "diffusers"), strict=True)

    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)  # full text_len rows: no padding question
    uncond = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    noise = make_noise((1, cfg.in_dim, 3, 4, 6), seed=123)  # 9 frames, 32x48 pixels

    scheduler = OfficialSigmasUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            height=32,
            width=48,
            num_frames=9,
            num_inference_steps=steps,
            guidance_scale=guide,
            latents=noise.clone(),
            output_type="latent",
        ).frames
        ours = sample(
            wan_denoiser(model, cond),
            noise.clone(),
            steps=steps,
            shift=shift,
            guide_scale=guide,
            uncond_fn=wan_denoiser(model, uncond),
        )
    diff = (ours - theirs).abs().max().item()
    print(f"sampled latents vs WanPipeline ({steps} steps, shift {shift}, guide {guide}): max abs diff {diff:.2e}")
    assert ours.shape == theirs.shape == noise.shape
    assert (ours - noise).abs().max() > 0.1  # the loop did move the latent
    assert diff <= TOL
