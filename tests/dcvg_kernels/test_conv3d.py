"""dcvg_kernels.chunk_causal_conv3d: the Triton kernel (interpreted on CPU, see conftest.py)
against the torch reference, the reference against dcae-v's torch path, and the custom op's
registration (fake kernel, autograd, opcheck).

Interpreter runs cost ~2-8 ms per program x tap x Cin block, so shapes stay tiny; the
interpreter config (BLOCK_M 64, BLOCK_N 32, BLOCK_K 16) makes Cin 20 / Cout 36 span two blocks.
"""

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from dcae_v import DCAEV, kernels
from dcae_v.temporal import TemporalRule, conv3d_torch, next_context
from dcvg_kernels import attention_reference, chunk_causal_conv3d, conv3d_reference
from dcvg_kernels.ops import use_triton
from dcvg_kernels.reference import conv3d_reference_backward

# Against an fp64 reference on the same (rounded) inputs: fp32 accumulates in fp32; fp16 adds one
# output rounding (half an ulp is 4.9e-4 relative).
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3}}


@pytest.fixture
def triton_conv():
    """The Triton path, forced on CPU. Fails (never skips) without triton: CI must install it."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.fail(f"triton is not importable ({e}): the dcvg-kernels Triton tests need it "
                    "(pip install triton; CI installs it from tests/requirements.txt)")
    return functools.partial(chunk_causal_conv3d, backend="triton")


def needs_triton(request, backend):
    """Backend-parametrized tests need triton only for their "triton" half."""
    if backend == "triton":
        request.getfixturevalue("triton_conv")


def make_case(*, b=1, cin=5, cout=6, t=4, h=5, w=7, k=(3, 3, 3), ctx=0, bias=True, residual=False,
              dtype=torch.float32, seed=0):
    """Random inputs; weights scaled by 1/sqrt(fan-in) so outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    fan_in = cin * k[0] * k[1] * k[2]
    tensors = {
        "x": rand(b, cin, t, h, w),
        "weight": rand(cout, cin, *k) / fan_in**0.5,
        "bias": rand(cout) if bias else None,
        "context": rand(b, cin, ctx, h, w) if ctx else None,
        "residual": rand(b, cout, t, h, w) if residual else None,
    }
    return {n: v if v is None else v.to(dtype) for n, v in tensors.items()}


def double(case):
    return {n: v if v is None else v.double() for n, v in case.items()}


def reference64(case, mode, chunk):
    """The reference in fp64 on the case's tensors."""
    return run(conv3d_reference, double(case), mode, chunk)


def run(fn, case, mode, chunk):
    return fn(case["x"], case["weight"], case["bias"], mode=mode, chunk=chunk,
              context=case["context"], residual=case["residual"])


# (id, mode, chunk, make_case kwargs)
CASES = [
    ("chunk-T5-not-multiple-of-chunk", "chunk_causal", 2, {"t": 5}),
    ("chunk-context", "chunk_causal", 3, {"t": 4, "ctx": 1}),
    ("chunk-context-longer-than-read", "chunk_causal", 2, {"t": 2, "ctx": 3}),
    ("chunk-1-context", "chunk_causal", 1, {"t": 3, "ctx": 1}),
    ("chunk-single-frame", "chunk_causal", 4, {"t": 1}),
    ("chunk-single-frame-context", "chunk_causal", 4, {"t": 1, "ctx": 1}),
    ("causal", "causal", 0, {"t": 4}),
    ("causal-context", "causal", 0, {"t": 3, "ctx": 2}),
    ("causal-short-context", "causal", 0, {"t": 3, "ctx": 1}),
    ("non-causal", "non_causal", 0, {"t": 4}),
    ("non-causal-single-frame", "non_causal", 0, {"t": 1}),
    ("k111-two-cin-and-cout-blocks", "chunk_causal", 2, {"t": 3, "k": (1, 1, 1), "cin": 20, "cout": 40, "ctx": 1}),
    ("k133-per-frame", "causal", 0, {"t": 3, "k": (1, 3, 3)}),
    ("k311-temporal-only", "chunk_causal", 2, {"t": 5, "k": (3, 1, 1), "ctx": 1}),
    ("k333-two-cin-and-cout-blocks", "causal", 0, {"b": 2, "t": 2, "h": 3, "w": 5, "cin": 20, "cout": 36, "ctx": 2}),
    ("several-row-tiles-batch2", "chunk_causal", 3, {"b": 2, "t": 3, "h": 6, "w": 6, "cin": 3, "cout": 4}),
    ("one-pixel-frames", "chunk_causal", 2, {"t": 3, "h": 1, "w": 1}),
    ("no-bias", "chunk_causal", 2, {"t": 3, "bias": False, "ctx": 1}),
    ("residual", "chunk_causal", 2, {"t": 3, "ctx": 1, "residual": True}),
    ("residual-non-causal", "non_causal", 0, {"t": 2, "residual": True, "bias": False}),
]
FP16_CASES = {"chunk-T5-not-multiple-of-chunk", "causal-context", "k333-two-cin-and-cout-blocks", "residual"}


