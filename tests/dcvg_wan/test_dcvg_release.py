"""NVIDIA's newest DC-VideoGen release and inference code (DC-Gen `applications/dc_gen/inference_demo`):
the `dc-ai/DC-Gen-Wan2.1-{T2V,I2V}-14B` folder layout, the scheduler config, the I2V size rule, the
8-bit image resize, CLIP's shortest-edge + center-crop preprocessing and the demo's defaults.

References are independent of our code: tiny folders built here in NVIDIA's layout, diffusers'
UniPCMultistepScheduler, PIL's `Image.resize`, transformers' `CLIPImageProcessor` (PIL backend)
configured as NVIDIA's `build_i2v_pipeline`, and the closed-form size arithmetic of their generate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dcae_v import DCAEV
from dcae_v.checkpoint import save_nvidia_checkpoint
from dcvg_wan import WanModel
from dcvg_wan.components import NVIDIA_DCAE, default_autoencoder, folder_is_i2v, locate_components
from dcvg_wan.errors import CheckpointError
from dcvg_wan.image_encoder import IMAGE_PRESETS, ImageEncoder, build_image_model
from dcvg_wan.latent_spaces import DCAEVSpace, WanVAESpace, resize_image
from dcvg_wan.pipelines import I2VPipeline, T2VPipeline
from dcvg_wan.sampling import NEGATIVE_PROMPT, VIDEO_NEGATIVE_PROMPT, sample_defaults
from dcvg_wan.scheduler_config import read_scheduler_config
from dcvg_wan.schedulers import flow_schedule
from tests.dcvg_wan.conftest import randomize_, tiny_text_encoder

pytestmark = pytest.mark.filterwarnings("ignore:prompt . has:UserWarning")  # the tiny vocabulary truncates

NVIDIA_AREA = 720 * 1280
CLIP_SIZE = IMAGE_PRESETS["debug"].image_size  # 28: the debug tower's "224"


# ---- tiny folders in NVIDIA's layouts ---------------------------------------------------------------
def _dcae() -> DCAEV:
    torch.manual_seed(2)
    return DCAEV.from_preset("debug").eval()


def _dit(channels: int, *, i2v: bool) -> WanModel:
    torch.manual_seed(3)
    extra = {"image_dim": IMAGE_PRESETS["debug"].width} if i2v else {}
    in_dim = 2 * channels + 4 if i2v else channels
    model = WanModel.from_preset("debug-t2v", in_dim=in_dim, out_dim=channels, patch=(1, 1, 1), **extra)
    return randomize_(model, 3).eval()


def _scheduler_config(directory, **fields) -> None:
    """What diffusers writes for NVIDIA's scheduler/ (UniPCMultistepScheduler with flow sigmas)."""
    from diffusers import UniPCMultistepScheduler

    settings = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 7.0} | fields
    UniPCMultistepScheduler(**settings).save_config(directory)


def dcgen_folder(root, *, i2v: bool, with_clip_sibling: bool = True):
    """`dc-ai/DC-Gen-Wan2.1-{T2V,I2V}-14B` in miniature: transformer/ (diffusers), the DC-AE-V .pt at the
    top, text_encoder/ tokenizer/ scheduler/; I2V's CLIP beside it, where NVIDIA takes it from
    (Wan-AI/Wan2.1-I2V-14B-720P-Diffusers, subfolder image_encoder)."""
    dcae = _dcae()
    root.mkdir(parents=True)
    _dit(dcae.latent_channels, i2v=i2v).save_pretrained(root / "transformer", layout="diffusers")
    save_nvidia_checkpoint(root / NVIDIA_DCAE, dcae.state_dict())
    tiny_text_encoder(root)
    _scheduler_config(root / "scheduler")
    if i2v and with_clip_sibling:
        torch.manual_seed(4)
        build_image_model("debug").save_pretrained(root.parent / "Wan2.1-I2V-14B-720P-Diffusers" / "image_encoder")
    return root


