"""Triton fused attention on [B, L, H, D] (kernels.md §3b), flash-attention-2 style.

Forward: one program per (Q block, batch x head) streams K/V blocks with an online softmax in
fp32 (scale·log2(e) folded into one multiplier, exp2), and stores O and the natural-log LSE
[B, H, Lq] that the backward needs. Backward: delta = rowsum(dO·O) (one small kernel), then one
program per KV block accumulates dK, dV over all Q blocks, and one program per Q block
accumulates dQ over all KV blocks (no atomics). Non-causal, no mask: only the tails of Lq and Lk
are masked, in the kernel, and only in the last (peeled) block of each loop, so full blocks run
unmasked and nothing is padded in memory. Head dims up to 128; a head dim that is not a power
of two is masked on the D axis too. Every kernel reads its tiles by masked pointer loads or, on
Hopper and newer where the strides allow, by TMA descriptors; the autotuner picks among both.

Import this module only after TRITON_INTERPRET is settled (`ops` imports it lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dcvg_kernels.reference import check_attention_args
from dcvg_kernels.tma import TensorDescriptor, can_use_tma, runnable_configs

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, row_ok, offs_d, stride_l, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile of one (batch, head) slice; masked rows and padded dims read 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
    if BLOCK_D == HEAD_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_D)[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, row_ok, offs_d, stride_l, val, HEAD_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])


@triton.jit
def _load_tile(base, desc, b, h, start, rows, row_ok, offs_d, stride_l, HEAD_D: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """A [BLOCK, BLOCK_D] tile of rows start.. of one (batch, head): one TMA copy (rows past L
    read 0) or masked pointer loads."""
    if USE_TMA:
        return desc.load([b, start, h * BLOCK_D]).reshape(BLOCK, BLOCK_D)
    return _load_rows(base, rows, row_ok, offs_d, stride_l, HEAD_D, BLOCK_D, MASK)


@triton.jit
def _store_tile(base, desc, b, h, start, rows, row_ok, offs_d, stride_l, val, HEAD_D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a [BLOCK, BLOCK_D] fp32 tile in the tensor's dtype; rows past L are dropped."""
    if USE_TMA:
        desc.store([b, start, h * BLOCK_D], val.to(desc.dtype).reshape(1, BLOCK, BLOCK_D))
    else:
        _store_rows(base, rows, row_ok, offs_d, stride_l, val, HEAD_D)


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b32, h32, start_n, Lk, skl, svl, qk_scale, offs_n,
               offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, USE_TMA: tl.constexpr):
    """One KV block of the online softmax; MASK only for the last, partial block."""
    cols = start_n + offs_n
    col_ok = cols < Lk
    k = _load_tile(k_base, desc_k, b32, h32, start_n, cols, col_ok, offs_d, skl, HEAD_D, BLOCK_D, BLOCK_N, MASK, USE_TMA)
    v = _load_tile(v_base, desc_v, b32, h32, start_n, cols, col_ok, offs_d, svl, HEAD_D, BLOCK_D, BLOCK_N, MASK, USE_TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if FOLD_SCALE:
        # scale > 0 commutes with the row max, so the scale and the shift become one FMA per score
        # (the softmax, not the dots, bounds this loop at d = 128)
        if MASK:  # zero-filled K rows would score 0, not -inf
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    else:
        s = s * qk_scale  # log2 units
        if MASK:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, desc_q, desc_k, desc_v, desc_o,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    H, Lq, Lk, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr, TMA_OK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    """USE_TMA configs read Q/K/V and write O through tensor descriptors (see `tma_descriptors`):
    fewer registers than pointer tiles, and the tails come for free (rows past L read 0, stores
    past L are dropped). They exist only where TMA_OK."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    h32 = pid_bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    q = _load_tile(Q + b * sqb + h * sqh, desc_q, b32, h32, pid_m * BLOCK_M, rows, row_ok, offs_d, sql, HEAD_D,
                   BLOCK_D, BLOCK_M, True, USE_TMA)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b32, h32, start_n, Lk, skl, svl,
                                   qk_scale, offs_n, offs_d, HEAD_D, BLOCK_D, BLOCK_N, False, UPCAST, PRECISION,
                                   FOLD_SCALE, USE_TMA)
    if n_full < Lk:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b32, h32, n_full, Lk, skl, svl,
                                   qk_scale, offs_n, offs_d, HEAD_D, BLOCK_D, BLOCK_N, True, UPCAST, PRECISION,
                                   FOLD_SCALE, USE_TMA)

    acc = acc / l_i[:, None]
    _store_tile(O + b * sob + h * soh, desc_o, b32, h32, pid_m * BLOCK_M, rows, row_ok, offs_d, sol, acc, HEAD_D,
                BLOCK_D, BLOCK_M, USE_TMA)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log of sum_j exp(scale * q·k_j)
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, sol, soh, sdb, sdl, sdh, H, Lq,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO·O (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, rows, row_ok, offs_d, sol, HEAD_D, BLOCK_D, True).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, row_ok, offs_d, sdl, HEAD_D, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, desc_q, desc_do, b32, h32, lse_base, delta_base, start_m, Lq, sql, sdl,
                qk_scale, offs_m, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One Q block's contribution to dK, dV, all in transposed form ([BLOCK_N, BLOCK_M] scores)."""
    rows = start_m + offs_m
    row_ok = rows < Lq
    q = _load_tile(q_base, desc_q, b32, h32, start_m, rows, row_ok, offs_d, sql, HEAD_D, BLOCK_D, BLOCK_M, MASK,
                   USE_TMA)
    do = _load_tile(do_base, desc_do, b32, h32, start_m, rows, row_ok, offs_d, sdl, HEAD_D, BLOCK_D, BLOCK_M, MASK,
                    USE_TMA)
    if MASK:
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        delta = tl.load(delta_base + rows)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
    if MASK:  # Q rows past Lq would otherwise add exp2(0 - 0) = 1
        p_t = tl.where(row_ok[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    H, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    h32 = pid_bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * skb + h * skh, desc_k, b32, h32, pid_n * BLOCK_N, cols, col_ok, offs_d, skl, HEAD_D,
                   BLOCK_D, BLOCK_N, True, USE_TMA)
    v = _load_tile(V + b * svb + h * svh, desc_v, b32, h32, pid_n * BLOCK_N, cols, col_ok, offs_d, svl, HEAD_D,
                   BLOCK_D, BLOCK_N, True, USE_TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + pid_bh.to(tl.int64) * Lq
    delta_base = DELTA + pid_bh.to(tl.int64) * Lq
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    m_full = (Lq // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, desc_q, desc_do, b32, h32, lse_base, delta_base, start_m,
                             Lq, sql, sdl, qk_scale, offs_m, offs_d, HEAD_D, BLOCK_D, BLOCK_M, False, UPCAST, PRECISION,
                             USE_TMA)
    if m_full < Lq:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, desc_q, desc_do, b32, h32, lse_base, delta_base, m_full,
                             Lq, sql, sdl, qk_scale, offs_m, offs_d, HEAD_D, BLOCK_D, BLOCK_M, True, UPCAST, PRECISION,
                             USE_TMA)
    _store_tile(DK + b * skb + h * skh, desc_dk, b32, h32, pid_n * BLOCK_N, cols, col_ok, offs_d, skl, dk * sm_scale,
                HEAD_D, BLOCK_D, BLOCK_N, USE_TMA)
    _store_tile(DV + b * svb + h * svh, desc_dv, b32, h32, pid_n * BLOCK_N, cols, col_ok, offs_d, svl, dv, HEAD_D,
                BLOCK_D, BLOCK_N, USE_TMA)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, desc_k, desc_v, b32, h32, start_n, Lk, skl, svl, qk_scale,
              offs_n, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    cols = start_n + offs_n
    col_ok = cols < Lk
    k = _load_tile(k_base, desc_k, b32, h32, start_n, cols, col_ok, offs_d, skl, HEAD_D, BLOCK_D, BLOCK_N, MASK, USE_TMA)
    v = _load_tile(v_base, desc_v, b32, h32, start_n, cols, col_ok, offs_d, svl, HEAD_D, BLOCK_D, BLOCK_N, MASK, USE_TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASK:  # K rows past Lk would otherwise add exp2(-lse2)
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, desc_q, desc_k, desc_v, desc_do, desc_dq,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    H, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    h32 = pid_bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, desc_q, b32, h32, pid_m * BLOCK_M, rows, row_ok, offs_d, sql, HEAD_D,
                   BLOCK_D, BLOCK_M, True, USE_TMA)
    do = _load_tile(DO + b * sdb + h * sdh, desc_do, b32, h32, pid_m * BLOCK_M, rows, row_ok, offs_d, sdl, HEAD_D,
                    BLOCK_D, BLOCK_M, True, USE_TMA)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, desc_k, desc_v, b32, h32, start_n, Lk, skl, svl,
                       qk_scale, offs_n, offs_d, HEAD_D, BLOCK_D, BLOCK_N, False, UPCAST, PRECISION, USE_TMA)
    if n_full < Lk:
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, desc_k, desc_v, b32, h32, n_full, Lk, skl, svl,
                       qk_scale, offs_n, offs_d, HEAD_D, BLOCK_D, BLOCK_N, True, UPCAST, PRECISION, USE_TMA)
    _store_tile(DQ + b * sqb + h * sqh, desc_dq, b32, h32, pid_m * BLOCK_M, rows, row_ok, offs_d, sql, dq * sm_scale,
                HEAD_D, BLOCK_D, BLOCK_M, USE_TMA)


