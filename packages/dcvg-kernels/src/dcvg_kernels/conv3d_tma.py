"""The forward conv's TMA path (kernels.md §3a): activations and weights both by tensor descriptor.

A program computes one frame's BH x BW pixel tile for BLOCK_N output channels. Each step of the
reduction (taps x Cin blocks) is two TMA copies: the activation box [1, 1, BH, BW, BLOCK_K] of
the 5D descriptor over [B, T, H, W, Cin] at the tap's shifted (frame, row, column), and the
weight box. The spatial 'same' padding comes free: boxes reaching past the frame's borders, or
at negative coordinates, read zeros. The temporal rule is a scalar per program and tap (all
pixels of a tile share a frame): a frame the rule forbids is read at coordinate -1, also zeros.
Frames before the clip come from the streaming context in a second, short loop over the taps
that reach back (only the first SHIFT frames of a call have any).

No per-pixel address or mask arithmetic is left in the loop: on sm_90 the 8x16x128x64 config
compiles to ~106 registers against ~240 for the pointer kernel (tools/bench/compile_report.py).
Requires channels-last activations with Cin·itemsize a multiple of 16 bytes (so not the RGB
layers) and Hopper or newer; `conv3d.py` falls back to the pointer kernel otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tma_step(acc, x_desc, w_desc, b, frame, h0, w0, tap, k0, col0, Cin,
              KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += one (tap, Cin block) of the implicit GEMM, both operands by TMA."""
    dj = (tap // KW) % KH - KH // 2
    dl = tap % KW - KW // 2
    a = x_desc.load([b, frame, h0 + dj, w0 + dl, k0]).reshape(BH * BW, BLOCK_K)
    w = w_desc.load([tap * Cin + k0, col0])  # rows past this tap's Cin meet zeros in a (past Cin: OOB)
    if UPCAST:  # interpreter: multiply in fp32 (its bf16 arithmetic is wrong)
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def conv3d_fwd_tma_body(
    x_desc, ctx_desc, w_desc, bias_ptr, res_ptr, out_ptr, res_desc, out_desc,
    T, H, W, Cin, Cout, CTX_N, CHUNK,
    srb, src, srt, srh, srw, sob, soc, sot, soh, sow,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_CTX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI_TMA: tl.constexpr,
):
    num_n = tl.cdiv(Cout, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n  # N tiles fastest: programs sharing an activation tile run together
    r = pid // num_n
    n_w = tl.cdiv(W, BW)
    n_h = tl.cdiv(H, BH)
    w0 = (r % n_w) * BW
    r = r // n_w
    h0 = (r % n_h) * BH
    r = r // n_h
    t = r % T
    b = r // T
    col0 = pid_n * BLOCK_N
    if CHUNKED:
        t_end = tl.minimum((t // CHUNK + 1) * CHUNK, T)  # first frame of the next chunk
    else:
        t_end = T

    acc = tl.zeros((BH * BW, BLOCK_N), dtype=tl.float32)
    nk = tl.cdiv(Cin, BLOCK_K)
    for it in range(KT * KH * KW * nk):
        tap = it // nk
        k0 = (it - tap * nk) * BLOCK_K
        s = t + tap // (KH * KW) - SHIFT
        frame = tl.where((s >= 0) & (s < t_end), s, -1)  # -1: a zero box
        acc = _tma_step(acc, x_desc, w_desc, b, frame, h0, w0, tap, k0, col0, Cin, KH, KW, BH, BW, BLOCK_K,
                        UPCAST, PRECISION)
    if HAS_CTX:  # noqa: SIM102 - a compile-time gate, then a run-time one
        if t < SHIFT:  # taps i < SHIFT of the first frames reach before the clip: context frame s + CTX_N
            for it in range(SHIFT * KH * KW * nk):
                tap = it // nk
                k0 = (it - tap * nk) * BLOCK_K
                s = t + tap // (KH * KW) - SHIFT
                frame = tl.where((s < 0) & (s >= -CTX_N), s + CTX_N, -1)
                acc = _tma_step(acc, ctx_desc, w_desc, b, frame, h0, w0, tap, k0, col0, Cin, KH, KW, BH, BW,
                                BLOCK_K, UPCAST, PRECISION)

    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Cout
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if EPI_TMA:
        # channels-last output (and residual): one box each; the store drops what lies past the
        # frame or Cout. A pointer epilogue with a residual needs a [BH*BW, BLOCK_N] tensor of
        # 64-bit addresses and spills on sm_90 (255 registers + 128 B).
        if HAS_RES:
            acc += res_desc.load([b, t, h0, w0, col0]).reshape(BH * BW, BLOCK_N).to(tl.float32)
        out_desc.store([b, t, h0, w0, col0], acc.to(out_desc.dtype).reshape(1, 1, BH, BW, BLOCK_N))
    else:
        rows = tl.arange(0, BH * BW)
        hh = h0 + rows // BW
        ww = w0 + rows % BW
        out_mask = ((hh < H) & (ww < W))[:, None] & col_ok[None, :]
        b64, t64, h64, w64 = b.to(tl.int64), t.to(tl.int64), hh.to(tl.int64), ww.to(tl.int64)
        cols64 = cols.to(tl.int64)
        if HAS_RES:
            r_off = (b64 * srb + t64 * srt + h64 * srh + w64 * srw)[:, None] + cols64[None, :] * src
            acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
        o_off = (b64 * sob + t64 * sot + h64 * soh + w64 * sow)[:, None] + cols64[None, :] * soc
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
