"""First-last-frame-to-video (official `flf2v-14B`): end to end against diffusers'
WanImageToVideoPipeline(last_image=...) on the Wan VAE, NVIDIA's DC-AE-V `last_image` conditioning
against its closed form, the preset and defaults, and `dcvg-wan generate --task flf2v-14B`."""

from __future__ import annotations

import pytest
import torch

from dcvg_wan import WanModel, get_preset
from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.latent_spaces import DCAEVSpace, WanVAESpace, fit_last_frame
from dcvg_wan.pipelines import FLF2VPipeline, I2VPipeline
from dcvg_wan.sampling import NEGATIVE_PROMPT, make_noise
from tests.dcvg_wan.conftest import randomize_, tiny_text_encoder
from tests.dcvg_wan.test_pipeline_parity import FixedEmbeddings, twins
from tests.dcvg_wan.test_sampling_pipeline import OfficialSigmasUniPC

pytestmark = pytest.mark.filterwarnings("ignore:prompt . has:UserWarning")  # the tiny vocabulary truncates


class RecordingFeatures:
    """A CLIP stand-in returning given features and recording what it was asked to encode."""

    def __init__(self, features: torch.Tensor):
        self.features, self.seen = features, []

    def to(self, device):
        return self

    def encode(self, images):
        self.seen.append([im.clone() for im in images])
        return self.features


# ---- parity with diffusers on the Wan VAE (the official conditioning) --------------------------------
def test_flf2v_video_matches_diffusers_image_to_video_pipeline_with_last_image(randomize):
    """Same DiT (with the 514 FLF positions) and VAE weights, the same CLIP features of both frames,
    prompt embeddings and noise: diffusers builds y from [first, F-2 black, last] and a mask over
    pixel frames 0 and F-1; the decoded videos must agree (fp32)."""
    from diffusers import WanImageToVideoPipeline

    from tests.dcvg_wan.test_parity_diffusers import diffusers_twin as dit_twin

    cfg = get_preset("debug-i2v", flf_pos_len=514)
    ref_dit = dit_twin(cfg, 7, randomize)
    assert ref_dit.config.pos_embed_seq_len == 514
    dit, vae, ref_vae = twins(cfg, ref_dit, 8)

    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    uncond = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    clip = torch.randn(2, 257, cfg.image_dim, generator=gen)  # first- and last-frame features
    first = torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1
    last = torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1
    features = RecordingFeatures(clip)
    pipe = FLF2VPipeline(dit, WanVAESpace(vae, cfg.patch), FixedEmbeddings({"p": cond, "n": uncond}), features)
    ours = pipe("p", first, last, negative_prompt="n", size="48*32", frame_num=9, steps=4, shift=16.0,
                guide_scale=5.0, seed=5)
    (seen,) = features.seen  # official: CLIP sees the first and the last frame, in that order
    assert len(seen) == 2 and torch.equal(seen[0], first) and torch.equal(seen[1], last)

    ref_pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=ref_vae, transformer=ref_dit,
                                       image_encoder=None, image_processor=None,
                                       scheduler=OfficialSigmasUniPC(prediction_type="flow_prediction",
                                                                     use_flow_sigmas=True, flow_shift=16.0))
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.encode_image = lambda *args, **kwargs: clip
    with torch.no_grad():
        theirs = ref_pipe(image=first / 2 + 0.5, last_image=last / 2 + 0.5, prompt_embeds=cond[None],
                          negative_prompt_embeds=uncond[None], height=32, width=48, num_frames=9,
                          num_inference_steps=4, guidance_scale=5.0,
                          latents=make_noise((1, cfg.out_dim, 3, 4, 6), seed=5), output_type="pt").frames
    theirs = theirs[0].permute(1, 0, 2, 3)
    assert ours.video.shape == theirs.shape == (3, 9, 32, 48)
    assert (ours.video / 2 + 0.5 - theirs).abs().max() <= 1e-4
    # the last frame matters: I2V-style conditioning (no last frame in y) gives another video
    with torch.no_grad():
        ref_i2v = ref_pipe(image=first / 2 + 0.5, prompt_embeds=cond[None], negative_prompt_embeds=uncond[None],
                           height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                           latents=make_noise((1, cfg.out_dim, 3, 4, 6), seed=5), output_type="pt").frames
    assert (ref_i2v[0].permute(1, 0, 2, 3) - theirs).abs().max() > 1e-3


