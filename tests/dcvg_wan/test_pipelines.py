"""T2V/I2V pipelines over the Wan VAE and DC-AE-V: sizes, seeds, conditioning, wiring checks."""

from __future__ import annotations

import pytest
import torch

from dcae_v import DCAEV
from dcvg_wan import WanModel
from dcvg_wan.errors import CheckpointError, InputError
from dcvg_wan.latent_spaces import DCAEVSpace, WanVAESpace
from dcvg_wan.pipelines import I2VPipeline, T2VPipeline, parse_size
from dcvg_wan.sampling import make_noise, sample, wan_denoiser
from dcvg_wan.vae import WanVAE
from tests.dcvg_wan.conftest import randomize_, tiny_text_encoder


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


def _dit(in_dim: int, out_dim: int, *, i2v: bool = False, patch=(1, 2, 2)) -> WanModel:
    torch.manual_seed(3)
    extra = {"image_dim": 16} if i2v else {}
    model = WanModel.from_preset("debug-t2v", in_dim=in_dim, out_dim=out_dim, patch=patch, **extra)
    return randomize_(model, 3).eval()


class _FakeCLIP:
    """Stands in for the CLIP encoder: [B, 3, H, W] -> [B, 257, 16] features that depend on the image."""

    def to(self, device):
        return self

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 257, 16).contiguous()


@pytest.fixture(scope="module")
def wan_vae() -> WanVAE:
    torch.manual_seed(1)
    return randomize_(WanVAE.from_preset("debug"), 1).eval()


@pytest.fixture(scope="module")
def dcae() -> DCAEV:
    torch.manual_seed(2)
    return DCAEV.from_preset("debug", chunk_size=4).eval()


def test_t2v_on_wan_vae_sizes_and_seeds(text_encoder, wan_vae):
    pipe = T2VPipeline(_dit(4, 4), WanVAESpace(wan_vae, (1, 2, 2)), text_encoder)
    notes = []
    out = pipe("a red circle moving left", size="24*16", frame_num=6, steps=3, seed=7, log=notes.append)
    assert out.video.shape == (3, 5, 16, 16)  # 6 -> 5 frames (4k+1), 24 -> 16 px (multiple of 16)
    assert out.latent.shape == (1, 4, 2, 2, 2)
    settings = [n for n in notes if n.startswith("sampling:")]
    notes = [n for n in notes if n.startswith("note:")]
    assert len(notes) == 2 and "5" in notes[0] and "16*16" in notes[1]
    assert settings == ["sampling: unipc, 3 steps, shift 5, guidance 5, wan sigma grid"]
    assert out.video.abs().max() <= 1
    again = pipe("a red circle moving left", size="16*16", frame_num=5, steps=3, seed=7)
    torch.testing.assert_close(again.video, out.video, rtol=0, atol=0)
    other = pipe("a red circle moving left", size="16*16", frame_num=5, steps=3, seed=8)
    assert not torch.equal(other.video, out.video)
    prompt = pipe("a blue square moving right", size="16*16", frame_num=5, steps=3, seed=7)
    assert not torch.equal(prompt.latent, out.latent)
    assert set(out.timings) >= {"text_encoder", "sampling", "decode"}


def test_t2v_equals_its_stages_composed_by_hand(text_encoder, wan_vae):
    """The pipeline = text features -> seeded noise -> CFG sampling -> VAE decode, nothing else."""
    dit, space = _dit(4, 4), WanVAESpace(wan_vae, (1, 2, 2))
    pipe = T2VPipeline(dit, space, text_encoder)
    out = pipe("a red circle", size="16*16", frame_num=5, steps=4, seed=3, guide_scale=4.0, negative_prompt="blue")
    cond, uncond = text_encoder.encode(["a red circle", "blue"])
    with torch.no_grad():
        latent = sample(wan_denoiser(dit, cond[None]), make_noise((1, 4, 2, 2, 2), 3), steps=4, shift=5.0,
                        guide_scale=4.0, uncond_fn=wan_denoiser(dit, uncond[None]))
        video = wan_vae.decode(latent).clamp(-1, 1)
    torch.testing.assert_close(out.latent, latent, rtol=0, atol=0)
    torch.testing.assert_close(out.video, video[0], rtol=0, atol=0)


