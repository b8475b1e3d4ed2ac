"""Fast tests for tools/world/clip_world.py (tiny clips, a few seconds in total)."""

import hashlib
import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "world" / "clip_world.py"
_spec = importlib.util.spec_from_file_location("clip_world", _PATH)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)

T, H, W = 4, 16, 24  # non-square, so a swapped H/W shows up
HELDOUT0 = cw.HELDOUT_SEEDS.start


def test_registry_has_all_three_families():
    families = {name.split("_", 1)[0] for name in cw.SOURCES}
    assert families == {"lavfi", "photo", "synth"}
    assert set(cw.SMOOTH_SOURCES) <= set(cw.SOURCES)
    for name in cw.SOURCES:
        assert callable(cw.SOURCES[name])


@pytest.mark.parametrize("source", list(cw.SOURCES))
def test_source_shape_dtype_and_determinism(source):
    a = cw.make_clip(source, 3, T, H, W)
    assert a.shape == (T, H, W, 3) and a.dtype == np.uint8
    assert np.array_equal(a, cw.make_clip(source, 3, T, H, W)), "same seed must give the same clip"
    assert not np.array_equal(a, cw.make_clip(source, 4, T, H, W)), "different seeds must differ"
    assert not np.array_equal(a, cw.make_clip(source, HELDOUT0 + 3, T, H, W))


@pytest.mark.parametrize("source", ["lavfi_testsrc2", "photo_rotate", "synth_shapes"])
def test_other_sizes(source):
    assert cw.make_clip(source, 0, 1, 16, 16).shape == (1, 16, 16, 3)  # T=1, minimum size
    assert cw.make_clip(source, 0, 3, 34, 18).shape == (3, 34, 18, 3)


@pytest.mark.parametrize("source", cw.SMOOTH_SOURCES)
def test_motion_is_real_and_smooth(source):
    for seed in (1, HELDOUT0 + 1):
        a = cw.make_clip(source, seed, 12, 32, 32).astype(np.int16)
        other = cw.make_clip(source, seed + 100, 12, 32, 32).astype(np.int16)
        for t in range(11):
            assert np.any(a[t] != a[t + 1]), f"frames {t} and {t + 1} are identical"
        consecutive = np.abs(np.diff(a, axis=0)).mean()
        unrelated = np.abs(a - other).mean()  # frames of an independent clip
        assert consecutive < 0.35 * unrelated, (consecutive, unrelated)


def test_lavfi_sources_use_the_seed_in_the_graph():
    for kind in cw._LAVFI:
        g0, g1 = (cw.lavfi_graph(kind, s, T, H, W) for s in (0, 1))
        assert g0 != g1, kind


def test_photo_pools_are_disjoint_distinct_and_offline():
    assert not set(cw.TRAIN_PHOTOS) & set(cw.HELDOUT_PHOTOS)
    assert {"astronaut", "coffee"} <= set(cw.HELDOUT_PHOTOS)
    digests = {}
    for name in cw.TRAIN_PHOTOS + cw.HELDOUT_PHOTOS:
        img = cw.load_photo(name)  # bundled in the wheel: must load without network
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
        digests[name] = hashlib.sha1(img.tobytes()).hexdigest()
    # no held-out photo may sneak into train under another name (like cat == chelsea)
    train = {digests[n] for n in cw.TRAIN_PHOTOS}
    assert not train & {digests[n] for n in cw.HELDOUT_PHOTOS}


