"""Triton dgrad/wgrad of the chunk-causal conv3d (interpreted on CPU) against torch autograd of
the fp64 reference: the input-gradient rule is the adjoint of the forward's temporal rule (not
the forward rule with flipped taps), so every mode, context length and chunk boundary is covered.
"""

import pytest
import torch

from dcvg_kernels import chunk_causal_conv3d, conv3d_reference
from dcvg_kernels.reference import conv3d_reference_backward

from .test_conv3d import make_case


@pytest.fixture
def triton_backward():
    try:
        from dcvg_kernels.conv3d_backward import conv3d_triton_backward
    except ImportError as e:
        pytest.fail(f"triton is not importable ({e}): the dcvg-kernels Triton tests need it")
    return conv3d_triton_backward


def autograd_oracle(case, grad, mode, chunk):
    """(gx, gw, gctx or None) by torch autograd through the fp64 reference."""
    leaves = {n: v.detach().double().requires_grad_() for n, v in case.items() if v is not None}
    y = conv3d_reference(leaves["x"], leaves["weight"], None, mode=mode, chunk=chunk, context=leaves.get("context"))
    wanted = [leaves["x"], leaves["weight"]] + ([leaves["context"]] if "context" in leaves else [])
    grads = torch.autograd.grad(y, wanted, grad.double(), allow_unused=True)
    gctx = grads[2] if len(grads) > 2 else None
    if gctx is None and "context" in leaves:
        gctx = torch.zeros_like(leaves["context"])  # kt = 1: the context is never read
    return grads[0], grads[1], gctx


# (id, mode, chunk, make_case kwargs); the interpreter tiles are 64 rows x 32 x 16 channels
CASES = [
    ("chunk-T5-not-multiple-of-chunk-context", "chunk_causal", 2, {"t": 5, "ctx": 1}),
    ("chunk-3-no-context", "chunk_causal", 3, {"t": 4}),
    ("chunk-1", "chunk_causal", 1, {"t": 3, "ctx": 1}),
    ("chunk-single-frame-context", "chunk_causal", 4, {"t": 1, "ctx": 1}),
    ("chunk-context-longer-than-read", "chunk_causal", 2, {"t": 2, "ctx": 3}),
    ("causal-context", "causal", 0, {"t": 3, "ctx": 2}),
    ("causal-short-context", "causal", 0, {"t": 3, "ctx": 1}),
    ("non-causal", "non_causal", 0, {"t": 4}),
    ("k133-per-frame-with-context", "chunk_causal", 2, {"t": 3, "k": (1, 3, 3), "ctx": 1}),
    ("k311-temporal-only", "chunk_causal", 2, {"t": 5, "k": (3, 1, 1), "ctx": 1}),
    ("k111-two-channel-blocks", "causal", 0, {"t": 2, "k": (1, 1, 1), "cin": 20, "cout": 40}),
    ("k333-two-channel-blocks-batch2", "causal", 0, {"b": 2, "t": 2, "h": 3, "w": 5, "cin": 36, "cout": 20, "ctx": 2}),
    ("several-row-tiles-split-reduction", "chunk_causal", 3, {"b": 2, "t": 4, "h": 6, "w": 6, "cin": 3, "cout": 4}),
]


@pytest.mark.parametrize("name, mode, chunk, kw", CASES, ids=[c[0] for c in CASES])
def test_triton_backward_matches_autograd_fp32(triton_backward, name, mode, chunk, kw):
    case = make_case(bias=False, **kw)
    grad = torch.randn(case["x"].shape[0], kw.get("cout", 6), *case["x"].shape[2:],
                       generator=torch.Generator().manual_seed(3))
    got = triton_backward(grad, case["x"], case["weight"], mode=mode, chunk=chunk, context=case["context"])
    want = autograd_oracle(case, grad, mode, chunk)
    if case["context"] is None or kw.get("k", (3,))[0] == 1:
        assert got[2] is None
        got = (*got[:2], None if case["context"] is None else torch.zeros_like(case["context"]))
    for name_, g, w in zip(("x", "weight", "context"), got, want):
        if w is None:
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape
        # fp32 sums of up to 27 * Cin (dgrad) or B*T*H*W (wgrad) products of O(1) values
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-5, msg=lambda m, n=name_: f"grad {n}: {m}")