# ---- folder layout -------------------------------------------------------------------------------
def test_dcgen_t2v_folder_is_found_without_flags(tmp_path):
    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False)
    assert default_autoencoder(root) == "dcae-v" and not folder_is_i2v(root)
    paths = locate_components(root, i2v=False)  # no ae=: used to look for a Wan VAE and fail
    assert paths.dit == root / "transformer" and paths.dcae == root / NVIDIA_DCAE
    assert paths.vae is None and paths.scheduler == root / "scheduler" / "scheduler_config.json"
    assert (paths.text_encoder, paths.tokenizer) == (root / "text_encoder", root / "tokenizer")


def test_dcgen_i2v_folder_takes_clip_from_the_wan_diffusers_sibling(tmp_path):
    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-I2V-14B", i2v=True)
    assert folder_is_i2v(root)
    paths = locate_components(root, i2v=True)
    assert paths.dit == root / "transformer"
    assert paths.image_encoder == tmp_path / "Wan2.1-I2V-14B-720P-Diffusers" / "image_encoder"


def test_dcgen_i2v_folder_without_clip_says_where_nvidia_gets_it(tmp_path):
    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-I2V-14B", i2v=True, with_clip_sibling=False)
    with pytest.raises(CheckpointError) as err:
        locate_components(root, i2v=True)
    assert "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers" in str(err.value) and "--image_encoder" in str(err.value)
    clip = tmp_path / "clip"
    build_image_model("debug").save_pretrained(clip)
    assert locate_components(root, i2v=True, image_encoder=clip).image_encoder == clip


def test_cli_image_encoder_flag_completes_an_i2v_folder(tmp_path, capsys):
    from dcvg_wan.cli import main
    from dcvg_wan.pipelines import write_png

    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-I2V-14B", i2v=True, with_clip_sibling=False)
    image = tmp_path / "first.png"
    write_png(image, _uint8_image(32, 64))
    argv = ["generate", "--ckpt_dir", str(root), "--image", str(image), "--size", "64*32", "--frame_num", "4",
            "--sample_steps", "1", "--prompt", "a red circle", "--save_file", str(tmp_path / "v.mp4"), "--device", "cpu"]
    assert main(argv) == 4 and "--image_encoder" in capsys.readouterr().err
    torch.manual_seed(4)
    build_image_model("debug").save_pretrained(tmp_path / "clip")
    assert main([*argv, "--image_encoder", str(tmp_path / "clip")]) == 0, capsys.readouterr().err
    assert (tmp_path / "v.mp4").is_file()


def test_older_transformer_t2v_layout_and_wan_folders_keep_working(tmp_path):
    old = tmp_path / "DC-VideoGen-Wan2.1-14B"
    for name in ("transformer_t2v/config.json", "transformer_t2v/diffusion_pytorch_model.safetensors",
                 "transformer_i2v/config.json", "transformer_i2v/diffusion_pytorch_model.safetensors",
                 NVIDIA_DCAE, "text_encoder/config.json", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_bytes(b"")
    (old / "tokenizer").mkdir()
    assert default_autoencoder(old) == "dcae-v" and not folder_is_i2v(old)
    assert locate_components(old, i2v=False).dit == old / "transformer_t2v"
    assert locate_components(old, i2v=True).dit == old / "transformer_i2v"
    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    for name in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/config.json", "scheduler/scheduler_config.json"):
        (wan / name).parent.mkdir(parents=True, exist_ok=True)
        (wan / name).write_bytes(b"")
    (wan / "tokenizer").mkdir()
    assert default_autoencoder(wan) == "wan-vae"
    paths = locate_components(wan, i2v=False)
    assert paths.vae == wan / "vae" and paths.scheduler is None  # Wan tasks keep the official defaults


# ---- scheduler ----------------------------------------------------------------------------------
def test_scheduler_config_shift_is_the_one_diffusers_unipc_applies(tmp_path):
    """The folder's flow_shift, read here, shifts the sigmas as NVIDIA's
    `UniPCMultistepScheduler.from_pretrained(ckpt, subfolder="scheduler")` does. Fed the same
    unshifted grid (the official Wan one; newer diffusers start theirs at 1, see README), both agree."""
    from diffusers import UniPCMultistepScheduler

    _scheduler_config(tmp_path / "scheduler")
    settings = read_scheduler_config(tmp_path / "scheduler")
    assert settings.shift == 7.0 and settings.notes == () and settings.solver == "unipc"
    reference = UniPCMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    reference.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, 13)[:-1])
    torch.testing.assert_close(flow_schedule(12, settings.shift).sigmas, reference.sigmas, rtol=0, atol=1e-6)
    assert torch.equal(flow_schedule(12, settings.shift).timesteps, reference.timesteps.to(torch.int64))
    assert not torch.equal(flow_schedule(12, 5.0).timesteps, reference.timesteps.to(torch.int64))


