"""`dcvg-wan adapt` end to end on tiny models: cache, three stages, outputs usable by the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcae_v import DCAEV
from dcae_v.io import write_video
from dcvg_wan import WanModel
from dcvg_wan.adapt_command import list_videos, parse_overrides, resize_crop
from dcvg_wan.cli import main
from dcvg_wan.errors import InputError
from dcvg_wan.latent_spaces import DCAEVSpace
from dcvg_wan.pipelines import T2VPipeline
from dcvg_wan.vae import WanVAE
from tests.dcvg_wan.conftest import make_model, tiny_text_encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    ckpt = root / "wan"
    make_model("debug-t2v").save_pretrained(ckpt / "transformer", layout="diffusers")
    torch.manual_seed(0)
    WanVAE.from_preset("debug").save_pretrained(ckpt / "vae")
    tiny_text_encoder(ckpt)
    torch.manual_seed(1)
    DCAEV.from_preset("debug", chunk_size=4).save_pretrained(root / "dcae")
    data = root / "videos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(["a red circle moving left", "a blue square moving right", "a red square"]):
        frames = np.repeat(rng.integers(0, 255, (1, 40, 48, 3), dtype=np.uint8), 10, axis=0)
        frames[:, :, : 4 * i + 4] = 255 - frames[:, :, : 4 * i + 4]  # a little difference over time/clips
        write_video(data / f"clip{i}.mp4", frames, 16)
        (data / f"clip{i}.txt").write_text(prompt)
    return root, ckpt, data


def test_adapt_end_to_end_and_resume(setup, capsys):
    root, ckpt, data = setup
    out = root / "out"
    argv = ["adapt", "--ckpt_dir", str(ckpt), "--dcae_ckpt", str(root / "dcae"), "--data", str(data),
            "--out", str(out), "--size", "32*32", "--frame_num", "9", "--preset", "debug",
            "--set", "embedder.steps=4", "head.steps=4", "lora.steps=2", "resolution=[]",
            "timesteps=dcgen", "flow_shift=5.0", "cond_dropout=0.1"]  # the Wan presets' DC-Gen recipe
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "cache" / "index.json").is_file()
    from ae_adapt import LatentCache
    from dcvg_wan.adapt_command import DCGEN_NULL_PROMPT

    cache = LatentCache(out / "cache")  # the null prompt of DC-Gen's text dropout is cached once
    assert cache.index["null"]["prompt"] == DCGEN_NULL_PROMPT
    assert cache.null_cond()["context"].shape == cache[0]["context"].shape
    model = WanModel.from_pretrained(out / "model")
    assert (model.config.in_dim, model.config.out_dim, model.config.patch) == (8, 8, (1, 1, 1))
    assert (out / "lora_comfy.safetensors").is_file() and (out / "adapter").is_dir()
    base = WanModel.from_pretrained(ckpt / "transformer")
    changed = [k for k, v in model.state_dict().items() if k.startswith("blocks.") and not torch.equal(v, base.state_dict()[k])]
    assert changed, "the LoRA stage (merged) should change block weights"
    # the adapted DiT runs in the DC-AE-V pipeline
    dcae = DCAEV.from_pretrained(root / "dcae")
    pipe = T2VPipeline(model, DCAEVSpace(dcae, (1, 1, 1)), tiny_text_encoder())
    video = pipe("a red circle", size="32*32", frame_num=8, steps=2, seed=0, negative_prompt="a")
    assert video.video.shape == (3, 8, 32, 32)
    # ... and through `dcvg-wan generate --dit` on the base checkpoint folder with the adapted DiT
    mp4 = root / "adapted.mp4"
    assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--ae", "dcae-v", "--dcae_ckpt",
                 str(root / "dcae"), "--dit", str(out / "model"), "--size", "32*32", "--frame_num", "8",
                 "--sample_steps", "2", "--prompt", "a red circle", "--save_file", str(mp4)]) == 0
    assert mp4.is_file()
    # OUT/model already holds the LoRA: applying OUT's LoRA files to it again is refused, not doubled
    capsys.readouterr()
    for lora in (out / "adapter", out / "lora_comfy.safetensors"):
        assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--ae", "dcae-v", "--dcae_ckpt",
                     str(root / "dcae"), "--dit", str(out / "model"), "--size", "32*32", "--frame_num", "8",
                     "--sample_steps", "2", "--lora", str(lora), "--save_file", str(root / "twice.mp4")]) == 3
        assert "is already merged into the DiT" in capsys.readouterr().err
    # running again resumes: every stage is finished, the outputs are rewritten identically
    assert main(argv) == 0
    again = WanModel.from_pretrained(out / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_data_without_prompts_is_refused(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(InputError, match=r"a\.mp4"):
        list_videos(tmp_path)
    with pytest.raises(InputError, match="neither a folder"):
        list_videos(tmp_path / "a.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no videos"):
        list_videos(tmp_path / "empty")


def test_data_folders_are_searched_recursively_and_bad_videos_are_skipped_with_a_warning(tmp_path):
    """One unreadable and one too-short video among good ones: named and skipped, not the end of
    hours of encoding; the good one in a subfolder is found; only bad ones is an error."""
    from dcvg_wan.adapt_command import iter_clips

    data = tmp_path / "videos"
    (data / "part1").mkdir(parents=True)
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    write_video(data / "part1" / "good.mp4", frames, 16)
    write_video(data / "short.mp4", frames[:4], 16)
    (data / "broken.mp4").write_bytes(b"not a video")
    for name in ("part1/good", "short", "broken"):
        (data / f"{name}.txt").write_text("a red circle")
    assert [p.name for p, _ in list_videos(data)] == ["broken.mp4", "good.mp4", "short.mp4"]
    with pytest.warns(UserWarning) as caught:
        clips = list(iter_clips(data, frames=8, width=32, height=32))
    assert [c["name"] for c in clips] == ["good.mp4"] and clips[0]["video"].shape == (3, 8, 32, 32)
    said = " ".join(str(w.message) for w in caught)
    assert "cannot read" in said and "broken.mp4" in said and "short.mp4 has 4 frames" in said
    assert "2 of 3 videos skipped" in said
    (data / "part1" / "good.mp4").unlink()
    (data / "part1" / "good.txt").unlink()
    with pytest.raises(InputError, match="no usable video"), pytest.warns(UserWarning):
        list(iter_clips(data, frames=8, width=32, height=32))


def test_jsonl_list_and_overrides(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"video": "x.mp4", "prompt": "a cat"}\n\n')
    assert list_videos(tmp_path / "list.jsonl") == [(tmp_path / "x.mp4", "a cat")]
    (tmp_path / "bad.jsonl").write_text('{"video": "x.mp4"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        list_videos(tmp_path / "bad.jsonl")
    assert parse_overrides(["embedder.steps=10", "lora_rank=8", "name=abc"]) == {
        "embedder": {"steps": 10}, "lora_rank": 8, "name": "abc"}


@pytest.mark.parametrize("override, message", [
    ({"lora": {"ema_decay": 1.5}}, "ema_decay must be in"),
    ({"lora": {"ema_decay": "abc"}}, "expected a number"),
    ({"embedder": {"no_such_field": 1}}, "bad override"),
])
def test_bad_train_overrides_are_input_errors(override, message):
    from dcvg_wan.adapt_command import _apply_overrides

    with pytest.raises(InputError, match=message):
        _apply_overrides("debug", override)


def test_resize_crop_covers_then_centres():
    x = torch.arange(2 * 3 * 40 * 80, dtype=torch.float32).reshape(3, 2, 40, 80)
    y = resize_crop(x, 20, 20)
    assert y.shape == (3, 2, 20, 20)
    torch.testing.assert_close(y, torch.nn.functional.avg_pool2d(x.transpose(0, 1), 2).transpose(0, 1)[:, :, :, 10:30])


def test_bad_frame_num(setup, tmp_path, capsys):
    _root, ckpt, data = setup
    code = main(["adapt", "--ckpt_dir", str(ckpt), "--dcae_ckpt", "default", "--data", str(data), "--out",
                 str(tmp_path), "--frame_num", "8"])
    assert code == 3 and "4n+1" in capsys.readouterr().err


def test_adapt_i2v_and_generate_with_the_adapted_model(setup, tmp_path, capsys):
    """I2V: the cache holds both spaces' first-frame conditioning and CLIP features; the adapted
    DiT takes noise + mask 4 + image chunk (DC-AE-V) channels and runs `generate --image`."""
    from dcvg_wan.image_encoder import build_image_model

    root, _ckpt, data = setup
    ckpt = tmp_path / "wan-i2v"
    make_model("debug-i2v", image_dim=32).save_pretrained(ckpt / "transformer", layout="diffusers")
    torch.manual_seed(0)
    WanVAE.from_preset("debug").save_pretrained(ckpt / "vae")
    tiny_text_encoder(ckpt)
    torch.manual_seed(2)
    build_image_model("debug").save_pretrained(ckpt / "image_encoder")
    out = tmp_path / "out"
    assert main(["adapt", "--task", "i2v-14B", "--ckpt_dir", str(ckpt), "--dcae_ckpt", str(root / "dcae"),
                 "--data", str(data), "--out", str(out), "--size", "32*32", "--frame_num", "9", "--preset", "debug",
                 "--set", "embedder.steps=3", "head.steps=3", "lora.steps=2", "resolution=[]"]) == 0, \
        capsys.readouterr().err
    model = WanModel.from_pretrained(out / "model")
    assert (model.config.in_dim, model.config.out_dim) == (8 + 4 + 8, 8)
    image = tmp_path / "first.png"
    write_video(image.with_suffix(".mp4"), np.full((1, 32, 32, 3), 128, np.uint8), 16)
    mp4 = tmp_path / "i2v.mp4"
    assert main(["generate", "--task", "i2v-14B", "--ckpt_dir", str(ckpt), "--ae", "dcae-v", "--dcae_ckpt",
                 str(root / "dcae"), "--dit", str(out / "model"), "--image", str(image.with_suffix(".mp4")),
                 "--size", "32*32", "--frame_num", "8", "--sample_steps", "2", "--prompt", "a red circle",
                 "--save_file", str(mp4)]) == 0, capsys.readouterr().err
    assert mp4.is_file()


def test_task_comes_from_the_dit_and_a_mismatch_is_refused():
    """The Table 8 schedule follows the DiT: a 1.3B model is not adapted on the 14B schedule because
    --task was left out, and an I2V model needs --task i2v-14B (its cache holds the image
    conditioning); a custom architecture takes the --task given."""
    from dcvg_wan.adapt_command import task_of
    from dcvg_wan.config import get_preset

    assert task_of(get_preset("t2v-1.3B"), None) == "t2v-1.3B"
    assert task_of(get_preset("t2v-14B"), None) == "t2v-14B"
    assert task_of(get_preset("debug-t2v"), None) == "t2v-14B" and task_of(get_preset("debug-t2v"), "t2v-1.3B") == "t2v-1.3B"
    assert task_of(get_preset("i2v-14B-720p"), "i2v-14B") == "i2v-14B"
    for config, asked, fix in (("t2v-1.3B", "t2v-14B", "pass --task t2v-1.3B"), ("i2v-14B-480p", None, "pass --task i2v-14B"),
                               ("t2v-14B", "i2v-14B", "pass --task t2v-14B"), ("debug-i2v", "t2v-14B", "i2v-14B")):
        with pytest.raises(InputError, match=fix):
            task_of(get_preset(config), asked)
