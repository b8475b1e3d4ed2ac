"""dcvg_kernels.attention: the Triton flash-attention kernels (interpreted on CPU, see conftest.py)
against the fp64 torch reference and its autograd, the SDPA fallback, and the custom op's
registration (fake kernel, autograd, opcheck, torch.compile).

The interpreter config uses 32 x 32 blocks, so L = 40 / 70 spans a full and a partial block
and L = 5 / 17 is a tail shorter than one block.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from dcvg_kernels import attention, attention_reference, attention_with_lse
from dcvg_kernels.ops import use_triton_attention

# vs fp64 on the same rounded inputs: fp32 runs full-precision dots in the interpreter; fp16
# rounds P and dS to fp16 before the PV / dS·K dots (as on GPU), ~1e-3 relative.
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 3e-3, "rtol": 3e-3},
       torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


@pytest.fixture
def triton_attention():
    """The Triton path, forced on CPU. Fails (never skips) without triton: CI must install it."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.fail(f"triton is not importable ({e}): the dcvg-kernels Triton tests need it")
    return functools.partial(attention_with_lse, backend="triton")


def make_qkv(*, b=2, lq=40, lk=70, h=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g).to(dtype).requires_grad_() for n in (lq, lk, lk))


def check_against_reference(fn, q, k, v, tol, scale=None):
    """Output, LSE and the gradients of a loss using both (so the LSE gradient path is covered)."""
    out, lse = fn(q, k, v) if scale is None else fn(q, k, v, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    g = torch.Generator().manual_seed(1)
    g_out, g_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad((out.float() * g_out).sum() + (lse * g_lse).sum(), (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_reference(q64, k64, v64, scale)
    want = torch.autograd.grad((out64 * g_out.double()).sum() + (lse64 * g_lse.double()).sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), out64, **tol)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)
    for name, got, ref in zip("qkv", grads, want):
        assert got.dtype == q.dtype
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m, n=name: f"d{n}: {m}")


# (id, make_qkv kwargs)
SHAPES = [
    ("L-not-multiple-of-block", {"lq": 40, "lk": 70, "d": 64}),
    ("cross-attn-Lkv512-short-q-tail", {"b": 1, "lq": 17, "lk": 512, "h": 1, "d": 128}),
    ("exact-blocks-no-tail", {"lq": 64, "lk": 32, "d": 64}),
    ("tails-shorter-than-a-block", {"lq": 5, "lk": 3, "h": 3, "d": 128}),
    ("head-dim-not-power-of-two", {"lq": 33, "lk": 9, "d": 12}),
]


@pytest.mark.parametrize("name, kw", SHAPES, ids=[s[0] for s in SHAPES])
def test_triton_matches_reference_fp32(triton_attention, name, kw):
    check_against_reference(triton_attention, *make_qkv(**kw), TOL[torch.float32])


@pytest.mark.parametrize("name, kw", SHAPES[:2], ids=[s[0] for s in SHAPES[:2]])
def test_triton_matches_reference_fp16(triton_attention, name, kw):
    check_against_reference(triton_attention, *make_qkv(dtype=torch.float16, **kw), TOL[torch.float16])


def test_triton_bf16_through_the_interpreter_upcast(triton_attention):
    """bf16 arithmetic is wrong in the interpreter; the kernels upcast loaded tiles there."""
    check_against_reference(triton_attention, *make_qkv(lq=9, lk=40, h=1, dtype=torch.bfloat16),
                            TOL[torch.bfloat16])


def test_triton_custom_scale(triton_attention):
    check_against_reference(triton_attention, *make_qkv(lq=7, lk=33, h=1, d=16), TOL[torch.float32], scale=0.3)