@pytest.mark.parametrize("name, mode, chunk, kw", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference_fp32(triton_conv, name, mode, chunk, kw):
    case = make_case(**kw)
    y = run(triton_conv, case, mode, chunk)
    assert y.dtype == torch.float32 and y.shape == (kw.get("b", 1), kw.get("cout", 6), *case["x"].shape[2:])
    torch.testing.assert_close(y.double(), reference64(case, mode, chunk), **TOL[torch.float32])


@pytest.mark.parametrize("name, mode, chunk, kw", CASES + [
    ("chunk-1-long", "chunk_causal", 1, {"t": 5, "ctx": 2}),
    ("chunk-3-two-full-and-tail-context", "chunk_causal", 3, {"t": 8, "ctx": 1, "residual": True}),
    ("causal-no-context", "causal", 0, {"t": 2}),
], ids=[c[0] for c in CASES] + ["chunk-1-long", "chunk-3-two-full-and-tail-context", "causal-no-context"])
def test_torch_fallback_matches_reference(name, mode, chunk, kw):
    """The op's non-Triton path (padded windows, one conv) against the per-tap reference, in fp64."""
    from dcvg_kernels.fallback import conv3d_fallback

    case = double(make_case(**kw))
    torch.testing.assert_close(run(conv3d_fallback, case, mode, chunk), run(conv3d_reference, case, mode, chunk),
                               atol=1e-12, rtol=1e-12)
    cl = {n: v if v is None or v.dim() != 5 else v.contiguous(memory_format=torch.channels_last_3d)
          for n, v in case.items()}
    y = run(conv3d_fallback, cl, mode, chunk)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) or y.shape[1] == 1


NESTED_K_CASES = {"chunk-context", "causal-context", "k333-two-cin-and-cout-blocks", "residual", "k311-temporal-only"}


@pytest.mark.parametrize("name, mode, chunk, kw", [c for c in CASES if c[0] in NESTED_K_CASES],
                         ids=sorted(NESTED_K_CASES, key=[c[0] for c in CASES].index))
def test_triton_nested_reduction_loop_matches_reference(triton_conv, monkeypatch, name, mode, chunk, kw):
    """The kernel's other reduction loop (one short loop per tap; the GPU autotuner may pick it)."""
    from dcvg_kernels import conv3d

    monkeypatch.setitem(conv3d.INTERPRET_CONFIG, "FLAT_K", False)
    case = make_case(**kw)
    torch.testing.assert_close(run(triton_conv, case, mode, chunk).double(), reference64(case, mode, chunk),
                               **TOL[torch.float32])


# Cout * 4 bytes a multiple of 16, so the weights can have a descriptor; Cin = 20 with 16-channel K
# blocks makes a weight box reach into the next tap's rows (which must meet zeros in A).
W_TMA_CASES = {"k111-two-cin-and-cout-blocks", "k333-two-cin-and-cout-blocks", "several-row-tiles-batch2"}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tap"])
@pytest.mark.parametrize("name, mode, chunk, kw", [c for c in CASES if c[0] in W_TMA_CASES],
                         ids=sorted(W_TMA_CASES, key=[c[0] for c in CASES].index))