@pytest.mark.parametrize("name, mode, chunk, kw", [CASES[i] for i in (0, 3, 5, 11)],
                         ids=[CASES[i][0] for i in (0, 3, 5, 11)])
def test_triton_dgrad_nested_loop_matches_autograd(triton_backward, monkeypatch, name, mode, chunk, kw):
    """The dgrad kernel's other reduction loop (one short loop per tap; the GPU autotuner may pick it)."""
    from dcvg_kernels import conv3d_backward

    monkeypatch.setitem(conv3d_backward.DGRAD_INTERPRET_CONFIG, "FLAT_K", False)
    case = make_case(bias=False, **kw)
    grad = torch.randn(case["x"].shape[0], kw.get("cout", 6), *case["x"].shape[2:],
                       generator=torch.Generator().manual_seed(3))
    got = triton_backward(grad, case["x"], case["weight"], mode=mode, chunk=chunk, context=case["context"])
    want = autograd_oracle(case, grad, mode, chunk)
    torch.testing.assert_close(got[0].double(), want[0], atol=5e-5, rtol=1e-5)
    if want[2] is not None and got[2] is not None:
        torch.testing.assert_close(got[2].double(), want[2], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tap"])
def test_triton_dgrad_weight_tma_matches_autograd(triton_backward, monkeypatch, flat):
    """dgrad with the weights by TMA descriptor (W_TMA configs): Cin = 36 (144-byte rows), Cout = 20
    in 16-channel K blocks, so weight boxes reach into the next tap's rows."""
    from dcvg_kernels import conv3d_backward

    _, mode, chunk, kw = next(c for c in CASES if c[0] == "k333-two-channel-blocks-batch2")
    monkeypatch.setitem(conv3d_backward.DGRAD_INTERPRET_CONFIG, "W_TMA", True)
    monkeypatch.setitem(conv3d_backward.DGRAD_INTERPRET_CONFIG, "FLAT_K", flat)
    case = make_case(bias=False, **kw)
    grad = torch.randn(case["x"].shape[0], kw["cout"], *case["x"].shape[2:], generator=torch.Generator().manual_seed(3))
    got = triton_backward(grad, case["x"], case["weight"], mode=mode, chunk=chunk, context=case["context"])
    want = autograd_oracle(case, grad, mode, chunk)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("name, mode, chunk, kw", [CASES[0], CASES[5], CASES[11]],
                         ids=[CASES[i][0] for i in (0, 5, 11)])
def test_triton_backward_matches_autograd_fp16(triton_backward, name, mode, chunk, kw):
    case = make_case(bias=False, dtype=torch.float16, **kw)
    grad = torch.randn(case["x"].shape[0], kw.get("cout", 6), *case["x"].shape[2:],
                       generator=torch.Generator().manual_seed(3)).half()
    got = triton_backward(grad, case["x"], case["weight"], mode=mode, chunk=chunk, context=case["context"])
    want = autograd_oracle(case, grad, mode, chunk)
    for g, w in zip(got, want):
        if w is not None:
            assert g.dtype == torch.float16
            # fp32 accumulation, one fp16 rounding of |g| up to ~20 (and of wgrad sums ~50)
            torch.testing.assert_close(g.double(), w, atol=3e-2, rtol=2e-3)


def test_triton_backward_keeps_channels_last(triton_backward):
    case = make_case(t=3, ctx=1)
    cl = {n: v.contiguous(memory_format=torch.channels_last_3d) for n, v in case.items() if v is not None and v.dim() == 5}
    grad = torch.randn(1, 6, 3, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    gx, gw, gctx = triton_backward(grad, cl["x"], case["weight"], mode="chunk_causal", chunk=2, context=cl["context"])
    assert gx.is_contiguous(memory_format=torch.channels_last_3d)
    assert gctx.is_contiguous(memory_format=torch.channels_last_3d) and gw.is_contiguous()
    want = autograd_oracle(case, grad, "chunk_causal", 2)
    for g, w in zip((gx, gw, gctx), want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-5)


def test_op_gradients_run_triton_and_match_the_reference(triton_backward, monkeypatch):
    """Autograd through the op with backend="triton" uses the Triton backward (checked by spying)
    and agrees with the torch backend for every input: x, weight, bias, context, residual."""
    from dcvg_kernels import conv3d_backward

    calls = []
    real = conv3d_backward.conv3d_triton_backward
    monkeypatch.setattr(conv3d_backward, "conv3d_triton_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = {n: v.requires_grad_() for n, v in make_case(t=3, h=3, w=4, cin=3, cout=4, ctx=1, residual=True).items()}
    grad = torch.randn(1, 4, 3, 3, 4)
    grads = {}
    for backend in ("triton", "torch"):
        y = chunk_causal_conv3d(case["x"], case["weight"], case["bias"], mode="chunk_causal", chunk=2,
                                context=case["context"], residual=case["residual"], backend=backend)
        grads[backend] = torch.autograd.grad(y, list(case.values()), grad)
    assert calls == [1]
    for g_triton, g_torch in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(g_triton, g_torch, atol=1e-5, rtol=1e-5)


def test_gradcheck_through_the_triton_op_fp32(triton_backward):
    """The conv is linear in each input, so central differences are exact up to fp32 rounding:
    with eps 1e-2 the numerical gradient is good to ~1e-4 and gradcheck runs in fp32."""
    case = {n: v.requires_grad_() for n, v in make_case(t=3, h=2, w=3, cin=2, cout=2, ctx=1, residual=True).items()}
    fn = lambda x, w, b, c, r: chunk_causal_conv3d(x, w, b, mode="chunk_causal", chunk=2, context=c, residual=r,
                                                   backend="triton")
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(fn, tuple(case.values()), eps=1e-2, atol=2e-3, rtol=2e-3, fast_mode=True)


def test_opcheck_backward_op(triton_backward):
    case = make_case(t=3, h=3, w=3, cin=3, cout=4, ctx=1)
    grad = torch.randn(1, 4, 3, 3, 3)
    op = torch.ops.dcvg_kernels.chunk_causal_conv3d_backward
    torch.library.opcheck(op, (grad, case["x"], case["weight"], case["context"], "chunk_causal", 2, "triton"))


def test_reference_backward_still_matches_triton_when_context_unread(triton_backward):
    """kt = 1 with a context: both backends give no context gradient (the op returns zeros)."""
    case = make_case(t=2, k=(1, 3, 3), ctx=1)
    grad = torch.randn(1, 6, 2, 5, 7)
    got = triton_backward(grad, case["x"], case["weight"], mode="causal", context=case["context"])
    ref = conv3d_reference_backward(grad, case["x"], case["weight"], mode="causal", context=case["context"])
    assert got[2] is None and ref[2] is None
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_forward_and_backward(triton_backward):
    case = make_case(t=3, h=3, w=3, cin=3, cout=4, ctx=1, bias=False)
    x, weight, context = (case[n].requires_grad_() for n in ("x", "weight", "context"))
    fn = torch.compile(lambda x, w, c: chunk_causal_conv3d(x, w, None, mode="chunk_causal", chunk=2, context=c,
                                                           backend="triton").square().sum(),
                       fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(fn(x, weight, context), (x, weight, context))
    x64, w64, c64 = (t.detach().double().requires_grad_() for t in (x, weight, context))
    loss = conv3d_reference(x64, w64, None, mode="chunk_causal", chunk=2, context=c64).square().sum()
    for g, w in zip(got, torch.autograd.grad(loss, (x64, w64, c64))):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-5)