def test_triton_strided_views(triton_attention):
    """[B, H, L, D] tensors viewed as [B, L, H, D] (what SDPA users hold) run without copies;
    a view with a strided D axis is copied first. Both match the reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).transpose(1, 2).requires_grad_() for n in (20, 37, 37))
    assert not q.is_contiguous()
    check_against_reference(triton_attention, q, k, v, TOL[torch.float32])
    q2 = torch.randn(1, 6, 2, 64, generator=g)[..., ::2].requires_grad_()
    assert q2.stride(-1) == 2
    check_against_reference(triton_attention, q2, *make_qkv(b=1, lq=6, lk=11, d=32)[1:], TOL[torch.float32])


def test_triton_out_equals_attention(triton_attention):
    q, k, v = make_qkv(lq=8, lk=12, h=1, d=16)
    torch.testing.assert_close(attention(q, k, v, backend="triton"), triton_attention(q, k, v)[0], atol=0, rtol=0)


def test_triton_empty_query(triton_attention):
    q, k, v = make_qkv(lq=0, lk=5, d=16)
    out, lse = triton_attention(q, k, v)
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.abs().sum() == 0 and dv.abs().sum() == 0


# --- configs run alone: TMA descriptor loads/stores, and the non-positive-scale branch -----------

TMA_SHAPES = [  # batch boundaries inside a tail block (b = 2), cross-attention, tails shorter than a block
    ("batch-2-ragged", {"lq": 40, "lk": 70, "d": 64}, torch.float32),
    ("cross-attn-Lkv512-fp16", {"b": 1, "lq": 17, "lk": 512, "h": 1, "d": 128}, torch.float16),
    ("tiny-tails", {"lq": 5, "lk": 3, "h": 3, "d": 32}, torch.float32),
]


@pytest.mark.parametrize("name, kw, dtype", TMA_SHAPES, ids=[s[0] for s in TMA_SHAPES])
@pytest.mark.parametrize("block_m", [32, 64])
def test_tma_config_matches_reference(triton_attention, name, kw, dtype, block_m):
    """The descriptor paths (forward, dK/dV, dQ) read tails as zeros and drop the stores past L:
    rows of the next batch element are neither read nor overwritten (b = 2, partial last block)."""
    from dcvg_kernels import flash_attention

    cfg = flash_attention.attention_config(block_m, 32, tma=True)
    q, k, v = (t.detach() for t in make_qkv(dtype=dtype, **kw))
    out, lse = flash_attention.attention_forward(q, k, v, config=cfg)
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=g).to(dtype)
    grads = flash_attention.attention_backward(g_out, q, k, v, out, lse, config=cfg)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_reference(q64, k64, v64)
    want = torch.autograd.grad((out64 * g_out.double()).sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), out64, **TOL[dtype])
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)
    for axis, got, ref in zip("qkv", grads, want):
        torch.testing.assert_close(got.double(), ref, **TOL[dtype], msg=lambda m, n=axis: f"d{n}: {m}")


def test_tma_config_refused_where_descriptors_cannot_work(triton_attention):
    """Head dim 12 is not a power of two (the box covers the row): a TMA config is refused by
    name; the autotuners fall back to pointer configs (the head-dim-12 case above)."""
    from dcvg_kernels import flash_attention

    q, k, v = (t.detach() for t in make_qkv(lq=6, lk=9, d=12))
    assert flash_attention.tma_descriptors((q, k, v), 16) is None
    shifted = torch.randn(1 + 6 * 2 * 16)[1:].view(1, 6, 2, 16)  # base 4 bytes past a 16-byte boundary
    assert flash_attention.tma_descriptors((shifted,), 16) is None
    assert flash_attention.tma_descriptors((shifted.clone(),), 16) is not None
    heads_strided = torch.randn(1, 2, 6, 16).transpose(1, 2)  # a [B, H, L, D] tensor seen as [B, L, H, D]
    assert flash_attention.tma_descriptors((heads_strided,), 16) is None
    with pytest.raises(ValueError, match="cannot use a TMA config"):
        flash_attention.attention_forward(q, k, v, config=flash_attention.attention_config(32, 32, tma=True))


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_forward_with_non_positive_scale(triton_attention, scale):
    """The kernel folds the scale into one FMA after the row max only for scale > 0 (max commutes
    with a positive scale); a negative or zero scale takes the other branch and stays exact."""
    check_against_reference(triton_attention, *make_qkv(lq=7, lk=40, h=1, d=16), TOL[torch.float32], scale=scale)


# --- fallback and backend selection -----------------------------------------------------------

def test_fallback_equals_sdpa():
    q, k, v = make_qkv(lq=9, lk=13, d=16)
    assert not use_triton_attention(q, "auto")  # CPU: SDPA
    got = attention(q, k, v)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(attention(q, k, v, backend="torch", scale=0.2),
                               F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                              scale=0.2).transpose(1, 2), atol=0, rtol=0)
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    g_ref = torch.autograd.grad(attention_reference(q, k, v)[0].sum(), (q, k, v))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_backend_with_lse_matches_reference():
    q, k, v = make_qkv(lq=4, lk=6, d=8, dtype=torch.float16)
    out, lse = attention_with_lse(q, k, v, backend="torch")
    ref_out, ref_lse = attention_reference(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref_out.half())
    torch.testing.assert_close(lse, ref_lse)


def test_backend_selection(triton_attention):
    from dcvg_kernels import flash_attention, ops

    assert ops.MAX_HEAD_DIM == flash_attention.MAX_HEAD_DIM  # ops keeps a copy to stay importable without triton
    q = torch.zeros(1, 1, 1, 64)
    assert not use_triton_attention(q, "auto")
    assert use_triton_attention(q, "triton") and not use_triton_attention(q, "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        use_triton_attention(q, "flash")


def test_dcvg_wan_attention_switch_reaches_the_fallback():
    """dcvg-wan's `attention(q, k, v, "triton")` calls `dcvg_kernels.attention`; on CPU that is SDPA."""
    from dcvg_wan.model import attention as wan_attention

    q, k, v = (t.detach() for t in make_qkv(lq=6, lk=10, d=16))
    torch.testing.assert_close(wan_attention(q, k, v, "triton"), wan_attention(q, k, v, "sdpa"), atol=0, rtol=0)