def test_triton_weight_tma_matches_reference(triton_conv, monkeypatch, name, mode, chunk, kw, flat):
    """Weights (the GEMM's B operand) by TMA descriptor, in both reduction loops (W_TMA configs)."""
    from dcvg_kernels import conv3d

    monkeypatch.setitem(conv3d.INTERPRET_CONFIG, "W_TMA", True)
    monkeypatch.setitem(conv3d.INTERPRET_CONFIG, "FLAT_K", flat)
    case = make_case(**kw)
    torch.testing.assert_close(run(triton_conv, case, mode, chunk).double(), reference64(case, mode, chunk),
                               **TOL[torch.float32])


# The TMA path (conv3d_tma.py) in the interpreter: channels multiples of 4 (16-byte fp32 rows), a
# 4 x 8 pixel tile so that 5 x 7 / 9 x 11 frames leave partial tiles, 16-channel K blocks so that
# Cin = 20 spans two (the second half past Cin: zeros).
TMA_PATH_CASES = [
    ("chunk-context", "chunk_causal", 3, {"t": 4, "ctx": 1, "cin": 8, "cout": 12}),
    ("chunk-T5-not-multiple", "chunk_causal", 2, {"t": 5, "cin": 4, "cout": 8}),
    ("chunk-context-longer-than-read", "chunk_causal", 2, {"t": 2, "ctx": 3, "cin": 4, "cout": 4}),
    ("causal-context-batch2", "causal", 0, {"b": 2, "t": 3, "ctx": 2, "h": 9, "w": 11, "cin": 20, "cout": 36}),
    ("causal-short-context", "causal", 0, {"t": 3, "ctx": 1, "cin": 4, "cout": 8}),
    ("non-causal-residual-no-bias", "non_causal", 0, {"t": 3, "cin": 8, "cout": 40, "residual": True, "bias": False}),
    ("k111", "chunk_causal", 2, {"t": 3, "k": (1, 1, 1), "cin": 20, "cout": 40, "ctx": 1}),
    ("k133-per-frame", "causal", 0, {"t": 2, "k": (1, 3, 3), "cin": 8, "cout": 4}),
    ("k311-temporal-only", "chunk_causal", 2, {"t": 5, "k": (3, 1, 1), "ctx": 1, "cin": 4, "cout": 8}),
    ("one-pixel-frames", "chunk_causal", 2, {"t": 3, "h": 1, "w": 1, "cin": 4, "cout": 4}),
]


@pytest.mark.parametrize("layout", ["ncdhw", "channels-last"])
@pytest.mark.parametrize("name, mode, chunk, kw", TMA_PATH_CASES, ids=[c[0] for c in TMA_PATH_CASES])
def test_triton_tma_path_matches_reference(triton_conv, monkeypatch, name, mode, chunk, kw, layout):
    """Activations and weights by descriptor: borders and forbidden frames read as zero boxes,
    context frames from the second loop, bias/residual in the epilogue, partial tiles dropped.
    Channels-last tensors also take the descriptor epilogue (residual load, output store)."""
    from dcvg_kernels import conv3d

    for key, value in {"A_TMA": True, "W_TMA": True, "BH": 4, "BW": 8, "BLOCK_M": 32}.items():
        monkeypatch.setitem(conv3d.INTERPRET_CONFIG, key, value)
    case = make_case(**kw)
    if layout == "channels-last":
        case = {n: v.contiguous(memory_format=torch.channels_last_3d) if v is not None and v.dim() == 5 else v
                for n, v in case.items()}
        x = case["x"]
        out = torch.empty((x.shape[0], kw["cout"], *x.shape[2:]), memory_format=torch.channels_last_3d)
        assert conv3d.ndhwc_descriptors([out], [1, 1, 4, 8, 32]) is not None  # the epilogue path is taken
    got = run(triton_conv, case, mode, chunk)
    torch.testing.assert_close(got.double(), reference64(case, mode, chunk), **TOL[torch.float32])