def test_wan_vae_flf_conditioning_is_the_official_one():
    """first_last_frame2video.py: [first, F-2 black, last] VAE-encoded after the mask built from
    ones on pixel frames 0 and F-1 (frame 0 repeated 4x), grouped 4 per latent frame: the last
    latent frame is marked on its 4th mask channel only."""
    from dcvg_wan.vae import WanVAE

    torch.manual_seed(1)
    vae = randomize_(WanVAE.from_preset("debug"), 1).eval()
    space = WanVAESpace(vae, (1, 2, 2))
    first, last = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    chunk = space.image_chunk(first, 13, last)
    assert torch.equal(chunk[:, :, 0], first) and torch.equal(chunk[:, :, 12], last)
    assert chunk[:, :, 1:12].abs().max() == 0
    y = space.image_condition(first, 13, last=last)
    msk = torch.ones(1, 13, 2, 2)  # the official lines, with F = 13 and a 2 x 2 latent
    msk[:, 1:-1] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, 2, 2).transpose(1, 2)[0]
    assert msk[:, -1, 0, 0].tolist() == [0, 0, 0, 1] and msk[:, 0].min() == 1
    torch.testing.assert_close(y[0, :4], msk, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(y[:, 4:], vae.encode(chunk))


# ---- DC-AE-V: NVIDIA's last_image conditioning -------------------------------------------------------
@pytest.fixture(scope="module")
def dcae():
    from dcae_v import DCAEV

    torch.manual_seed(2)
    return DCAEV.from_preset("debug", chunk_size=4).eval()


def test_dcae_v_flf_conditioning_is_nvidias_closed_form(dcae):
    """pipeline_dc_videogen_wan_i2v.py prepare_latents(last_image=...): [image x4, zeros (F-8), last x4],
    DC-AE-V latent x scaling_factor, mask ones on the first and the last latent frame (all 4 channels)."""
    space = DCAEVSpace(dcae, (1, 1, 1))
    first, last = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    frames = 16
    video = torch.cat([first[:, :, None].repeat(1, 1, 4, 1, 1), torch.zeros(1, 3, frames - 8, 32, 32),
                       last[:, :, None].repeat(1, 1, 4, 1, 1)], dim=2)
    torch.testing.assert_close(space.image_chunk(first, frames, last), video, rtol=0, atol=0)
    y = space.image_condition(first, frames, last=last)
    mask = torch.zeros(1, 4, frames // 4, 1, 1)
    mask[:, :, 0] = mask[:, :, -1] = 1
    torch.testing.assert_close(y[:, :4], mask, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(y[:, 4:], dcae.encode(video) * dcae.scaling_factor)
    # I2V is unchanged: only the first latent frame is marked, no last frame in the chunk
    i2v = space.image_condition(first, frames)
    assert i2v[:, :4, 0].min() == 1 and i2v[:, :4, 1:].abs().max() == 0


def _dcvg_flf_dit(channels: int) -> WanModel:
    torch.manual_seed(3)
    model = WanModel.from_preset("debug-t2v", in_dim=2 * channels + 4, out_dim=channels, patch=(1, 1, 1),
                                 image_dim=16, flf_pos_len=514)
    return randomize_(model, 3).eval()


def test_dcvg_flf2v_clip_and_condition_see_both_resized_frames(dcae):
    """On DC-AE-V (NVIDIA) CLIP sees the 8-bit resized frames; y is the closed form above on them."""
    clip = RecordingFeatures(torch.randn(2, 257, 16))
    pipe = FLF2VPipeline(_dcvg_flf_dit(dcae.latent_channels), DCAEVSpace(dcae, (1, 1, 1)), tiny_text_encoder(), clip)
    first, last = torch.rand(1, 3, 40, 80) * 2 - 1, torch.rand(1, 3, 40, 80) * 2 - 1
    out = pipe("a red circle", first, last, size="64*32", frame_num=8, steps=1, seed=0)
    assert out.video.shape == (3, 8, 32, 64)
    (seen,) = clip.seen
    torch.testing.assert_close(seen[0], pipe.space.prepare_image(first, 32, 64), rtol=0, atol=0)
    torch.testing.assert_close(seen[1], pipe.space.prepare_image(last, 32, 64), rtol=0, atol=0)
    assert pipe.defaults().steps == 50 and pipe.defaults().shift == 5.0  # NVIDIA's defaults, as its I2V
    swapped = pipe("a red circle", first, first, size="64*32", frame_num=8, steps=1, seed=0)
    assert not torch.equal(swapped.latent, out.latent)  # the last frame reaches the DiT
    with pytest.raises(InputError, match="at least 8 frames"):
        pipe("a red circle", first, last, size="64*32", frame_num=7, steps=1)
    with pytest.raises(InputError, match="last_frame"):
        pipe("a red circle", first, torch.rand(2, 3, 8, 8), size="64*32", frame_num=8, steps=1)


def test_flf2v_and_i2v_dits_are_not_interchangeable(dcae):
    space, text = DCAEVSpace(dcae, (1, 1, 1)), tiny_text_encoder()
    c = dcae.latent_channels
    with pytest.raises(CheckpointError, match="--task flf2v-14B"):
        I2VPipeline(_dcvg_flf_dit(c), space, text, RecordingFeatures(None))
    i2v_dit = WanModel.from_preset("debug-t2v", in_dim=2 * c + 4, out_dim=c, patch=(1, 1, 1), image_dim=16)
    with pytest.raises(CheckpointError, match="needs an FLF2V DiT"):
        FLF2VPipeline(i2v_dit, space, text, RecordingFeatures(None))


# ---- preset, defaults, last-frame fit ------------------------------------------------------------------
def test_flf2v_preset_is_i2v_14b_plus_514_clip_positions():
    flf, i2v = get_preset("flf2v-14B"), get_preset("i2v-14B-720p")
    assert flf == i2v.replace(flf_pos_len=514) and flf.model_type == "flf2v"
    with torch.device("meta"):
        keys = set(WanModel(flf).state_dict())
    assert len(keys) == 1303 + 1 and "img_emb.emb_pos" in keys  # the official I2V's 1303 tensors + emb_pos


def test_flf2v_defaults_are_generate_py_ones():
    """generate.py: 50 steps (not I2V's 40), shift 16 at every size, guide 5.0, 镜头切换 prefix."""
    from dcvg_wan.pipelines import _defaults

    for size in ("1280*720", "832*480"):
        d = _defaults("flf2v-14B", size, True)
        assert (d.steps, d.shift, d.guide_scale, d.frame_num) == (50, 16.0, 5.0, 81)
        assert d.negative_prompt == "镜头切换，" + NEGATIVE_PROMPT


def test_last_frame_of_another_size_is_center_cropped_to_the_first_frames_aspect():
    last = torch.arange(2 * 40 * 100, dtype=torch.float32).view(1, 2, 40, 100)
    torch.testing.assert_close(fit_last_frame(last, 40, 100), last, rtol=0, atol=0)
    crop = fit_last_frame(last, 20, 20)  # square first frame: the central 40 x 40
    torch.testing.assert_close(crop, last[..., :, 30:70], rtol=0, atol=0)
    tall = fit_last_frame(last, 60, 50)  # aspect 1.2: 40 rows keep, round(40 / 1.2) = 33 columns
    assert tall.shape[-2:] == (40, 33) and torch.equal(tall, last[..., :, 33:66])


# ---- the command line ----------------------------------------------------------------------------------
def _png(path, h: int, w: int, seed: int):
    import numpy as np

    from dcvg_wan.pipelines import write_png

    write_png(path, np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


def _wan_flf_folder(root):
    """A tiny official-style FLF2V folder in diffusers' layout (transformer/ vae/ text_encoder/ tokenizer/
    image_encoder/)."""
    from dcvg_wan.image_encoder import IMAGE_PRESETS, build_image_model
    from dcvg_wan.vae import WanVAE
    from tests.dcvg_wan.conftest import make_model

    make_model("debug-i2v", image_dim=IMAGE_PRESETS["debug"].width, flf_pos_len=2 * 17).save_pretrained(
        root / "transformer", layout="diffusers")
    WanVAE.from_preset("debug").save_pretrained(root / "vae")
    tiny_text_encoder(root)
    torch.manual_seed(4)
    build_image_model("debug").save_pretrained(root / "image_encoder")
    return root


def test_cli_runs_flf2v_end_to_end(tmp_path, capsys, monkeypatch):
    from dcvg_wan.cli import main
    from dcvg_wan.image_encoder import IMAGE_PRESETS

    assert IMAGE_PRESETS["debug"].num_tokens == 17  # the debug CLIP's "257"
    root = _wan_flf_folder(tmp_path / "Wan2.1-FLF2V-Diffusers")
    first, last = _png(tmp_path / "a.png", 32, 48, 0), _png(tmp_path / "b.png", 40, 40, 1)
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--task", "flf2v-14B", "--ckpt_dir", str(root), "--first_frame", str(first),
                 "--last_frame", str(last), "--size", "48*32", "--frame_num", "5", "--sample_steps", "1",
                 "--prompt", "a red circle", "--device", "cpu", "--base_seed", "3"])
    log, err = capsys.readouterr()
    assert code == 0, err
    (video,) = tmp_path.glob("flf2v-14B_48x32_1_1_a_red_circle_*.mp4")  # the official automatic name
    assert "5 frames of 48*32" in log and video.stat().st_size > 0


def test_cli_flf2v_reads_both_frames_before_loading_and_explains_errors(tmp_path, capsys):
    from dcvg_wan.cli import main

    good = _png(tmp_path / "a.png", 16, 16, 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    empty = tmp_path / "empty_folder"  # no checkpoint: anything that got past the frame checks fails on files
    empty.mkdir()
    base = ["generate", "--task", "flf2v-14B", "--ckpt_dir", str(empty), "--device", "cpu"]
    cases = [
        ([], "needs --first_frame PATH and --last_frame PATH"),
        (["--first_frame", str(good)], "needs --first_frame PATH and --last_frame PATH"),
        (["--first_frame", str(good), "--last_frame", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--first_frame", str(bad), "--last_frame", str(good)], "cannot read --first_frame"),
        (["--first_frame", str(good), "--last_frame", str(good), "--image", str(good)], "--image is for i2v-14B"),
        (["--first_frame", str(good), "--last_frame", str(good), "--frame_num", "4"], "at least 5 frames"),
    ]
    for extra, match in cases:
        assert main([*base, *extra]) == 3, extra
        err = capsys.readouterr().err
        assert match in err, (extra, err)
    # the frames are fine: the run gets as far as the (missing) checkpoint files, exit 4
    assert main([*base, "--first_frame", str(good), "--last_frame", str(good)]) == 4
    assert "missing checkpoint files" in capsys.readouterr().err
    for argv in (["--task", "i2v-14B", "--image", str(good)], []):  # the flags belong to flf2v-14B only
        assert main(["generate", *argv, "--ckpt_dir", str(empty), "--first_frame", str(good), "--last_frame",
                     str(good)]) == 3
        assert "--first_frame/--last_frame are for --task flf2v-14B" in capsys.readouterr().err


def test_cli_runs_flf2v_on_a_dcvg_folder(tmp_path, capsys):
    """A DC-VideoGen-layout folder (DC-AE-V .pt, transformer/ with an FLF2V DiT): runs with --task
    flf2v-14B on DC-AE-V; without --task the folder reads as I2V and the error names the task."""
    from dcae_v.checkpoint import save_nvidia_checkpoint
    from dcvg_wan.cli import main
    from dcvg_wan.components import NVIDIA_DCAE
    from dcvg_wan.image_encoder import IMAGE_PRESETS, build_image_model
    from tests.dcvg_wan.test_dcvg_release import _dcae

    dcae, width = _dcae(), IMAGE_PRESETS["debug"].width
    root = tmp_path / "DC-VideoGen-FLF2V"
    c = dcae.latent_channels
    torch.manual_seed(5)
    dit = WanModel.from_preset("debug-t2v", in_dim=2 * c + 4, out_dim=c, patch=(1, 1, 1), image_dim=width,
                               flf_pos_len=2 * IMAGE_PRESETS["debug"].num_tokens)
    randomize_(dit, 5).save_pretrained(root / "transformer", layout="diffusers")
    save_nvidia_checkpoint(root / NVIDIA_DCAE, dcae.state_dict())
    tiny_text_encoder(root)
    build_image_model("debug").save_pretrained(root / "image_encoder")
    first, last = _png(tmp_path / "a.png", 32, 64, 0), _png(tmp_path / "b.png", 32, 64, 1)
    out = tmp_path / "flf.mp4"
    common = ["--ckpt_dir", str(root), "--size", "64*32", "--sample_steps", "1", "--prompt", "a red circle",
              "--save_file", str(out), "--device", "cpu"]
    frames = ["--first_frame", str(first), "--last_frame", str(last)]
    assert main(["generate", "--task", "flf2v-14B", *frames, *common, "--frame_num", "8"]) == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    assert out.is_file() and "autoencoder dcae-v" in log and "seed 42;" in log and "8 frames of 64*32" in log
    assert main(["generate", "--task", "flf2v-14B", *frames, *common, "--frame_num", "7"]) == 3
    assert "at least 8 frames on dcae-v" in capsys.readouterr().err
    # no --task: the folder's image-conditioned DiT reads as I2V; it is FLF2V, and the error says so
    assert main(["generate", "--image", str(first), *common, "--frame_num", "8"]) == 4
    assert "use --task flf2v-14B" in capsys.readouterr().err