def test_scheduler_config_notes_what_the_solver_does_not_follow(tmp_path):
    _scheduler_config(tmp_path / "a", solver_order=3)
    assert any("solver_order=3" in n for n in read_scheduler_config(tmp_path / "a").notes)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UniPCMultistepScheduler"}))
    bare = read_scheduler_config(tmp_path / "b")  # diffusers' defaults: no flow sigmas, epsilon, shift 1
    assert bare.shift == 1.0 and any("use_flow_sigmas" in n for n in bare.notes)
    (tmp_path / "b" / "scheduler_config.json").write_text(json.dumps({"flow_shift": -1}))
    with pytest.raises(CheckpointError, match="flow_shift"):
        read_scheduler_config(tmp_path / "b")


# ---- sizes ----------------------------------------------------------------------------------------
def _nvidia_i2v_size(img_h: int, img_w: int, mod: int) -> tuple[int, int]:
    """generate.py run_i2v, verbatim arithmetic."""
    aspect = img_h / img_w
    return (round(math.sqrt(NVIDIA_AREA * aspect)) // mod * mod, round(math.sqrt(NVIDIA_AREA / aspect)) // mod * mod)


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2)])
@pytest.mark.parametrize("image", [(688, 1280), (720, 1280), (1280, 720), (512, 512), (1000, 1333), (371, 977)])
def test_i2v_size_follows_nvidia_rounding(patch, image):
    space = DCAEVSpace(_dcae(), patch)
    h, w = _nvidia_i2v_size(*image, mod=32 * patch[1])
    r = space.area_size(81, NVIDIA_AREA, image[0] / image[1])
    assert (r.frames, r.height, r.width) == (80, h, w)  # 81 -> 80 frames: num_frames // 4 * 4
    assert space.latent_shape(r)[1] == 81 // 4


def test_i2v_size_differs_from_the_official_floor_where_nvidia_rounds_up():
    """sqrt(921600 * 688/1280) = 703.8: NVIDIA rounds to 704 -> 704; the official rule floors -> 672."""
    dcae = _dcae()
    r = DCAEVSpace(dcae, (1, 1, 1)).area_size(81, NVIDIA_AREA, 688 / 1280)
    assert (r.frames, r.height, r.width) == (80, 704, 1280)
    official = WanVAESpace(dcae, (1, 1, 1))  # the base class rule with the same strides
    official.spatial = 32
    assert official.area_size(81, NVIDIA_AREA, 688 / 1280).height == 672


