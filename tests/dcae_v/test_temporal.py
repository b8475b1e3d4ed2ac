"""Temporal rules: a naive per-frame reference, the information-flow properties of the three
modes, and parity with numeric outputs of NVIDIA's own code."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dcae_v import DCAEV
from dcae_v.temporal import TemporalRule, conv3d_torch

ROOT = Path(__file__).resolve().parents[2]


def naive_conv(x, w, b, rule, context=None):
    """Per output frame: sum over temporal taps of 2D convs, each input frame chosen by the rule."""
    T, kt = x.shape[2], w.shape[2]
    p = kt // 2
    zero = torch.zeros_like(x[:, :, 0])

    def frame(t_out, tap):
        if rule.mode == "causal":
            src = t_out - 2 * p + tap
            if src >= 0:
                return x[:, :, src]
            if context is not None and context.shape[2] + src >= 0:
                return context[:, :, context.shape[2] + src]
            return zero
        src = t_out - p + tap
        if rule.mode == "non_causal":
            return x[:, :, src] if 0 <= src < T else zero
        chunk = t_out // rule.chunk
        if src >= (chunk + 1) * rule.chunk or src >= T:
            return zero  # future chunk or past the end
        if src < 0:
            return context[:, :, context.shape[2] + src] if context is not None else zero
        return x[:, :, src]  # own chunk, or the previous chunk's tail

    out = []
    for t in range(T):
        acc = b.view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[3], x.shape[4]).clone()
        for tap in range(kt):
            acc = acc + F.conv2d(frame(t, tap), w[:, :, tap], padding=w.shape[-1] // 2)
        out.append(acc)
    return torch.stack(out, dim=2)


STREAMING_CASES = [("chunk_causal", 4, 12), ("chunk_causal", 4, 10), ("chunk_causal", 5, 3), ("causal", 0, 7), ("chunk_causal", 1, 4)]


@pytest.mark.parametrize(
    "mode, chunk, T, with_context",
    [(*case, ctx) for case in STREAMING_CASES for ctx in (False, True)] + [("non_causal", 0, 6, False)],
)
def test_conv_rule_matches_naive_reference(mode, chunk, T, with_context):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, T, 5, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rule = TemporalRule(mode, chunk)
    ctx = torch.randn(2, 3, rule.context_frames(3), 5, 6, dtype=torch.float64) if with_context else None
    assert torch.allclose(conv3d_torch(x, w, b, rule, ctx), naive_conv(x, w, b, rule, ctx), atol=1e-10)


def test_non_causal_refuses_context():
    x, w = torch.randn(1, 2, 4, 3, 3), torch.randn(2, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="non_causal"):
        conv3d_torch(x, w, None, TemporalRule("non_causal"), torch.zeros(1, 2, 1, 3, 3))


def _model(temporal, chunk=8):
    torch.manual_seed(0)
    return DCAEV.from_preset("debug", temporal=temporal, chunk_size=chunk).double().eval()


@torch.no_grad()
def test_chunk_causal_later_chunk_never_changes_earlier_outputs():
    model = _model("chunk_causal")  # chunks of 8 frames = 2 latent frames
    x = torch.rand(1, 3, 24, 64, 64, dtype=torch.float64) * 2 - 1
    x2 = x.clone()
    x2[:, :, 8:] = torch.rand_like(x2[:, :, 8:])  # perturb chunks 1 and 2
    z, z2 = model.encode(x), model.encode(x2)
    assert torch.equal(z[:, :, :2], z2[:, :, :2])  # bit-identical
    assert not torch.allclose(z[:, :, 2:], z2[:, :, 2:])
    y, y2 = model.decode(z), model.decode(z2)
    assert torch.equal(y[:, :, :8], y2[:, :, :8])
    x3 = x.clone()
    x3[:, :, 16:] += 0.5  # perturb only the last chunk: the first two stay identical
    assert torch.equal(model.encode(x3)[:, :, :4], z[:, :, :4])


@torch.no_grad()
def test_chunk_causal_is_bidirectional_inside_a_chunk_and_causal_across():
    model = _model("chunk_causal")
    x = torch.rand(1, 3, 16, 32, 32, dtype=torch.float64)
    z = model.encode(x)
    x_last = x.clone()
    x_last[:, :, 7] += 1  # last frame of chunk 0 reaches the chunk's first latent frame
    assert not torch.allclose(model.encode(x_last)[:, :, 0], z[:, :, 0])
    x_first = x.clone()
    x_first[:, :, 0] += 1  # the first frame reaches the next chunk (causal flow forward)
    assert not torch.allclose(model.encode(x_first)[:, :, 3], z[:, :, 3])
    z_last = z.clone()
    z_last[:, :, 1] += 1  # decoder: second latent of chunk 0 reaches frame 0
    assert not torch.allclose(model.decode(z_last)[:, :, 0], model.decode(z)[:, :, 0])


@torch.no_grad()
def test_causal_never_sees_the_future():
    model = _model("causal")
    x = torch.rand(1, 3, 16, 32, 32, dtype=torch.float64)
    for m in (1, 2, 3):  # perturb frames from 4m on: latents < m and decoded frames < 4m unchanged
        x2 = x.clone()
        x2[:, :, 4 * m :] = torch.rand_like(x2[:, :, 4 * m :])
        z, z2 = model.encode(x), model.encode(x2)
        assert torch.equal(z[:, :, :m], z2[:, :, :m])
        assert not torch.allclose(z[:, :, m:], z2[:, :, m:])
        assert torch.equal(model.decode(z)[:, :, : 4 * m], model.decode(z2)[:, :, : 4 * m])


@torch.no_grad()
def test_non_causal_sees_everything():
    model = _model("non_causal")
    x = torch.rand(1, 3, 16, 32, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, -1] += 1
    z, z2 = model.encode(x), model.encode(x2)
    assert not torch.allclose(z[:, :, 0], z2[:, :, 0])
    z3 = z.clone()
    z3[:, :, -1] += 1
    assert not torch.allclose(model.decode(z)[:, :, 0], model.decode(z3)[:, :, 0])


def _fixture_tools():
    spec = importlib.util.spec_from_file_location("nvidia_fixture", ROOT / "tools/reference/nvidia_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
@pytest.mark.parametrize("case", ["chunk_causal", "chunk_causal_image", "causal", "non_causal"])
def test_parity_with_nvidia_reference_outputs(case):
    """Outputs stored by tools/reference/nvidia_fixture.py from NVIDIA's DC-Gen code (float64)."""
    tools = _fixture_tools()
    with safe_open(str(ROOT / "tests/dcae_v/fixtures/nvidia_reference.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["info"])
        want_z, want_y = f.get_tensor(f"{case}.latent").double(), f.get_tensor(f"{case}.video").double()
    c = info["cases"][case]
    model = DCAEV.from_preset(
        "debug", widths=tuple(info["widths"]), depths=tuple(info["depths"]), latent_channels=info["latent_channels"],
        temporal=c["temporal"], chunk_size=c["chunk_size"],
    ).double()
    model.load_state_dict(tools.fill_weights(model.state_dict()))
    x = tools.deterministic_tensor((1, 3, c["frames"], c["size"], c["size"]), 1000, 1.0)
    z = model.encode(x)
    assert torch.allclose(z, want_z, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.decode(want_z), want_y, rtol=1e-5, atol=1e-6)


# --- frame counts that are not whole chunks: NVIDIA's released configs run the short last tile
# on its own (their chunk-causal conv falls back to zero padding and ignores the cache) ------------

def naive_tail_alone_conv(x, w, b, chunk, context=None):
    """Per output frame: full chunks read the previous chunk's last frame (chunk 0: context or
    zeros) and zeros after the chunk; frames of a final partial chunk read only that tail."""
    T, p = x.shape[2], w.shape[2] // 2
    cut = T - T % chunk
    zero = torch.zeros_like(x[:, :, 0])

    def frame(t_out, src):
        if t_out >= cut:  # the tail: its own frames, zeros elsewhere (no context, no earlier chunk)
            return x[:, :, src] if cut <= src < T else zero
        if src >= (t_out // chunk + 1) * chunk:
            return zero
        if src < 0:
            return context[:, :, context.shape[2] + src] if context is not None else zero
        return x[:, :, src]

    out = []
    for t in range(T):
        acc = b.view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[3], x.shape[4]).clone()
        for tap in range(w.shape[2]):
            acc = acc + F.conv2d(frame(t, t - p + tap), w[:, :, tap], padding=w.shape[-1] // 2)
        out.append(acc)
    return torch.stack(out, dim=2)


@torch.no_grad()
@pytest.mark.parametrize("T, with_context", [(10, False), (10, True), (3, True), (8, True), (1, True)])
def test_conv_layer_runs_a_partial_last_chunk_alone(T, with_context):
    from dcae_v.blocks import TemporalConv3d

    torch.manual_seed(T)
    layer = TemporalConv3d(3, 4, TemporalRule("chunk_causal", 4)).double()
    x = torch.randn(2, 3, T, 5, 6, dtype=torch.float64)
    ctx = torch.randn(2, 3, 1, 5, 6, dtype=torch.float64) if with_context else None
    cache = {layer: ctx} if with_context else None
    got = layer(x, cache)
    want = naive_tail_alone_conv(x, layer.conv.weight, layer.conv.bias, 4, ctx)
    assert torch.allclose(got, want, atol=1e-10)
    if T % 4:  # the old rule (tail reads the previous chunk / the context) gives something else
        assert not torch.allclose(got, naive_conv(x, layer.conv.weight, layer.conv.bias, layer.rule, ctx), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("frames_per_tile", [None, 8, 16])
def test_model_partial_last_chunk_equals_separate_tiles(frames_per_tile):
    """T = 20 with chunks of 8: latents/frames of the 4-frame tail equal encoding/decoding the tail
    alone, the rest equals the 16 whole-chunk frames alone (NVIDIA's tiles of one chunk)."""
    model = _model("chunk_causal")
    x = torch.rand(1, 3, 20, 32, 32, dtype=torch.float64) * 2 - 1
    z = model.encode(x, frames_per_tile)
    assert torch.allclose(z[:, :, :4], model.encode(x[:, :, :16]), atol=1e-10)
    assert torch.allclose(z[:, :, 4:], model.encode(x[:, :, 16:]), atol=1e-10)
    y = model.decode(z, frames_per_tile)
    assert torch.allclose(y[:, :, :16], model.decode(z[:, :, :4]), atol=1e-10)
    assert torch.allclose(y[:, :, 16:], model.decode(z[:, :, 4:]), atol=1e-10)
    streamed = torch.cat(list(model.encode_stream(x.split(6, dim=2), frames_per_tile)), dim=2)
    assert torch.allclose(streamed, z, atol=1e-10)