INTERPRET = isinstance(_attn_fwd, InterpretedFunction)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Started from the Triton tutorial's space,
# then checked by an offline sm_90 compile (tools/bench/compile_report.py, 2026-11-26): configs
# that spilled registers were dropped (every dK/dV config timed on the H200 spilled 104-992 bytes)
# and spill-free ones added; all fit 227 KB of shared memory. The "*_tma" lists are the same
# kernels with descriptor (TMA) loads and stores, tried besides the pointer configs wherever the
# inputs allow descriptors (TMA_OK); they need fewer registers for the same tile.
_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 8, 3)],
    "fwd_tma": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3)],
    "dkdv": [(64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    "dkdv_tma": [(64, 64, 8, 3), (64, 64, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    "dq": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)],
    "dq_tma": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2)],
}
_Q_SIDE = ("desc_q", "desc_o", "desc_do", "desc_dq")  # tiles of BLOCK_M rows; the K side has BLOCK_N


def _set_boxes(nargs):
    """pre_hook of the TMA configs: each descriptor's box follows the config's block sizes."""
    for name, desc in nargs.items():
        if name.startswith("desc_") and desc is not None:
            desc.block_shape = [1, nargs["BLOCK_M" if name in _Q_SIDE else "BLOCK_N"], nargs["BLOCK_D"]]


