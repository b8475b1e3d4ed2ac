"""Long and large videos: temporal tiles and streams equal one shot; spatial tiles blend."""

import pytest
import torch

from dcae_v import DCAEV, InputError
from dcae_v.tiling import _SpatialTiler


def _model(temporal="chunk_causal", chunk=8, dtype=torch.float32):
    torch.manual_seed(0)
    return DCAEV.from_preset("debug", temporal=temporal, chunk_size=chunk).to(dtype).eval()


@torch.no_grad()
@pytest.mark.parametrize("temporal, frames, tile", [("chunk_causal", 32, 8), ("chunk_causal", 28, 16), ("causal", 24, 4), ("causal", 20, 8)])
def test_temporal_tiles_equal_one_shot(temporal, frames, tile):
    model = _model(temporal)
    x = torch.rand(1, 3, frames, 64, 32) * 2 - 1
    z = model.encode(x)
    z_tiled = model.encode(x, frames_per_tile=tile)
    assert (z - z_tiled).abs().max() <= 1e-5
    y = model.decode(z)
    assert (y - model.decode(z, frames_per_tile=tile)).abs().max() <= 1e-5


@torch.no_grad()
def test_streams_of_uneven_pieces_equal_one_shot():
    model = _model()
    x = torch.rand(1, 3, 36, 32, 64) * 2 - 1
    pieces = [x[:, :, a:b] for a, b in [(0, 3), (3, 10), (10, 11), (11, 30), (30, 36)]]
    z_stream = list(model.encode_stream(iter(pieces)))
    assert [p.shape[2] for p in z_stream] == [2, 2, 2, 2, 1]  # one chunk (8 frames) at a time
    z = model.encode(x)
    assert (torch.cat(z_stream, dim=2) - z).abs().max() <= 1e-5
    latent_pieces = [z[:, :, :1], z[:, :, 1:6], z[:, :, 6:]]
    y_stream = torch.cat(list(model.decode_stream(iter(latent_pieces))), dim=2)
    assert (y_stream - model.decode(z)).abs().max() <= 1e-5


@torch.no_grad()
def test_stream_with_larger_tiles_and_spatial_tiles():
    model = _model()
    x = torch.rand(1, 3, 24, 192, 160) * 2 - 1
    one = torch.cat(list(model.encode_stream([x], tile_size=128)), dim=2)
    assert (one - model.encode(x, frames_per_tile=8, tile_size=128)).abs().max() <= 1e-5
    assert (one - torch.cat(list(model.encode_stream([x], frames_per_tile=16, tile_size=128)), dim=2)).abs().max() <= 1e-5
    with pytest.raises(InputError, match="too small to blend"):  # tiles of 64 px would not overlap at f32
        model.encode(x, tile_size=64)
    with pytest.raises(InputError, match="too small to blend"):
        model.decode(one, tile_size=96)


def test_streaming_errors_are_clear():
    model = _model()
    with pytest.raises(InputError, match="multiple of 8 in chunk_causal mode"):
        model.encode(torch.zeros(1, 3, 16, 32, 32), frames_per_tile=12)
    with pytest.raises(InputError, match="remainder of 2 frames"):
        list(model.encode_stream([torch.zeros(1, 3, 10, 32, 32)]))
    nc = _model("non_causal")
    with pytest.raises(InputError, match="non_causal"):
        nc.encode(torch.zeros(1, 3, 16, 32, 32), frames_per_tile=8)
    with pytest.raises(InputError, match="non_causal"):
        list(nc.encode_stream([torch.zeros(1, 3, 8, 32, 32)]))
    assert nc.encode(torch.zeros(1, 3, 16, 32, 32), frames_per_tile=16).shape == (1, 8, 4, 1, 1)


def test_spatial_blend_is_a_partition_of_unity():
    """With a pointwise net, overlapping tiles must reassemble the input exactly."""
    x = torch.rand(1, 2, 3, 70, 45)
    tiler = _SpatialTiler(lambda t, cache: t * 2 + 1, tile=16, multiple=1, ratio=1, stream=False)
    assert torch.allclose(tiler(x), x * 2 + 1, atol=1e-6)
    up = _SpatialTiler(lambda t, cache: t.repeat_interleave(2, -1).repeat_interleave(2, -2), tile=8, multiple=1, ratio=2, stream=False)
    assert torch.allclose(up(x), x.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)


@torch.no_grad()
def test_spatial_tiles_shape_and_closeness():
    model = _model()
    x = torch.rand(1, 3, 8, 256, 160) * 2 - 1
    z = model.encode(x)
    zt = model.encode(x, tile_size=128)
    assert zt.shape == z.shape
    assert torch.equal(model.encode(x, tile_size=256), z)  # one tile covers it: exact
    y, yt = model.decode(z), model.decode(z, tile_size=128)
    assert yt.shape == y.shape and torch.isfinite(yt).all()
    with pytest.raises(InputError, match="multiple of 32"):
        model.decode(z, tile_size=48)
    with pytest.raises(InputError, match="positive multiple of 32, got 0"):  # not "a multiple of 1" of latents
        model.decode(z, tile_size=0)


@torch.no_grad()
def test_streaming_state_does_not_grow_with_length():
    """What a stream keeps between chunks is each conv's trailing frames: its size is fixed,
    and yielded pieces are not retained (peak RSS vs length is measured in tools/bench)."""
    import gc
    import weakref

    model = _model()
    tiler = _SpatialTiler(model.decoder, None, 1, 32, stream=True)
    sizes, refs = [], []
    for piece in torch.randn(1, 8, 12, 2, 2).split(2, dim=2):  # 6 chunks of 2 latent frames
        refs.append(weakref.ref(tiler(piece)))
        cache = tiler.caches[(0, 0)]
        sizes.append((len(cache), sum(t.numel() for t in cache.values())))
    gc.collect()
    assert len(set(sizes)) == 1 and sizes[0][0] == sum(1 for m in model.decoder.modules() if hasattr(m, "rule"))
    assert all(r() is None for r in refs)