def test_t2v_on_dcae_v(text_encoder, dcae):
    c = dcae.latent_channels
    pipe = T2VPipeline(_dit(c, c, patch=(1, 1, 1)), DCAEVSpace(dcae, (1, 1, 1)), text_encoder)
    out = pipe("a blue square", size="64*32", frame_num=9, steps=2, seed=0, log=lambda _m: None)
    assert out.video.shape == (3, 8, 32, 64)  # DC-AE-V: multiples of 4 frames, 32 px
    assert out.latent.shape == (1, c, 2, 1, 2)


def test_dcae_v_image_chunk_conditioning(dcae):
    """Paper 3.4: the image fills the first temporal group (4 copies), black frames after; the mask
    marks the first latent frame; the conditioning latent is DC-AE-V's latent x scaling_factor."""
    space = DCAEVSpace(dcae, (1, 1, 1))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    chunk = space.image_chunk(image, 12)
    assert chunk.shape == (1, 3, 12, 32, 32)
    for f in range(4):
        torch.testing.assert_close(chunk[:, :, f], image, rtol=0, atol=0)
    assert chunk[:, :, 4:].abs().max() == 0
    y = space.image_condition(image, 12)
    assert y.shape == (1, 4 + dcae.latent_channels, 3, 1, 1)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and y[:, :4, 1:].abs().max() == 0
    with torch.no_grad():
        expected = dcae.encode(chunk) * dcae.scaling_factor
    torch.testing.assert_close(y[:, 4:], expected)


def test_wan_vae_conditioning_is_the_official_one(wan_vae):
    """Official I2V: the image then F-1 black frames, VAE-encoded (normalised), after a 4-channel mask."""
    space = WanVAESpace(wan_vae, (1, 2, 2))
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    chunk = space.image_chunk(image, 9)
    torch.testing.assert_close(chunk[:, :, 0], image, rtol=0, atol=0)
    assert chunk[:, :, 1:].abs().max() == 0
    y = space.image_condition(image, 9)
    with torch.no_grad():
        torch.testing.assert_close(y[:, 4:], wan_vae.encode(chunk))
    assert y[:, :4, 0].min() == 1 and y[:, :4, 1:].abs().max() == 0


def test_i2v_on_dcae_v_runs_with_area_sizing(text_encoder, dcae):
    c = dcae.latent_channels
    dit = _dit(2 * c + 4, c, i2v=True, patch=(1, 1, 1))
    pipe = I2VPipeline(dit, DCAEVSpace(dcae, (1, 1, 1)), text_encoder, _FakeCLIP())
    image = torch.rand(3, 40, 80) * 2 - 1  # aspect h/w = 0.5
    out = pipe("a red circle", image, size="64*32", frame_num=8, steps=2, seed=1)
    assert out.video.shape == (3, 8, 32, 64)  # area 2048 at aspect 0.5 -> 64 x 32
    notes = []
    square = pipe("a red circle", torch.rand(3, 40, 40) * 2 - 1, size="64*32", frame_num=8, steps=1, seed=1,
                  log=notes.append)
    assert square.video.shape[-2:] == (32, 32)
    assert any("read as a maximum area (2048 px) at the image's aspect (40x40): generating 32*32" in n for n in notes)
    notes.clear()
    pipe("a red circle", image, size="64*32", frame_num=8, steps=1, seed=1, log=notes.append)
    assert not any("maximum area" in n for n in notes)  # the size asked for is the size made: no note
    with pytest.raises(InputError, match="image"):
        pipe("a red circle", torch.rand(2, 3, 8, 8), size="64*32", frame_num=8, steps=1)


def test_mismatched_dit_and_autoencoder_are_explained(text_encoder, wan_vae, dcae):
    with pytest.raises(CheckpointError, match="dcae-v"):
        T2VPipeline(_dit(4, 4), DCAEVSpace(dcae, (1, 2, 2)), text_encoder)  # Wan-VAE DiT on DC-AE-V
    with pytest.raises(CheckpointError, match="in_dim"):
        I2VPipeline(_dit(4, 4, i2v=True), WanVAESpace(wan_vae, (1, 2, 2)), text_encoder, _FakeCLIP())
    with pytest.raises(CheckpointError, match="T2V"):
        I2VPipeline(_dit(12, 4), WanVAESpace(wan_vae, (1, 2, 2)), text_encoder, _FakeCLIP())


