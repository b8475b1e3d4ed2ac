"""Training data: deterministic per (seed, step, index), exact crops/strides, corrupt files skipped."""

import logging

import numpy as np
import pytest
import torch

from dcae_v.train import ConfigError
from dcae_v.train.config import DataConfig
from dcae_v.train.data import ClipDataset, list_files

from .conftest import moving_clip, write_media


def _data(source, **kw) -> ClipDataset:
    return ClipDataset(DataConfig(source=str(source), **({"frames": 8, "size": 32} | kw)), seed=0)


def _find_window(sample: np.ndarray, clip: np.ndarray, max_stride: int) -> tuple[int, int, int, int] | None:
    """(start, stride, y0, x0) such that the sample is that window of the clip, else None."""
    t, h, w = sample.shape[:3]
    for stride in range(1, max_stride + 1):
        for s in range(clip.shape[0] - (t - 1) * stride):
            win = clip[s : s + (t - 1) * stride + 1 : stride]
            for y in range(clip.shape[1] - h + 1):
                for x in range(clip.shape[2] - w + 1):
                    if np.array_equal(win[:, y : y + h, x : x + w], sample):
                        return s, stride, y, x
    return None


def _uint8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x + 1) * 127.5).to(torch.uint8).permute(1, 2, 3, 0).numpy()


def test_samples_are_exact_windows_with_strides(media_dir):
    ds = _data(media_dir, max_stride=2, cache_decoded=False)
    clips = {f"clip{i}.mkv": moving_clip(t, 40, 40 + 8 * i, seed=i) for i, t in enumerate((24, 16, 20, 12))}
    strides = set()
    for step in range(6):
        rng = np.random.default_rng([0, step, 0, 0])
        path = ds.entries[int(rng.integers(len(ds.entries)))]
        x = ds.sample(step, 0)
        if path.suffix == ".png":
            assert x.shape == (3, 1, 32, 32)
            continue
        assert x.shape == (3, 8, 32, 32) and x.min() >= -1 and x.max() <= 1
        found = _find_window(_uint8(x), clips[path.name], 2)
        assert found is not None, f"step {step}: sample is not a strided window of {path.name}"
        strides.add(found[1])
    assert strides  # at least one video was drawn


def test_deterministic_given_seed_and_step(media_dir):
    a, b = _data(media_dir, max_stride=2), _data(media_dir, max_stride=2, cache_decoded=False)
    for step in (0, 5, 17):
        ba, bb = a.batch(step, range(4)), b.batch(step, range(4))
        for ga, gb in zip(ba.groups(), bb.groups(), strict=True):
            assert torch.equal(ga, gb)
    assert not torch.equal(a.sample(0, 0), a.sample(1, 0)) or not torch.equal(a.sample(2, 0), a.sample(3, 0))


def test_mixed_batch_groups_images_and_videos(media_dir):
    ds = _data(media_dir, image_repeat=4)  # 4 videos, 2 images x 4 -> images 2/3 of the draws
    kinds = set()
    for step in range(10):
        b = ds.batch(step, range(4))
        assert b.count == 4
        if b.video is not None:
            assert b.video.shape[1:] == (3, 8, 32, 32)
            kinds.add("video")
        if b.image is not None:
            assert b.image.shape[1:] == (3, 1, 32, 32)
            kinds.add("image")
    assert kinds == {"video", "image"}


def test_corrupt_files_are_skipped_logged_and_counted(tmp_path, caplog):
    write_media(tmp_path / "good.mkv", moving_clip(12, 32, 32, 0))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 50)
    full = tmp_path / "full.mkv"
    write_media(full, moving_clip(12, 32, 32, 1))
    (tmp_path / "truncated.mkv").write_bytes(full.read_bytes()[:300])
    full.unlink()
    write_media(tmp_path / "short.mkv", moving_clip(4, 32, 32, 2))  # fewer frames than data.frames
    ds = _data(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dcae_v.train"):
        for step in range(12):
            assert ds.sample(step, 0).shape == (3, 8, 32, 32)
    assert {p.rsplit("/", 1)[-1] for p in ds.bad} == {"garbage.mp4", "truncated.mkv", "short.mkv"}
    for step in range(12, 40):  # bad files drawn again are skipped silently, and not counted again
        ds.sample(step, 0)
    assert ds.skipped == 3  # distinct files (`skipped_files` in the metrics), not re-draws
    assert sum("skipping" in r.message for r in caplog.records) == 3  # one warning per bad file


def test_all_files_bad_raises(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x" * 100)
    with pytest.raises(Exception, match="no usable file after 32 draws"):
        _data(tmp_path).sample(0, 0)


def test_list_file_and_small_images(tmp_path):
    (tmp_path / "sub").mkdir()
    write_media(tmp_path / "sub" / "tiny.png", moving_clip(1, 16, 20, 3), "png", "rgb24")
    (tmp_path / "list.txt").write_text("# training files\n\nsub/tiny.png\n")
    assert list_files(str(tmp_path / "list.txt")) == [tmp_path / "sub" / "tiny.png"]
    x = _data(tmp_path / "list.txt").sample(0, 0)  # 16x20 upscaled so a 32x32 crop exists
    assert x.shape == (3, 1, 32, 32)


def test_bad_sources(tmp_path, media_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        list_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no videos or images in folder"):
        list_files(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"optim.batch_size=7 is larger than the data \(6 files"):
        _data(media_dir).check_batch(7)


# ---- sources that are not a folder ----------------------------------------------------------
def test_a_single_video_is_a_one_clip_source(media_dir):
    """`data.source=clip.mp4` overfits one video: every sample is a window of it, and a batch
    larger than one file is fine (it holds several windows and crops of the clip)."""
    ds = _data(media_dir / "clip0.mkv", max_stride=2)
    assert ds.files == [media_dir / "clip0.mkv"]
    ds.check_batch(4)
    clip = moving_clip(24, 40, 40, seed=0)
    for step in range(3):
        assert _find_window(_uint8(ds.sample(step, 1)), clip, 2) is not None
    assert list_files(str(media_dir / "img0.png")) == [media_dir / "img0.png"]


def test_a_binary_file_that_is_not_media_is_refused(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"neither a folder, a video/image .* nor a text list of files"):
        list_files(str(blob))


def test_a_non_list_text_file_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text('{"clips": [\n  "a.mp4"\n]}\n')
    with pytest.raises(ConfigError, match=r"manifest.json is not a list of videos/images: line 1 \('\{\"clips\": \['\)"):
        list_files(str(tmp_path / "manifest.json"))


def test_missing_listed_files_are_reported_when_the_list_is_read(tmp_path, media_dir, caplog):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{media_dir / 'clip0.mkv'}\n{media_dir / 'clip1.mkv'}\n{tmp_path / 'typo.mkv'}\n")
    with caplog.at_level(logging.WARNING, logger="dcae_v.train"):
        ds = _data(listing)
    assert ds.files == [media_dir / "clip0.mkv", media_dir / "clip1.mkv"]  # left out: never drawn
    expected = f"1 of 3 files listed in {listing} do not exist and are left out: {tmp_path / 'typo.mkv'}"
    assert [r.getMessage() for r in caplog.records] == [expected]
    listing.write_text("typo1.mkv\ntypo2.mkv\n")
    with pytest.raises(ConfigError, match=r"none of the 2 files listed in .* exists \(e.g. .*typo1.mkv\); relative"):
        list_files(str(listing))