def test_tma_path_needs_aligned_channels(triton_conv, monkeypatch):
    """Cin = 5 fp32 (20-byte rows) cannot have an activation descriptor: no TMA-path config runs
    there (the forced interpreter config is refused by name)."""
    from dcvg_kernels import conv3d

    case = make_case(cin=5, cout=8)
    xl = case["x"].contiguous(memory_format=torch.channels_last_3d)
    assert conv3d.activation_descriptors(xl, xl, False) is None
    assert conv3d.activation_descriptors(make_case(cin=8)["x"].contiguous(memory_format=torch.channels_last_3d),
                                         None, False) is not None
    monkeypatch.setitem(conv3d.INTERPRET_CONFIG, "A_TMA", True)
    with pytest.raises(ValueError, match="cannot have descriptors"):
        run(triton_conv, case, "chunk_causal", 2)


def test_weight_descriptor_rules(triton_conv):
    """No descriptor where TMA cannot read the weights: rows of 6 fp32 (24 bytes, not a multiple
    of 16) or a misaligned base; then only pointer configs run (and a forced W_TMA is refused)."""
    from dcvg_kernels import conv3d

    assert conv3d.weight_descriptor(torch.zeros(27 * 4, 8)) is not None
    assert conv3d.weight_descriptor(torch.zeros(27 * 4, 6)) is None
    assert conv3d.weight_descriptor(torch.zeros(27 * 4 * 8 + 1)[1:].view(-1, 8)) is None


@pytest.mark.parametrize("name, mode, chunk, kw", [c for c in CASES if c[0] in FP16_CASES],
                         ids=sorted(FP16_CASES, key=[c[0] for c in CASES].index))
def test_triton_matches_reference_fp16(triton_conv, name, mode, chunk, kw):
    case = make_case(dtype=torch.float16, **kw)
    y = run(triton_conv, case, mode, chunk)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), reference64(case, mode, chunk), **TOL[torch.float16])


@pytest.mark.parametrize("mode, chunk, dtype", [("chunk_causal", 2, torch.float32), ("causal", 0, torch.float32),
                                                ("chunk_causal", 1, torch.float16)])
def test_triton_tiles_with_context_equal_one_shot(triton_conv, mode, chunk, dtype):
    """Streaming as dcae-v does it: 2-frame tiles, each given the previous tile's tail frames."""
    case = make_case(t=6, h=4, w=4, cin=4, cout=5, dtype=dtype)
    x, weight, bias = case["x"], case["weight"], case["bias"]
    whole = triton_conv(x, weight, bias, mode=mode, chunk=chunk)
    n = TemporalRule(mode, chunk).context_frames(3)
    tiles, context = [], None
    for start in range(0, 6, 2):
        tile = x[:, :, start:start + 2]
        tiles.append(triton_conv(tile, weight, bias, mode=mode, chunk=chunk, context=context))
        context = next_context(tile, context, n)
    torch.testing.assert_close(torch.cat(tiles, dim=2), whole, atol=1e-6, rtol=1e-6)


def test_triton_keeps_channels_last_layout(triton_conv):
    case = make_case(t=3, ctx=1, residual=True)
    cl = {n: v.contiguous(memory_format=torch.channels_last_3d)
          for n, v in case.items() if v is not None and v.dim() == 5}
    y = run(triton_conv, case | cl, "chunk_causal", 2)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y.double(), reference64(case, "chunk_causal", 2), **TOL[torch.float32])
    assert run(triton_conv, case, "chunk_causal", 2).is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(request, backend):
    needs_triton(request, backend)
    case = make_case(b=0)
    y = chunk_causal_conv3d(case["x"], case["weight"], case["bias"], mode="causal", backend=backend)
    assert y.shape == (0, 6, 4, 5, 7)


# --- the reference against dcae-v's torch path (the semantic ground truth) -------------------

