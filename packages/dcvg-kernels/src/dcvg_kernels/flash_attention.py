"""Triton fused attention on [B, L, H, D] (kernels.md §3b), flash-attention-2 style.

Forward: one program per (Q block, batch x head) streams K/V blocks with an online softmax in
fp32 (scale·log2(e) folded into one multiplier, exp2), and stores O and the natural-log LSE
[B, H, Lq] that the backward needs. Backward: delta = rowsum(dO·O) (one small kernel), then one
program per KV block accumulates dK, dV over all Q blocks, and one program per Q block
accumulates dQ over all KV blocks (no atomics). Non-causal, no mask: only the tails of Lq and Lk
are masked, in the kernel, and only in the last (peeled) block of each loop, so full blocks run
unmasked and nothing is padded in memory. Head dims up to 128; a head dim that is not a power
of two is masked on the D axis too.

Import this module only after TRITON_INTERPRET is settled (`ops` imports it lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dcvg_kernels.reference import check_attention_args

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
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, Lk, skl, svl, qk_scale, offs_n, offs_d,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """One KV block of the online softmax; MASK only for the last, partial block."""
    cols = start_n + offs_n
    col_ok = cols < Lk
    k = _load_rows(k_base, cols, col_ok, offs_d, skl, HEAD_D, BLOCK_D, MASK)
    v = _load_rows(v_base, cols, col_ok, offs_d, svl, HEAD_D, BLOCK_D, MASK)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
    if MASK:  # zero-filled K rows would score 0, not -inf
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    H, Lq, Lk, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    q = _load_rows(Q + b * sqb + h * sqh, rows, row_ok, offs_d, sql, HEAD_D, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, Lk, skl, svl, qk_scale, offs_n,
                                   offs_d, HEAD_D, BLOCK_D, False, UPCAST, PRECISION)
    if n_full < Lk:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_full, Lk, skl, svl, qk_scale, offs_n,
                                   offs_d, HEAD_D, BLOCK_D, True, UPCAST, PRECISION)

    acc = acc / l_i[:, None]
    _store_rows(O + b * sob + h * soh, rows, row_ok, offs_d, sol, acc, HEAD_D)
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
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, Lq, sql, sdl, qk_scale, offs_m,
                offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """One Q block's contribution to dK, dV, all in transposed form ([BLOCK_N, BLOCK_M] scores)."""
    rows = start_m + offs_m
    row_ok = rows < Lq
    q = _load_rows(q_base, rows, row_ok, offs_d, sql, HEAD_D, BLOCK_D, MASK)
    do = _load_rows(do_base, rows, row_ok, offs_d, sdl, HEAD_D, BLOCK_D, MASK)
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
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    H, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, cols, col_ok, offs_d, skl, HEAD_D, BLOCK_D, True)
    v = _load_rows(V + b * svb + h * svh, cols, col_ok, offs_d, svl, HEAD_D, BLOCK_D, True)
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
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, Lq, sql, sdl, qk_scale,
                             offs_m, offs_d, HEAD_D, BLOCK_D, False, UPCAST, PRECISION)
    if m_full < Lq:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m_full, Lq, sql, sdl, qk_scale,
                             offs_m, offs_d, HEAD_D, BLOCK_D, True, UPCAST, PRECISION)
    _store_rows(DK + b * skb + h * skh, cols, col_ok, offs_d, skl, dk * sm_scale, HEAD_D)
    _store_rows(DV + b * svb + h * svh, cols, col_ok, offs_d, svl, dv, HEAD_D)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, Lk, skl, svl, qk_scale, offs_n, offs_d,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    cols = start_n + offs_n
    col_ok = cols < Lk
    k = _load_rows(k_base, cols, col_ok, offs_d, skl, HEAD_D, BLOCK_D, MASK)
    v = _load_rows(v_base, cols, col_ok, offs_d, svl, HEAD_D, BLOCK_D, MASK)
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
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    H, Lq, Lk, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, row_ok, offs_d, sql, HEAD_D, BLOCK_D, True)
    do = _load_rows(DO + b * sdb + h * sdh, rows, row_ok, offs_d, sdl, HEAD_D, BLOCK_D, True)
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
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, Lk, skl, svl, qk_scale, offs_n, offs_d,
                       HEAD_D, BLOCK_D, False, UPCAST, PRECISION)
    if n_full < Lk:
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, n_full, Lk, skl, svl, qk_scale, offs_n, offs_d,
                       HEAD_D, BLOCK_D, True, UPCAST, PRECISION)
    _store_rows(DQ + b * sqb + h * sqh, rows, row_ok, offs_d, sql, dq * sm_scale, HEAD_D)


INTERPRET = isinstance(_attn_fwd, InterpretedFunction)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Started from the Triton tutorial's space,
# then checked by an offline sm_90 compile (tools/bench/compile_report.py, 2026-11-26): configs
# that spilled registers were dropped (every dK/dV config timed on the H200 spilled 104-992 bytes)
# and spill-free ones added; all fit 227 KB of shared memory.
_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 8, 3),
            (128, 32, 4, 4)],
    "dkdv": [(64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    "dq": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)],
}


def _configs(kernel: str):
    if INTERPRET:  # one config: the interpreter cannot benchmark; 32-row blocks exercise the tails
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _CONFIGS[kernel]]


_KEY = ["HEAD_D", "Lq", "Lk"]
_fwd_tuned = triton.autotune(configs=_configs("fwd"), key=_KEY)(_attn_fwd)
_dkdv_tuned = triton.autotune(configs=_configs("dkdv"), key=_KEY)(_attn_bwd_dkdv)
_dq_tuned = triton.autotune(configs=_configs("dq"), key=_KEY)(_attn_bwd_dq)


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


def attention_forward(q, k, v, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32 natural log) by the Triton kernel."""
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
    grid = lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)
    _fwd_tuned[grid](q, k, v, out, lse, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), h, lq, lk, qk_scale, **meta)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, grad_lse=None, scale: float | None = None):
    """(dq, dk, dv) of `attention_forward`, given the saved out and lse; `grad_lse` (optional) is the
    gradient flowing into lse, folded into delta since d lse_i / d s_ij = p_ij."""
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
    args = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(grad_out), h, lq, lk, qk_scale, scale)
    _dkdv_tuned[lambda m: (triton.cdiv(lk, m["BLOCK_N"]), b * h)](q, k, v, grad_out, lse, delta, dk, dv, *args, **meta)
    _dq_tuned[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)](q, k, v, grad_out, lse, delta, dq, *args, **meta)
    return dq, dk, dv


def _bhl(t):
    """(batch, row, head) strides of a [B, L, H, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def flops(b: int, h: int, lq: int, lk: int, d: int) -> float:
    """Forward FLOPs of non-causal attention (two GEMMs); the backward is 2.5x this."""
    return 4.0 * b * h * lq * lk * d