@pytest.mark.parametrize("bad", ["832x", "0*480", "abc", "832*480*3"])
def test_bad_size_strings(bad):
    with pytest.raises(InputError, match="size"):
        parse_size(bad)
    assert parse_size("832*480") == (832, 480)


def test_vae_tiling_option_reaches_both_autoencoders(tmp_path, capsys):
    """from_pretrained(vae_tiling=True) / `generate --vae_tiling`: the Wan VAE gets diffusers' tile
    defaults, DC-AE-V 256-px tiles; generation runs with it."""
    from dcae_v import DCAEV
    from dcvg_wan.cli import main
    from dcvg_wan.pipelines import DCAEV_TILE, T2VPipeline
    from dcvg_wan.vae import WanVAE
    from dcvg_wan.vae_tiling import TileSpec
    from tests.dcvg_wan.conftest import make_model, tiny_text_encoder

    ckpt = tmp_path / "wan"
    make_model("debug-t2v").save_pretrained(ckpt / "transformer", layout="diffusers")
    WanVAE.from_preset("debug").save_pretrained(ckpt / "vae")
    tiny_text_encoder(ckpt)
    pipe = T2VPipeline.from_pretrained(ckpt, task="t2v-1.3B", dtype=torch.float32, vae_tiling=True)
    assert pipe.space.model.tiling == TileSpec(256, 256, 192, 192)
    assert T2VPipeline.from_pretrained(ckpt, task="t2v-1.3B", dtype=torch.float32).space.model.tiling is None
    DCAEV.from_preset("debug", chunk_size=4, latent_channels=4).save_pretrained(tmp_path / "dcae")
    dc = T2VPipeline.from_pretrained(ckpt, task="t2v-1.3B", ae="dcae-v", dcae_ckpt=tmp_path / "dcae",
                                     dtype=torch.float32, vae_tiling=True)
    assert dc.space.tile_size == DCAEV_TILE
    out = tmp_path / "v.mp4"
    assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "5",
                 "--sample_steps", "1", "--prompt", "a red circle", "--vae_tiling", "--save_file", str(out)]) == 0, \
        capsys.readouterr().err
    assert out.is_file()


def test_t2i_task_writes_one_png_like_the_official_command(tmp_path, capsys):
    """`--task t2i-14B` (official: a T2V checkpoint, frame_num 1, a .png named like the videos)."""
    import av

    from dcvg_wan.cli import main
    from dcvg_wan.generate import default_save_file
    from dcvg_wan.vae import WanVAE
    from tests.dcvg_wan.conftest import make_model, tiny_text_encoder

    ckpt = tmp_path / "wan"
    make_model("debug-t2v").save_pretrained(ckpt / "transformer", layout="diffusers")
    WanVAE.from_preset("debug").save_pretrained(ckpt / "vae")
    tiny_text_encoder(ckpt)
    out = tmp_path / "image.png"
    argv = ["generate", "--task", "t2i-14B", "--ckpt_dir", str(ckpt), "--size", "48*32", "--sample_steps", "1",
            "--prompt", "a red circle", "--save_file", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 1 and frames[0].shape == (32, 48, 3)
    assert default_save_file("t2i-14B", "1280*720", "a cat").endswith(".png")
    assert default_save_file("t2v-14B", "1280*720", "a cat", 8, 1).startswith("t2v-14B_1280x720_8_1_a_cat_")
    assert main([*argv, "--frame_num", "5"]) == 3
    assert "generates one image" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["vace-1.3B", "vace-14B"])  # flf2v-14B runs: tests/dcvg_wan/test_flf2v.py
def test_official_tasks_we_do_not_run_say_so(tmp_path, capsys, task):
    from dcvg_wan.cli import main

    assert main(["generate", "--task", task, "--ckpt_dir", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"--task {task}" in err and "not implemented here" in err and "t2i-14B" in err


def test_from_pretrained_without_a_folder_says_how_to_get_the_demo():
    """ckpt_dir=None (the signature allows it for paths=) used to end in a TypeError from Path(None)."""
    from dcvg_wan.errors import CheckpointError
    from dcvg_wan.pipelines import T2VPipeline

    with pytest.raises(CheckpointError, match="embedded_default"):
        T2VPipeline.from_pretrained(None)