@pytest.mark.parametrize("mode", ["chunk_causal", "causal", "non_causal"])
def test_reference_equals_dcae_v_torch_path(mode):
    chunks = [1, 2, 4] if mode == "chunk_causal" else [0]
    contexts = [0] if mode == "non_causal" else [0, 1, 2, 3]  # 3: longer than any mode reads
    for k, t, chunk, ctx in itertools.product([(3, 3, 3), (1, 3, 3), (3, 1, 1)], [1, 2, 3, 5], chunks, contexts):
        case = double(make_case(t=t, h=3, w=4, cin=2, cout=3, k=k, ctx=ctx, seed=t))
        want = conv3d_torch(case["x"], case["weight"], case["bias"], TemporalRule(mode, chunk), case["context"])
        got = run(conv3d_reference, case, mode, chunk)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=f"{k=} {t=} {chunk=} {ctx=}")


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("mode, chunk, kw", [("chunk_causal", 2, {"t": 5, "ctx": 1}), ("causal", 0, {"t": 3, "ctx": 2}),
                                             ("non_causal", 0, {"t": 3})])
def test_public_op_equals_dcae_v_torch_path(request, backend, mode, chunk, kw):
    needs_triton(request, backend)
    case = make_case(**kw)
    want = conv3d_torch(case["x"], case["weight"], case["bias"], TemporalRule(mode, chunk), case["context"])
    got = chunk_causal_conv3d(case["x"], case["weight"], case["bias"], mode=mode, chunk=chunk,
                              context=case["context"], backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@torch.no_grad()
def test_dcae_v_model_through_the_op_matches_its_torch_path(monkeypatch):
    """The whole debug model, streaming in 8-frame tiles, with every conv routed through the op
    (reference backend: the interpreter is too slow for a model): the seam contract end to end."""
    torch.manual_seed(0)
    model = DCAEV.from_preset("debug", chunk_size=8).eval()
    x = torch.rand(1, 3, 16, 32, 32) * 2 - 1
    want = model.decode(model.encode(x, 8), 8)
    calls = []

    def via_op(x, weight, bias, rule, context=None):
        calls.append(context is not None)
        return chunk_causal_conv3d(x, weight, bias, mode=rule.mode, chunk=rule.chunk, context=context, backend="torch")

    monkeypatch.setattr(kernels, "select_conv", lambda t: via_op)
    got = model.decode(model.encode(x, 8), 8)
    assert any(calls) and not all(calls)  # both first tiles and streamed tiles went through it
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- backend selection and host-side checks ---------------------------------------------------

def test_backend_selection():
    cpu = torch.zeros(1, 1, 1, 1, 1)
    assert not use_triton(cpu, "auto")  # CPU: the reference unless Triton is forced
    assert use_triton(cpu, "triton") and not use_triton(cpu, "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        use_triton(cpu, "cuda")


def test_triton_on_cpu_without_interpreter_raises(triton_conv, monkeypatch):
    from dcvg_kernels import conv3d

    monkeypatch.setattr(conv3d, "INTERPRET", False)
    case = make_case(t=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run(triton_conv, case, "causal", 0)


def _bad(name):
    """Inputs that break one rule, and the message they must raise."""
    c = make_case(t=3, ctx=1)
    x, wt = c["x"], c["weight"]
    return {
        "x-4d": ({"x": x[0]}, "expected x"),
        "cin-mismatch": ({"weight": wt[:, :3]}, "input channels"),
        "kernel-5": ({"weight": torch.randn(6, 5, 3, 5, 5)}, "kernel size"),
        "kernel-2": ({"weight": torch.randn(6, 5, 2, 3, 3)}, "kernel size"),
        "mode": ({"mode": "bidirectional"}, "unknown temporal mode"),
        "chunk-0": ({"chunk": 0}, "chunk length"),
        "bias-shape": ({"bias": torch.zeros(7)}, "bias has shape"),
        "residual-shape": ({"residual": torch.zeros(1, 6, 2, 5, 7)}, "residual has shape"),
        "context-shape": ({"context": torch.zeros(1, 5, 1, 4, 7)}, "does not fit"),
        "context-batch": ({"context": torch.zeros(2, 5, 1, 5, 7)}, "does not fit"),
        "non-causal-context": ({"mode": "non_causal"}, "cannot stream"),
        "dtype-weight": ({"weight": wt.half()}, "dtype mismatch"),
        "dtype-context": ({"context": c["context"].double()}, "dtype mismatch"),
        "integer-x": ({"x": x.long(), "weight": wt.long(), "bias": None, "context": None}, "floating-point"),
    }[name]


BAD = ["x-4d", "cin-mismatch", "kernel-5", "kernel-2", "mode", "chunk-0", "bias-shape", "residual-shape",
       "context-shape", "context-batch", "non-causal-context", "dtype-weight", "dtype-context", "integer-x"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BAD)
def test_bad_arguments_raise_value_errors(request, backend, name):
    needs_triton(request, backend)
    change, message = _bad(name)
    args = make_case(t=3, ctx=1) | {"mode": "chunk_causal", "chunk": 2} | change
    with pytest.raises(ValueError, match=message):
        chunk_causal_conv3d(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)


def test_triton_rejects_float64(triton_conv):
    case = double(make_case(t=1))
    with pytest.raises(ValueError, match="use the torch backend"):
        run(triton_conv, case, "causal", 0)


# --- autograd and registration ----------------------------------------------------------------

@pytest.mark.parametrize("mode, chunk, k, ctx", [("chunk_causal", 2, (3, 3, 3), 1), ("causal", 0, (3, 3, 3), 2),
                                                 ("non_causal", 0, (3, 1, 3), 0), ("chunk_causal", 2, (1, 3, 3), 1)])
def test_reference_backward_equals_autograd(mode, chunk, k, ctx):
    case = {n: v if v is None else v.double().requires_grad_()
            for n, v in make_case(t=5, h=3, w=4, cin=3, cout=2, k=k, ctx=ctx, bias=False).items()}
    y = conv3d_reference(case["x"], case["weight"], None, mode=mode, chunk=chunk, context=case["context"])
    grad = torch.randn_like(y)
    reads_context = ctx and k[0] > 1
    leaves = [case["x"], case["weight"]] + ([case["context"]] if reads_context else [])
    want = torch.autograd.grad(y, leaves, grad)
    got = conv3d_reference_backward(grad, case["x"].detach(), case["weight"].detach(), mode=mode, chunk=chunk,
                                    context=None if ctx == 0 else case["context"].detach())
    assert (got[2] is not None) == reads_context  # kt = 1 never reads the context
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode, chunk", [("chunk_causal", 2), ("causal", 0)])
def test_gradcheck_through_the_op(mode, chunk):
    case = {n: v.double().requires_grad_()
            for n, v in make_case(t=3, h=2, w=3, cin=2, cout=2, ctx=2, residual=True).items()}
    fn = lambda x, w, b, c, r: chunk_causal_conv3d(x, w, b, mode=mode, chunk=chunk, context=c, residual=r,
                                                   backend="torch")
    assert torch.autograd.gradcheck(fn, tuple(case.values()), fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(request, backend):
    needs_triton(request, backend)
    op = torch.ops.dcvg_kernels.chunk_causal_conv3d
    case = {n: v.requires_grad_() for n, v in make_case(t=3, h=3, w=3, cin=3, cout=4, ctx=1, residual=True).items()}
    torch.library.opcheck(op, (*case.values(), "chunk_causal", 2, backend))
    plain = make_case(t=2, h=3, w=3, cin=3, cout=4, bias=False)
    x_cl = plain["x"].contiguous(memory_format=torch.channels_last_3d)
    torch.library.opcheck(op, (x_cl, plain["weight"], None, None, None, "non_causal", 0, backend))


def test_attention_reference_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g, dtype=torch.float16) for n in (5, 7, 7))
    out, lse = attention_reference(q, k, v)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == (2, 3, 5)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2))
    torch.testing.assert_close(lse, torch.logsumexp(qf @ kf.transpose(-1, -2) / 4, dim=-1))