# ---- image preparation ------------------------------------------------------------------------------
def _uint8_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([127 + 120 * np.sin(xx / 5.0), 127 + 120 * np.cos(yy / 3.0), xx * 255 // w], -1)
    return np.clip(smooth + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _signed(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1


@pytest.mark.parametrize("source,size", [((75, 130), (32, 64)), ((75, 130), (96, 160)), ((75, 130), (48, 48)),
                                         ((720, 1280), (704, 1280)), ((130, 75), (64, 32))])
def test_dcvg_image_resize_is_pils_default_resize(source, size):
    """NVIDIA: `img.resize((w, h))` (PIL default: bicubic, antialiased) then x / 255 * 2 - 1: equal
    pixel for pixel (Pillow's two passes, horizontal first)."""
    from PIL import Image

    a = _uint8_image(*source)
    h, w = size
    reference = _signed(np.asarray(Image.fromarray(a).resize((w, h))))
    ours = DCAEVSpace(_dcae(), (1, 1, 1)).prepare_image(_signed(a), h, w)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    if h < source[0]:  # shrinking: the official float bicubic (no antialias) is far from PIL's
        assert (resize_image(_signed(a), h, w) - reference).abs().max() * 127.5 > 10


def test_pil_resize_on_pure_noise():
    """Noise is the hard case for fixed-point rounding and clipping (torch's own uint8 antialiased
    bicubic is off by up to ~10 levels here)."""
    from PIL import Image

    from dcvg_wan.pil_resize import pil_resize

    rng = np.random.default_rng(1)
    for (h, w), (nh, nw) in (((40, 90), (28, 63)), ((37, 53), (224, 320)), ((100, 100), (100, 37)), ((3, 5), (1, 1))):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        reference = torch.from_numpy(np.asarray(Image.fromarray(a).resize((nw, nh), Image.BICUBIC)).copy())
        assert torch.equal(pil_resize(torch.from_numpy(a).permute(2, 0, 1), nh, nw).permute(1, 2, 0), reference)


def test_clip_center_crop_matches_nvidias_clip_image_processor():
    """NVIDIA's CLIPImageProcessor(shortest_edge, center crop, resample=3) vs ours at the debug size."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
    )
    torch.manual_seed(4)
    model = build_image_model("debug")
    nvidia, wan = ImageEncoder(model, preprocessing="center-crop"), ImageEncoder(model)
    for h, w in ((40, 90), (96, 54), (64, 64), (21, 33), (33, 21)):
        a = _uint8_image(h, w, seed=h)
        reference = processor(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]
        ours = nvidia.preprocess(_signed(a))
        assert ours.shape == reference.shape == (1, 3, CLIP_SIZE, CLIP_SIZE)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
        if h != w:  # the official squash sees other pixels
            assert (wan.preprocess(_signed(a)) - reference).abs().max() > 0.3
    with torch.no_grad():
        feats = model.vision_model(pixel_values=reference, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(nvidia.encode(_signed(a)), feats, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="preprocessing"):
        ImageEncoder(model, preprocessing="squash")


class _RecordingCLIP:
    """A CLIP stand-in that records what it was given."""

    def __init__(self):
        self.seen = []

    def to(self, device):
        return self

    def encode(self, image):
        self.seen.append(image.clone())
        return image.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 257, IMAGE_PRESETS["debug"].width).contiguous()


def test_dcvg_i2v_feeds_clip_the_resized_8bit_image_and_conditions_on_it():
    """NVIDIA resizes the image first; CLIP and the image chunk both see that resized image."""
    dcae, text = _dcae(), tiny_text_encoder()
    clip = _RecordingCLIP()
    pipe = I2VPipeline(_dit(dcae.latent_channels, i2v=True), DCAEVSpace(dcae, (1, 1, 1)), text, clip)
    image = _signed(_uint8_image(40, 80))
    out = pipe("a red circle", image, size="64*32", frame_num=8, steps=1, seed=0)
    assert out.video.shape == (3, 8, 32, 64)
    (seen,) = clip.seen
    torch.testing.assert_close(seen, pipe.space.prepare_image(image, 32, 64), rtol=0, atol=0)
    y = pipe.space.image_condition(seen, 8)
    with torch.no_grad():
        chunk = torch.cat([seen[:, :, None].expand(-1, -1, 4, -1, -1), torch.zeros(1, 3, 4, 32, 64)], dim=2)
        torch.testing.assert_close(y[:, 4:], dcae.encode(chunk) * dcae.scaling_factor)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and y[:, :4, 1:].abs().max() == 0


# ---- defaults -------------------------------------------------------------------------------------
def test_dcvg_defaults_are_nvidias():
    for task in ("dcvg-t2v-14B", "dcvg-i2v-14B"):
        d = sample_defaults(task)
        assert (d.size, d.steps, d.shift, d.guide_scale, d.frame_num, d.fps) == ("1280*720", 50, 5.0, 5.0, 81, 16)
        assert d.negative_prompt == VIDEO_NEGATIVE_PROMPT
    assert VIDEO_NEGATIVE_PROMPT.startswith("Bright tones, overexposed") and VIDEO_NEGATIVE_PROMPT.endswith("backwards")
    assert sample_defaults("i2v-14B").steps == 40 and sample_defaults("i2v-14B").negative_prompt.endswith(NEGATIVE_PROMPT)


def test_dcgen_t2v_folder_loads_and_samples_with_its_scheduler_and_nvidias_defaults(tmp_path):
    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False)
    pipe = T2VPipeline.from_pretrained(root, dtype=torch.float32)  # no ae=, no paths=
    assert isinstance(pipe.space, DCAEVSpace) and pipe.scheduler.shift == 7.0
    d = pipe.defaults()
    assert (d.steps, d.shift, d.negative_prompt, d.size) == (50, 7.0, VIDEO_NEGATIVE_PROMPT, "1280*720")
    run = {"size": "64*32", "frame_num": 8, "steps": 2, "seed": 1}
    default = pipe("a red circle", **run)
    same = pipe("a red circle", **run, shift=7.0, negative_prompt=VIDEO_NEGATIVE_PROMPT)
    torch.testing.assert_close(default.latent, same.latent, rtol=0, atol=0)
    assert not torch.equal(pipe("a red circle", **run, shift=5.0).latent, default.latent)
    assert not torch.equal(pipe("a red circle", **run, negative_prompt="blue square").latent, default.latent)


def test_cli_runs_nvidias_t2v_folder_without_flags_with_seed_42(tmp_path, capsys):
    from dcvg_wan.cli import main

    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False)
    out = tmp_path / "t2v.mp4"
    code = main(["generate", "--ckpt_dir", str(root), "--size", "64*32", "--frame_num", "9", "--sample_steps", "1",
                 "--prompt", "a red circle", "--save_file", str(out), "--device", "cpu"])
    log, err = capsys.readouterr()
    assert code == 0, err
    assert out.is_file() and "seed 42;" in log and "8 frames of 64*32" in log
    assert "task t2v-14B, autoencoder dcae-v (from the folder: DC-AE-V weights, no Wan VAE)" in log
    assert "sampling: unipc, 1 steps, shift 7 (" in log and "scheduler_config.json), guidance 5, diffusers sigma grid" in log


def test_cli_runs_nvidias_i2v_folder_with_center_crop_clip(tmp_path, capsys):
    from dcvg_wan.cli import main
    from dcvg_wan.pipelines import write_png

    root = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-I2V-14B", i2v=True)
    pipe = I2VPipeline.from_pretrained(root, dtype=torch.float32)
    assert pipe.image_encoder.preprocessing == "center-crop" and pipe.defaults().steps == 50
    image = tmp_path / "first.png"
    write_png(image, _uint8_image(40, 80))
    out = tmp_path / "i2v.mp4"
    code = main(["generate", "--ckpt_dir", str(root), "--image", str(image), "--size", "64*32", "--frame_num", "8",
                 "--sample_steps", "1", "--prompt", "a red circle", "--save_file", str(out), "--device", "cpu"])
    log, err = capsys.readouterr()
    assert code == 0, err
    assert out.is_file() and "seed 42;" in log and "8 frames of 64*32" in log
    assert "task i2v-14B (from the folder: an image-to-video DiT), autoencoder dcae-v" in log
    # the task came from the folder: forgetting --image says so
    assert main(["generate", "--ckpt_dir", str(root), "--prompt", "x", "--device", "cpu"]) == 3
    assert "holds an image-to-video DiT" in capsys.readouterr().err


def test_wan_i2v_folder_keeps_the_official_clip_squash(tmp_path):
    from dcvg_wan.vae import WanVAE
    from tests.dcvg_wan.conftest import make_model

    root = tmp_path / "Wan2.1-I2V-Diffusers"
    make_model("debug-i2v", image_dim=IMAGE_PRESETS["debug"].width).save_pretrained(root / "transformer",
                                                                                     layout="diffusers")
    WanVAE.from_preset("debug").save_pretrained(root / "vae")
    tiny_text_encoder(root)
    build_image_model("debug").save_pretrained(root / "image_encoder")
    pipe = I2VPipeline.from_pretrained(root, task="i2v-14B", dtype=torch.float32)
    assert isinstance(pipe.space, WanVAESpace) and pipe.image_encoder.preprocessing == "wan"
    assert pipe.defaults("1280*720").steps == 40 and pipe.scheduler is None


@pytest.mark.parametrize("steps, shift", [(12, 7.0), (50, 5.0), (5, 1.0), (1, 3.0)])
def test_diffusers_grid_is_the_one_nvidias_scheduler_sets(tmp_path, steps, shift):
    """NVIDIA samples with `UniPCMultistepScheduler.from_pretrained(folder/scheduler)`: our
    "diffusers" grid gives its sigmas and timesteps exactly (shift 1: the first sigma 1 - 1e-6)."""
    from diffusers import UniPCMultistepScheduler

    _scheduler_config(tmp_path / "scheduler", flow_shift=shift)
    reference = UniPCMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    reference.set_timesteps(steps)
    ours = flow_schedule(steps, read_scheduler_config(tmp_path / "scheduler").shift, grid="diffusers")
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)
    if steps > 1:
        assert not torch.equal(flow_schedule(steps, shift).timesteps, reference.timesteps)  # the official grid


def test_sampling_on_the_diffusers_grid_equals_diffusers_unipc_loop(tmp_path):
    """The whole UniPC integration on a toy denoiser against diffusers' scheduler stepping it."""
    from diffusers import UniPCMultistepScheduler

    from dcvg_wan.sampling import sample

    _scheduler_config(tmp_path / "scheduler", flow_shift=5.0)
    reference = UniPCMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    reference.set_timesteps(8)
    target = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 1, 4, 4)

    def velocity(x, t):  # a toy flow model: the velocity towards a fixed target, bent by t
        return (x - target) * (1 + t.float().reshape(-1, 1, 1, 1, 1) / 2000)

    noise = torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in reference.timesteps:
        x = reference.step(velocity(x, t.expand(2)), t, x, return_dict=False)[0]
    ours = sample(velocity, noise, steps=8, shift=5.0, grid="diffusers")
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    assert (sample(velocity, noise, steps=8, shift=5.0) - x).abs().max() > 1e-4  # the official grid differs


def test_dcgen_folders_sample_on_diffusers_grid_wan_folders_on_the_official_one(tmp_path):
    pipe = T2VPipeline.from_pretrained(dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False), dtype=torch.float32)
    assert pipe._grid("unipc") == "diffusers" and pipe._grid("dpm++") == "wan"
    run = {"size": "64*32", "frame_num": 8, "steps": 3, "seed": 1}
    on_grid = pipe("a red circle", **run)
    pipe.scheduler = dataclasses.replace(pipe.scheduler, grid="wan")
    assert not torch.equal(pipe("a red circle", **run).latent, on_grid.latent)


def test_a_task_that_does_not_fit_a_dcgen_folder_says_which_fits(tmp_path, capsys):
    from dcvg_wan.cli import main
    from dcvg_wan.pipelines import write_png

    i2v = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-I2V-14B", i2v=True)
    t2v = dcgen_folder(tmp_path / "DC-Gen-Wan2.1-T2V-14B", i2v=False)
    assert main(["generate", "--ckpt_dir", str(i2v), "--task", "t2v-14B", "--prompt", "x"]) == 3
    assert "its DiT (transformer/config.json) is image-to-video; drop --task" in capsys.readouterr().err
    image = tmp_path / "a.png"
    write_png(image, _uint8_image(32, 32))
    assert main(["generate", "--ckpt_dir", str(t2v), "--task", "i2v-14B", "--image", str(image), "--prompt", "x"]) == 3
    assert "is text-to-video; drop --task" in capsys.readouterr().err
