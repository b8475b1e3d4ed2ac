"""Triton backward of the chunk-causal conv3d: input gradient (dgrad) and weight gradient (wgrad).

Forward rule (reference.py): output frame t, tap i reads input frame s = t + i - SHIFT when
-n <= s < T and, for chunk length C, s < (t // C + 1)·C. Its adjoint, the rule of dgrad: input
frame s (s < 0: context frame n + s) receives from output frame t = s + SHIFT - i when
0 <= t < T and, for s >= 0, t >= (s // C)·C (t's chunk is not before s's chunk: the forward lets
later chunks read back, never forward, so gradient flows back from the same or later chunks,
never from earlier ones). The rule is not symmetric, so dgrad is not the forward run with
flipped taps; it has its own temporal mask. Spatially it is the forward with flipped taps.

* dgrad: implicit GEMM over rows (b, f, h, w), f in [0, n + T) (the first n frames are the
  context gradient), columns Cin, reduction over taps x Cout; one store per tile, to gx or gctx.
* wgrad: per tap a [Cin, Cout] GEMM reducing over the M = B·T·H·W output positions, the source
  rows gathered with the forward's mask; the reduction is split over a grid axis into fp32
  partials that the host sums (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dcvg_kernels.conv3d import DTYPES, INTERPRET, accumulate_tap, prune_weight_tma, weight_descriptor, with_weight_tma
from dcvg_kernels.reference import check_conv3d_args, output_memory_format


@triton.jit
def _conv3d_dgrad(
    g_ptr, w_ptr, gx_ptr, gc_ptr, w_desc,
    M, T, H, W, Cin, Cout, CTX_N, CHUNK,
    sgb, sgt, sgh, sgw,  # grad strides; channels contiguous
    sxb, sxc, sxt, sxh, sxw,  # gx strides (any layout)
    scb, scc, sct, sch, scw,  # gctx strides (any layout)
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_CTX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BIG_M: tl.constexpr = False,  # M >= 2^31: row indices in int64 (else int32, as in the forward)
    FLAT_K: tl.constexpr = False,  # one dynamic loop over taps x Cout blocks (as the forward's FLAT_K)
    W_TMA_OK: tl.constexpr = False,  # w_desc is a descriptor (the autotuner may pick W_TMA configs)
    W_TMA: tl.constexpr = False,  # weights (B) by TMA descriptor w_desc, as in the forward
):
    num_n = tl.cdiv(Cin, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n

    if BIG_M:  # rows run over B x (n + T) x H x W
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    w_o = rows % W
    r = rows // W
    h_o = r % H
    r = r // H
    f_o = r % (T + CTX_N)
    b_o = r // (T + CTX_N)
    s = f_o - CTX_N  # this row's input frame; < 0: a context frame
    if CHUNKED:
        t_first = tl.where(s >= 0, (s // CHUNK) * CHUNK, 0)  # first output frame allowed to read s
    else:
        t_first = 0

    b64, s64, h64, w64 = b_o.to(tl.int64), s.to(tl.int64), h_o.to(tl.int64), w_o.to(tl.int64)
    g_base = b64 * sgb + s64 * sgt + h64 * sgh + w64 * sgw  # grad offset of (b, s, h, w); taps add constants

    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Cin
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        nk = tl.cdiv(Cout, BLOCK_K)
        for it in range(KT * KH * KW * nk):
            tap = it // nk
            k0 = (it - tap * nk) * BLOCK_K
            dt = SHIFT - tap // (KH * KW)  # output frame t = s + dt read this row's frame with this tap
            dh = (tap // KW) % KH - KH // 2
            dw = tap % KW - KW // 2
            t = s + dt
            hh = h_o - dh
            ww = w_o - dw
            ok = row_ok & (t >= t_first) & (t < T) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            g_row = g_ptr + (g_base + (dt * sgt - dh * sgh - dw * sgw))
            kk = k0 + ks
            acc = accumulate_tap(acc, g_row, ok, k0, kk, kk < Cout, w_ptr, w_desc, tap * Cout, Cin, col0, cols, col_ok,
                                 UPCAST, PRECISION, W_TMA)
    else:
        for i in tl.static_range(KT):
            t = s + (SHIFT - i)  # the output frame whose tap i read frame s
            t_ok = row_ok & (t >= t_first) & (t < T)
            for j in tl.static_range(KH):
                hh = h_o - (j - KH // 2)
                for l in tl.static_range(KW):
                    ww = w_o - (l - KW // 2)
                    ok = t_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                    g_row = g_ptr + (g_base + ((SHIFT - i) * sgt - (j - KH // 2) * sgh - (l - KW // 2) * sgw))
                    w_tap = ((i * KH + j) * KW + l) * Cout
                    for k0 in range(0, Cout, BLOCK_K):
                        kk = k0 + ks
                        acc = accumulate_tap(acc, g_row, ok, k0, kk, kk < Cout, w_ptr, w_desc, w_tap, Cin, col0, cols,
                                             col_ok, UPCAST, PRECISION, W_TMA)


    cols64 = cols.to(tl.int64)
    out_mask = row_ok[:, None] & col_ok[None, :]
    x_off = (b64 * sxb + s64 * sxt + h64 * sxh + w64 * sxw)[:, None] + cols64[None, :] * sxc
    out = gx_ptr + x_off
    if HAS_CTX:
        c_off = (b64 * scb + f_o.to(tl.int64) * sct + h64 * sch + w64 * scw)[:, None] + cols64[None, :] * scc
        out = tl.where((s >= 0)[:, None], out, gc_ptr + c_off)
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv3d_wgrad(
    x_ptr, ctx_ptr, g_ptr, ws_ptr,
    M, T, H, W, Cin, Cout, CTX_N, CHUNK, ROWS_PER_SPLIT,
    sxb, sxt, sxh, sxw,  # x strides; channels contiguous
    scb, sct, sch, scw,  # context strides; channels contiguous
    sgb, sgt, sgh, sgw,  # grad strides; channels contiguous
    KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_CTX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (Cin tiles x Cout tiles, taps, splits of M)
    num_n = tl.cdiv(Cout, BLOCK_N)
    pid_k = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    tap = tl.program_id(1)
    split = tl.program_id(2)
    i = tap // (KH * KW)
    j = (tap // KW) % KH
    l = tap % KW

    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # Cin
    k_ok = kk < Cin
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # Cout
    col_ok = cols < Cout
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)

    m_start = split.to(tl.int64) * ROWS_PER_SPLIT
    m_stop = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # output positions (b, t, h, w)
        row_ok = rows < m_stop
        w_o = rows % W
        r = rows // W
        h_o = r % H
        r = r // H
        t_o = r % T
        b_o = r // T
        if CHUNKED:
            t_end = tl.minimum((t_o // CHUNK + 1) * CHUNK, T)
        else:
            t_end = T
        s = t_o + (i - SHIFT)
        hh = h_o + (j - KH // 2)
        ww = w_o + (l - KW // 2)
        ok = row_ok & (s < t_end) & (s >= -CTX_N) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        a_row = x_ptr + (b_o * sxb + s * sxt + hh * sxh + ww * sxw)
        if HAS_CTX:
            c_row = ctx_ptr + (b_o * scb + (s + CTX_N) * sct + hh * sch + ww * scw)
            a_row = tl.where(s >= 0, a_row, c_row)
        a_t = tl.load(a_row[None, :] + kk[:, None], mask=k_ok[:, None] & ok[None, :], other=0.0)  # [Cin, M]
        g = tl.load(g_ptr + (b_o * sgb + t_o * sgt + h_o * sgh + w_o * sgw)[:, None] + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a_t = a_t.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(a_t, g, acc, input_precision=PRECISION)

    ws_off = ((split * tl.num_programs(1) + tap).to(tl.int64) * Cin + kk)[:, None] * Cout + cols[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=k_ok[:, None] & col_ok[None, :])


# Interpreter: one fixed config (tests switch FLAT_K and W_TMA to cover both loops and weight paths),
# as in the forward.
DGRAD_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "FLAT_K": True, "W_TMA": False}


def _dgrad_configs():
    if INTERPRET:
        return [triton.Config(dict(DGRAD_INTERPRET_CONFIG))]
    # flat loops only (the per-tap form compiles for ~30 s per config on sm_90; DCVG_KERNELS_PER_TAP=1
    # adds one, as in the forward); none of these spills (tools/bench/compile_report.py)
    # a weight-TMA twin of the 128x128x64 tile only (203 registers against 224; the 128x128x32 twin
    # needs 216 against 128)
    flat = with_weight_tma([
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "FLAT_K": True}, num_warps=8, num_stages=3),
    ]) + [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "FLAT_K": True}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "FLAT_K": True}, num_warps=4, num_stages=4),
    ]
    if os.environ.get("DCVG_KERNELS_PER_TAP") == "1":
        flat.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4))
    return flat


_dgrad_tuned = triton.autotune(configs=_dgrad_configs(), key=["Cin", "Cout", "KT", "KH", "KW", "W_TMA_OK"],
                               prune_configs_by={"early_config_prune": prune_weight_tma})(_conv3d_dgrad)
# wgrad: one fixed tile (the split count depends on it, so it is chosen on the host); untuned.
WGRAD_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16} if INTERPRET else {
    "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
WGRAD_TARGET_PROGRAMS = 64 if INTERPRET else 4 * 132  # interpreter: exercise the split; H100: waves over 132 SMs


def _precision(dtype):
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return None


def _channels_last(t):
    t = t.contiguous(memory_format=torch.channels_last_3d)
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"expected a channels-last dense tensor after conversion, strides {t.stride()}")
    return t


def conv3d_triton_backward(grad, x, weight, *, mode, chunk=0, context=None):
    """(grad_x, grad_weight, grad_context or None) of `reference.conv3d_reference`, by Triton.

    grad_x and grad_context keep the layouts of x and context; grad_weight is contiguous.
    """
    plan = check_conv3d_args(x, weight, None, mode=mode, chunk=chunk, context=context, residual=None)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton conv3d supports {DTYPES}, got {x.dtype}; use the torch backend")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton conv3d runs on CUDA, or on CPU in the Triton interpreter; x is on {x.device} and "
            "dcvg_kernels.conv3d was imported without TRITON_INTERPRET=1 (set it before the first Triton call)")
    b, cin, t, h, w = x.shape
    cout, _, kt, kh, kw = weight.shape
    n = context.shape[2] if plan.use_context else 0
    gx = torch.empty_like(x, memory_format=output_memory_format(x))
    gctx = torch.empty_like(context, memory_format=output_memory_format(context)) if n else None
    if grad.numel() == 0:
        return gx.zero_(), torch.zeros_like(weight), None if gctx is None else gctx.zero_()
    g = _channels_last(grad)
    xl = _channels_last(x)
    ctx = _channels_last(context) if n else xl
    gc = gctx if n else gx
    precision = _precision(x.dtype)
    common = {"CHUNKED": plan.chunk > 0, "HAS_CTX": n > 0, "UPCAST": INTERPRET, "PRECISION": precision}
    sg = g.stride()

    # dgrad: B operand [kt, kh, kw, Cout, Cin], reduction index = tap * Cout + co, Cin contiguous
    wd = weight.permute(2, 3, 4, 0, 1).contiguous()
    m_rows = b * (n + t) * h * w
    grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(cin, meta["BLOCK_N"]),)
    kernel = _conv3d_dgrad[grid] if INTERPRET else _dgrad_tuned[grid]
    w_desc = weight_descriptor(wd.view(-1, cin), [DGRAD_INTERPRET_CONFIG["BLOCK_K"], DGRAD_INTERPRET_CONFIG["BLOCK_N"]])
    if INTERPRET and DGRAD_INTERPRET_CONFIG["W_TMA"] and w_desc is None:
        raise ValueError("DGRAD_INTERPRET_CONFIG asks for W_TMA, but these weights cannot have a descriptor")
    kernel(
        g, wd, gx, gc, w_desc, m_rows, t, h, w, cin, cout, n, max(plan.chunk, 1),
        sg[0], sg[2], sg[3], sg[4], *gx.stride(), *gc.stride(),
        KT=kt, KH=kh, KW=kw, SHIFT=plan.shift, BIG_M=m_rows >= 2**31, W_TMA_OK=w_desc is not None, **common,
        **(DGRAD_INTERPRET_CONFIG if INTERPRET else {}))

    # wgrad: fp32 partials [splits, taps, Cin, Cout], summed here
    m = b * t * h * w
    bm, bn, bk = WGRAD_BLOCKS["BLOCK_M"], WGRAD_BLOCKS["BLOCK_N"], WGRAD_BLOCKS["BLOCK_K"]
    taps = kt * kh * kw
    tiles = triton.cdiv(cin, bk) * triton.cdiv(cout, bn)
    m_tiles = triton.cdiv(m, bm)
    splits = max(1, min(m_tiles, triton.cdiv(WGRAD_TARGET_PROGRAMS, tiles * taps)))
    rows_per_split = triton.cdiv(m_tiles, splits) * bm
    splits = triton.cdiv(m, rows_per_split)
    ws = torch.empty((splits, taps, cin, cout), dtype=torch.float32, device=x.device)
    sx, sc = xl.stride(), ctx.stride()
    _conv3d_wgrad[(tiles, taps, splits)](
        xl, ctx, g, ws, m, t, h, w, cin, cout, n, max(plan.chunk, 1), rows_per_split,
        sx[0], sx[2], sx[3], sx[4], sc[0], sc[2], sc[3], sc[4], sg[0], sg[2], sg[3], sg[4],
        KH=kh, KW=kw, SHIFT=plan.shift, **common, **WGRAD_BLOCKS)
    gw = ws.sum(0).view(kt, kh, kw, cin, cout).permute(4, 3, 0, 1, 2).contiguous().to(weight.dtype)
    return gx, gw, gctx