BAD = {
    "q-3d": (lambda q, k, v: (q[0], k, v), "expected q"),
    "kv-length-mismatch": (lambda q, k, v: (q, k, v[:, :3]), "expected q"),
    "head-dim-mismatch": (lambda q, k, v: (q[..., :8], k, v), "expected q"),
    "dtype-mismatch": (lambda q, k, v: (q.half(), k, v), "one floating-point dtype"),
    "integer": (lambda q, k, v: (q.long(), k.long(), v.long()), "one floating-point dtype"),
    "empty-keys": (lambda q, k, v: (q, k[:, :0], v[:, :0]), "no rows"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_raise_value_errors(triton_attention, backend, name):
    change, message = BAD[name]
    q, k, v = (t.detach() for t in make_qkv(lq=4, lk=5, d=16))
    with pytest.raises(ValueError, match=message):
        attention(*change(q, k, v), backend=backend)


@pytest.mark.parametrize("dtype, d, message", [(torch.float64, 16, "use backend='torch'"),
                                               (torch.float32, 256, "head dims")])
def test_triton_rejects_unsupported_inputs(triton_attention, dtype, d, message):
    q, k, v = (t.detach() for t in make_qkv(lq=2, lk=2, d=d, dtype=dtype))
    with pytest.raises(ValueError, match=message):
        triton_attention(q, k, v)


def test_triton_on_cpu_without_interpreter_raises(triton_attention, monkeypatch):
    from dcvg_kernels import flash_attention

    monkeypatch.setattr(flash_attention, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_attention(*(t.detach() for t in make_qkv(lq=2, lk=2, d=16)))


# --- registration ------------------------------------------------------------------------------

def test_opcheck(triton_attention):
    q, k, v = make_qkv(b=1, lq=8, lk=6, h=1, d=16)
    torch.library.opcheck(torch.ops.dcvg_kernels.flash_attention, (q, k, v, 0.25))


def test_torch_compile_fullgraph_forward_and_backward(triton_attention):
    q, k, v = make_qkv(b=1, lq=8, lk=6, h=1, d=16)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, backend="triton").square().sum(), fullgraph=True,
                       backend="aot_eager")
    got = torch.autograd.grad(fn(q, k, v), (q, k, v))
    want = torch.autograd.grad(attention_reference(q, k, v)[0].square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
