"""The paired-latent cache: built once from encoder callables, read back as a dataset, and every
mismatch a clear error."""

from __future__ import annotations

import pytest
import torch

from ae_adapt import CacheError, LatentCache, ShapeError, build_cache


def _build(world, out, n=5, **kw):
    clips = [world.clip(s) for s in range(n)]
    args = {
        "base_encode": world.base_encode,
        "new_encode": world.new_encode,
        "text_encode": lambda prompt: torch.randn(2 + len(prompt) % 3, world.TEXT_DIM),
        "base_ae": "toy-f2c4",
        "new_ae": "toy-f8c8",
        "text_encoder": "toy-text",
        "shard_size": 2,
    }
    return build_cache(clips, out, **{**args, **kw})


def test_cache_round_trip_in_shards(clip_world, tmp_path):
    _build(clip_world, tmp_path)
    cache = LatentCache(tmp_path, base_ae="toy-f2c4", new_ae="toy-f8c8", new_patch=(1, 1, 1))
    assert len(cache) == 5 and len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    video = clip_world.clip(3)["video"]
    sample = cache[3]
    torch.testing.assert_close(sample["base"], clip_world.base_encode(video))
    torch.testing.assert_close(sample["new"], clip_world.new_encode(video))
    assert sample["context"].shape == (cache.index["text_len"], clip_world.TEXT_DIM)
    assert cache.fingerprint()["new_ae"] == "toy-f8c8"
    with pytest.raises(IndexError):
        cache[5]


def test_an_interrupted_build_resumes_without_encoding_the_cached_clips_again(clip_world, tmp_path):
    """Interrupted at clip 5 of 7 (shards of 2): the rerun encodes only clips 4-6 and the cache
    equals one built without interruption; with other inputs it starts over."""
    clips = [clip_world.clip(s) for s in range(7)]
    encoded = []

    def base_encode(video):
        encoded.append(video)
        if interrupt and len(encoded) == 6:
            raise KeyboardInterrupt
        return clip_world.base_encode(video)

    def text(prompt):
        return torch.full((2 + len(prompt) % 3, clip_world.TEXT_DIM), float(len(prompt)))

    args = {"base_encode": base_encode, "new_encode": clip_world.new_encode, "text_encode": text,
            "base_ae": "toy-f2c4", "new_ae": "toy-f8c8", "shard_size": 2, "inputs": {"data": "seven clips"}}
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        build_cache(iter(clips), tmp_path / "c", **args)
    assert (tmp_path / "c" / "partial.json").is_file() and not (tmp_path / "c" / "index.json").exists()
    interrupt, encoded[:] = False, []
    with pytest.warns(UserWarning, match="4 clips in 2 shards are already cached"):
        build_cache(iter(clips), tmp_path / "c", **args)
    assert len(encoded) == 3 and not (tmp_path / "c" / "partial.json").exists()
    build_cache(iter(clips), tmp_path / "ref", **args)
    resumed, ref = LatentCache(tmp_path / "c"), LatentCache(tmp_path / "ref")
    assert len(resumed) == len(ref) == 7 and resumed.index["text_len"] == ref.index["text_len"]
    for i in range(7):
        for field in ("base", "new", "context"):
            assert torch.equal(resumed[i][field], ref[i][field]), (i, field)
    # a partial build of other inputs is not resumed
    interrupt, encoded[:] = True, []
    with pytest.raises(KeyboardInterrupt):
        build_cache(iter(clips), tmp_path / "d", **args)
    interrupt, encoded[:] = False, []
    build_cache(iter(clips), tmp_path / "d", **{**args, "inputs": {"data": "other clips"}})
    assert len(encoded) == 7


def test_extra_fields_are_cached(clip_world, tmp_path):
    _build(clip_world, tmp_path, n=2, extra=lambda c: {"new_y": torch.full((4, 2, 4, 4), float(c["seed"]))})
    assert torch.equal(LatentCache(tmp_path)[1]["new_y"], torch.ones(4, 2, 4, 4))


def test_a_cache_of_other_autoencoders_is_refused(clip_world, tmp_path):
    _build(clip_world, tmp_path, n=2)
    with pytest.raises(CacheError, match=r"new autoencoder 'toy-f8c8', but this run uses 'dc-ae-v-f32t4c32'"):
        LatentCache(tmp_path, new_ae="dc-ae-v-f32t4c32")
    with pytest.raises(CacheError, match="base autoencoder"):
        LatentCache(tmp_path, base_ae="wan-vae")
    with pytest.raises(CacheError, match="not a latent cache"):
        LatentCache(tmp_path / "missing")


def test_latents_the_new_embedder_cannot_tile_are_refused(clip_world, tmp_path):
    with pytest.raises(ShapeError, match=r"cannot be tiled .* patch \(1, 3, 3\)"):
        _build(clip_world, tmp_path / "a", n=1, new_patch=(1, 3, 3))
    _build(clip_world, tmp_path / "b", n=1)
    with pytest.raises(ShapeError, match="cannot be tiled"):
        LatentCache(tmp_path / "b", new_patch=(1, 8, 8))


def test_clips_of_different_sizes_are_refused(clip_world, tmp_path):
    clips = [clip_world.clip(0), {**clip_world.clip(1), "video": torch.zeros(3, 2, 16, 16)}]
    with pytest.raises(CacheError, match="one resolution"):
        build_cache(
            clips,
            tmp_path,
            base_encode=clip_world.base_encode,
            new_encode=clip_world.new_encode,
            text_encode=lambda p: torch.zeros(2, 16),
            base_ae="a",
            new_ae="b",
        )