def test_split_rule_for_sampled_clips():
    assert cw.split_of_seed(0) == "train" and cw.split_of_seed(HELDOUT0 - 1) == "train"
    assert cw.split_of_seed(HELDOUT0) == "heldout"
    used = {"train": set(), "heldout": set()}
    sources = {"train": set(), "heldout": set()}
    for split in cw.SPLITS:
        for seed in range(300):
            name, clip_seed = cw.sample_spec(seed, split)
            assert cw.split_of_seed(clip_seed) == split
            assert (name, clip_seed) == cw.sample_spec(seed, split)
            sources[split].add(name)
            if cw.photo_of(name, clip_seed):
                used[split].add(cw.photo_of(name, clip_seed))
    assert used["train"] <= set(cw.TRAIN_PHOTOS) and used["heldout"] <= set(cw.HELDOUT_PHOTOS)
    assert not used["train"] & used["heldout"]
    assert used["heldout"] == set(cw.HELDOUT_PHOTOS)
    for split in cw.SPLITS:  # every family is drawn
        assert {s.split("_")[0] for s in sources[split]} == {"lavfi", "photo", "synth"}


def test_photo_of_matches_the_rendered_photo():
    for seed in (5, HELDOUT0 + 5):
        photo = cw.photo_of("photo_pan", seed)
        forced = cw.photo_clip("pan", seed, 3, 16, 16, photo=photo)
        assert np.array_equal(forced, cw.make_clip("photo_pan", seed, 3, 16, 16))


def test_sample_clip_is_deterministic_and_split_dependent():
    name, a = cw.sample_clip(7, T, H, W, split="train")
    name2, b = cw.sample_clip(7, T, H, W, split="train")
    assert name == name2 and np.array_equal(a, b)
    assert a.shape == (T, H, W, 3) and a.dtype == np.uint8
    assert cw.sample_spec(7, "train")[1] != cw.sample_spec(7, "heldout")[1]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        cw.make_clip("synth_shapes", 0, 2, 17, 16)  # odd
    with pytest.raises(ValueError):
        cw.make_clip("synth_shapes", 0, 2, 14, 16)  # too small
    with pytest.raises(ValueError):
        cw.make_clip("lavfi_testsrc", 0, 0, 16, 16)  # no frames
    with pytest.raises(ValueError):
        cw.make_clip("photo_pan", -1, 2, 16, 16)
    with pytest.raises(KeyError):
        cw.make_clip("nope", 0, 2, 16, 16)
    with pytest.raises(ValueError):
        cw.sample_spec(cw.HELDOUT_SEEDS.start, "train")  # per-split seeds stay below 1e9
    with pytest.raises(ValueError):
        cw.sample_spec(0, "test")


def _read_mp4(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_write_dataset_mp4s_and_manifest(tmp_path):
    m = cw.write_dataset(tmp_path, n_clips=3, frames=5, height=16, width=24, split="heldout", seed=10)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == m
    assert (manifest["frames"], manifest["height"], manifest["width"]) == (5, 16, 24)
    assert [c["seed"] for c in manifest["clips"]] == [10, 11, 12]
    for entry in manifest["clips"]:
        assert entry["file"] == f"heldout_{entry['seed']:05d}_{entry['source']}.mp4"
        assert entry["source"] in cw.SOURCES and entry["split"] == "heldout"
        video = _read_mp4(tmp_path / entry["file"])
        assert video.shape == (5, 16, 24, 3)
        # the manifest is enough to regenerate the clip (up to H.264 loss)
        ref = cw.make_clip(entry["source"], entry["clip_seed"], 5, 16, 24).astype(float)
        assert np.abs(video - ref).mean() < 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [c["file"] for c in manifest["clips"]] + ["manifest.json"])


def test_cli_list_and_dataset(tmp_path, capsys):
    assert cw.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(cw.SOURCES)
    out = tmp_path / "ds"
    assert cw.main(["--out", str(out), "--split", "train", "--clips", "2", "--frames", "3",
                    "--size", "16x32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["clips"]) == 2 and (manifest["height"], manifest["width"]) == (16, 32)
    assert _read_mp4(out / manifest["clips"][0]["file"]).shape == (3, 16, 32, 3)


def test_demo_clip_is_heldout_and_moving():
    clip = cw.make_demo_clip()
    assert clip.shape == (80, 256, 256, 3) and clip.dtype == np.uint8
    assert np.abs(np.diff(clip[::10].astype(np.int16), axis=0)).mean() > 1
    assert "astronaut" in cw.HELDOUT_PHOTOS
