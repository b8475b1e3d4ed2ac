"""Text-to-video end to end against diffusers' WanPipeline (test-only reference): the same DiT and
VAE weights (converted between layouts), the same prompt embeddings and noise, the official sigma
schedule; the decoded videos must agree (fp32)."""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from dcvg_wan import WanModel, get_preset
from dcvg_wan.latent_spaces import WanVAESpace
from dcvg_wan.layouts import to_official
from dcvg_wan.layouts.vae_diffusers import from_official as vae_to_diffusers
from dcvg_wan.pipelines import T2VPipeline
from dcvg_wan.sampling import make_noise
from tests.dcvg_wan.test_sampling_pipeline import OfficialSigmasUniPC, twin
from tests.dcvg_wan.test_vae import make_vae
from tests.dcvg_wan.test_vae_parity import diffusers_twin


class FixedEmbeddings:
    """A text encoder that returns given embeddings (diffusers gets them as prompt_embeds)."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def to(self, device):
        return self

    def encode(self, prompts):
        return [self.table[p] for p in prompts]


def twins(cfg, ref_dit, vae_seed: int):
    """Our DiT and VAE holding the weights of the diffusers `ref_dit` and of a random VAE, plus that
    VAE as diffusers' AutoencoderKLWan: (dit, vae, ref_vae)."""
    dit = WanModel(cfg).eval()
    dit.load_state_dict(to_official(ref_dit.state_dict(), "diffusers"), strict=True)
    vae = make_vae(vae_seed)
    ref_vae = diffusers_twin(vae.config)
    ref_vae.load_state_dict(vae_to_diffusers(vae.state_dict()), strict=True)
    return dit, vae, ref_vae


def test_t2v_video_matches_diffusers_wan_pipeline(randomize):
    cfg = get_preset("debug-t2v")
    ref_dit = twin(cfg, randomize)
    dit, vae, ref_vae = twins(cfg, ref_dit, 4)

    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    uncond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    pipe = T2VPipeline(dit, WanVAESpace(vae, cfg.patch), FixedEmbeddings({"p": cond, "n": uncond}))
    ours = pipe("p", negative_prompt="n", size="48*32", frame_num=9, steps=5, shift=3.0, guide_scale=4.0, seed=9)

    ref_pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=ref_vae, transformer=ref_dit,
                           scheduler=OfficialSigmasUniPC(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = ref_pipe(prompt_embeds=cond[None], negative_prompt_embeds=uncond[None], height=32, width=48,
                          num_frames=9, num_inference_steps=5, guidance_scale=4.0,
                          latents=make_noise((1, cfg.in_dim, 3, 4, 6), seed=9), output_type="pt").frames
    theirs = theirs[0].permute(1, 0, 2, 3)  # [F, C, H, W] in [0, 1] -> [C, F, H, W]
    assert ours.video.shape == theirs.shape == (3, 9, 32, 48)
    assert (ours.video / 2 + 0.5 - theirs).abs().max() <= 1e-4
    assert theirs.std() > 0.01  # not a constant video


class FixedImageFeatures:
    def __init__(self, features: torch.Tensor):
        self.features = features

    def to(self, device):
        return self

    def encode(self, image):
        return self.features


def test_i2v_video_matches_diffusers_image_to_video_pipeline(randomize):
    """Same for I2V: CLIP features given, the image VAE-encoded after the 4-channel first-frame
    mask (official conditioning), the unconditional pass keeping image and y."""
    from diffusers import WanImageToVideoPipeline

    from dcvg_wan.pipelines import I2VPipeline
    from tests.dcvg_wan.test_parity_diffusers import diffusers_twin as dit_twin

    cfg = get_preset("debug-i2v")
    ref_dit = dit_twin(cfg, 5, randomize)
    dit, vae, ref_vae = twins(cfg, ref_dit, 6)

    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    uncond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    clip = torch.randn(1, 257, cfg.image_dim, generator=gen)
    image = torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1
    pipe = I2VPipeline(dit, WanVAESpace(vae, cfg.patch), FixedEmbeddings({"p": cond, "n": uncond}),
                       FixedImageFeatures(clip))
    ours = pipe("p", image, negative_prompt="n", size="48*32", frame_num=9, steps=4, shift=3.0, guide_scale=5.0,
                seed=3)

    ref_pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=ref_vae, transformer=ref_dit,
                                       image_encoder=None, image_processor=None,
                                       scheduler=OfficialSigmasUniPC(prediction_type="flow_prediction",
                                                                     use_flow_sigmas=True, flow_shift=3.0))
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.encode_image = lambda *args, **kwargs: clip  # CLIP features given, as to ours
    with torch.no_grad():
        theirs = ref_pipe(image=image / 2 + 0.5, prompt_embeds=cond[None], negative_prompt_embeds=uncond[None],
                          height=32, width=48, num_frames=9, num_inference_steps=4,
                          guidance_scale=5.0, latents=make_noise((1, cfg.out_dim, 3, 4, 6), seed=3),
                          output_type="pt").frames
    theirs = theirs[0].permute(1, 0, 2, 3)
    assert ours.video.shape == theirs.shape == (3, 9, 32, 48)
    assert (ours.video / 2 + 0.5 - theirs).abs().max() <= 1e-4