def attention_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2, tma: bool = False):
    """One config of the attention kernels (what the autotuner picks from; tests and benchmarks
    pass one to `attention_forward` / `attention_backward` to run it alone)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": tma}, num_warps=num_warps,
                         num_stages=num_stages, pre_hook=_set_boxes if tma else None)


def _configs(kernel: str):
    if INTERPRET:  # one config: the interpreter cannot benchmark; 32-row blocks exercise the tails
        return [attention_config(32, 32)]
    tma = [attention_config(*c, tma=True) for c in _CONFIGS[kernel + "_tma"]] if TensorDescriptor is not None else []
    return [attention_config(*c) for c in _CONFIGS[kernel]] + tma


def _prune_tma(configs, nargs, **kwargs):
    """TMA configs only where the launch built descriptors (TMA_OK)."""
    return runnable_configs(configs, nargs, kwargs, {"USE_TMA": "TMA_OK"})


def _tuned(kernel, fn, extra_key=()):
    return triton.autotune(configs=_configs(kernel), key=["HEAD_D", "Lq", "Lk", "TMA_OK", *extra_key],
                           prune_configs_by={"early_config_prune": _prune_tma})(fn)


_fwd_tuned = _tuned("fwd", _attn_fwd, ["FOLD_SCALE"])
_dkdv_tuned = _tuned("dkdv", _attn_bwd_dkdv)
_dq_tuned = _tuned("dq", _attn_bwd_dq)


def _launch(tuned, grid, args, meta, config):
    """Run the autotuned kernel, or one given config (its pre_hook sets the descriptor boxes)."""
    if config is None:
        tuned[grid](*args, **meta)
        return
    if config.kwargs.get("USE_TMA") and not meta["TMA_OK"]:
        raise ValueError("this attention input cannot use a TMA config (see tma_descriptors); pick a pointer config")
    kernel = tuned.fn
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(kernel.arg_names, args)), **meta, **config.all_kwargs()})
    kernel[grid(config.kwargs)](*args, **meta, **config.all_kwargs())


def tma_descriptors(tensors, block_d: int):
    """3D descriptors over the [B, L, H·D] views of [B, L, H, D] tensors (boxes [1, rows, D] at
    (b, row, h·D), so a tail never reaches the next batch element), or None where a rule fails:
    Hopper or newer (or the interpreter), a power-of-two head dim (the box covers the row), heads
    dense (stride(2) == D: not a transposed [B, H, L, D] view), 16-byte aligned base and strides,
    no empty axis. Not 4D boxes [1, rows, 1, D]: the sm_90 compile then moves the tiles through
    registers and the dK/dV kernel spills 384-496 bytes (tools/bench/compile_report.py)."""
    first = tensors[0]
    if not can_use_tma(first, INTERPRET):
        return None
    if first.shape[-1] != block_d or block_d * first.element_size() < 16:
        return None
    for t in tensors:
        size = t.element_size()
        if (t.stride(-1) != 1 or t.stride(2) != block_d or t.data_ptr() % 16
                or any(st * size % 16 for st in t.stride()[:2]) or min(t.shape) == 0):
            return None
    return [TensorDescriptor(t, [t.shape[0], t.shape[1], t.shape[2] * block_d], [t.stride(0), t.stride(1), 1],
                             [1, 16, block_d]) for t in tensors]


def triton_supports(q) -> str | None:
    """Why the Triton kernel cannot take this input (None when it can)."""
    if q.dtype not in DTYPES:
        return f"the Triton attention supports {DTYPES}, got {q.dtype}; use backend='torch'"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"the Triton attention supports head dims 1..{MAX_HEAD_DIM}, got {q.shape[-1]}; use backend='torch'"
    return None


def _launch_checks(q):
    reason = triton_supports(q)
    if reason is not None:
        raise ValueError(reason)
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton attention runs on CUDA, or on CPU in the Triton interpreter; q is on {q.device} and "
            "dcvg_kernels.flash_attention was imported without TRITON_INTERPRET=1 (set it before the first Triton call)")


def _common(q, scale):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))  # NVIDIA dots need K >= 16 for 16-bit inputs
    precision = None
    if q.dtype == torch.float32:  # fp32 follows torch's matmul policy: tf32 unless disabled
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return {"HEAD_D": d, "BLOCK_D": block_d, "UPCAST": INTERPRET, "PRECISION": precision}, scale * LOG2E


def _rows_contiguous(t):
    """Kernels index [B, L, H, D] by strides but need the D axis dense."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(q, k, v, scale: float | None = None, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32 natural log) by the Triton kernel.
    `config` (an `attention_config`) runs that one config instead of the autotuner's pick."""
    check_attention_args(q, k, v)
    _launch_checks(q)
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    meta, qk_scale = _common(q, scale)
    descs = tma_descriptors((q, k, v, out), meta["BLOCK_D"])
    meta.update(FOLD_SCALE=scale > 0, TMA_OK=descs is not None)
    args = (q, k, v, out, lse, *(descs or [None] * 4), *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), h, lq, lk, qk_scale)
    _launch(_fwd_tuned, lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h), args, meta, config)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, grad_lse=None, scale: float | None = None, config=None):
    """(dq, dk, dv) of `attention_forward`, given the saved out and lse; `grad_lse` (optional) is the
    gradient flowing into lse, folded into delta since d lse_i / d s_ij = p_ij. `config` runs that
    one config for both the dK/dV and the dQ kernel instead of the autotuners' picks."""
    _launch_checks(q)
    q, k, v, out, grad_out = (_rows_contiguous(t) for t in (q, k, v, out, grad_out))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if lq == 0:
        return dq, dk.zero_(), dv.zero_()
    if dq.numel() == 0:
        return dq, dk, dv
    meta, qk_scale = _common(q, scale)
    # dq/dk/dv share q/k/v's strides (all dense [B, L, H, D]); grad_out may differ from out
    if dq.stride() != q.stride() or dk.stride() != k.stride() or dv.stride() != v.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(lq, 32), b * h)](out, grad_out, delta, *_bhl(out), *_bhl(grad_out), h, lq,
                                                  HEAD_D=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=32)
    if grad_lse is not None:
        delta = (delta - grad_lse.float()).contiguous()
    lse = lse.contiguous()
    descs = tma_descriptors((q, k, v, grad_out, dq, dk, dv), meta["BLOCK_D"])
    meta["TMA_OK"] = descs is not None
    d_q, d_k, d_v, d_do, d_dq, d_dk, d_dv = descs or [None] * 7
    strides = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(grad_out), h, lq, lk, qk_scale, scale)
    _launch(_dkdv_tuned, lambda m: (triton.cdiv(lk, m["BLOCK_N"]), b * h),
            (q, k, v, grad_out, lse, delta, dk, dv, d_q, d_k, d_v, d_do, d_dk, d_dv, *strides), meta, config)
    _launch(_dq_tuned, lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h),
            (q, k, v, grad_out, lse, delta, dq, d_q, d_k, d_v, d_do, d_dq, *strides), meta, config)
    return dq, dk, dv


def _bhl(t):
    """(batch, row, head) strides of a [B, L, H, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def flops(b: int, h: int, lq: int, lk: int, d: int) -> float:
    """Forward FLOPs of non-causal attention (two GEMMs); the backward is 2.5x this."""
    return 4.0 * b * h * lq * lk * d

