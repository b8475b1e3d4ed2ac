"""Triton forward kernel of the chunk-causal conv3d (kernels.md §3a), pointer path.

Implicit GEMM over channels-last activations: rows are output positions (b, t, h, w), columns
are Cout, the reduction runs over taps (static) x Cin (tiled by BLOCK_K). The temporal rule of
`reference.py` is evaluated per tap and row in the kernel, and frames before the clip are read
straight from the streaming context: no padded or concatenated copy of the input is made.
Bias and an optional residual are added to the fp32 accumulator before the single store.

Import this module only after TRITON_INTERPRET is settled: Triton reads it when the kernel is
decorated (`ops` imports it lazily, on the first Triton call).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dcvg_kernels.conv3d_tma import conv3d_fwd_tma_body
from dcvg_kernels.reference import check_conv3d_args, output_memory_format
from dcvg_kernels.tma import TensorDescriptor, can_use_tma, runnable_configs

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def accumulate_tap(acc, a_rows, row_ok, k0, kk, k_ok, w_ptr, w_desc, w_row0, n_cols, col0, cols, col_ok,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_TMA: tl.constexpr):
    """acc += A[rows, kk] @ B[w_row0 + kk, cols]: one K block of one tap of the implicit GEMM.
    A rows start at the pointers `a_rows` (channels contiguous), B is [K, n_cols] row-major, read
    by masked pointer loads or (W_TMA) as one TMA box at (w_row0 + k0, col0): its rows past this
    tap's channels belong to the next tap (or read 0 past the end) and meet zeros in A (k_ok),
    its columns past n_cols read 0."""
    a = tl.load(a_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if W_TMA:
        b = w_desc.load([w_row0 + k0, col0])
    else:
        b = tl.load(w_ptr + (w_row0 + kk)[:, None] * n_cols + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
    if UPCAST:  # interpreter: multiply in fp32 (its bf16 arithmetic is wrong)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _conv3d_fwd(
    x_ptr, ctx_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, w_desc, x_desc, ctx_desc, res_desc, out_desc,
    M, T, H, W, Cin, Cout, CTX_N, CHUNK,
    sxb, sxt, sxh, sxw,  # x strides in elements; channels are contiguous (stride 1)
    scb, sct, sch, scw,  # context strides; channels contiguous
    srb, src, srt, srh, srw,  # residual strides (any layout)
    sob, soc, sot, soh, sow,  # output strides (any layout)
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SHIFT: tl.constexpr,  # tap i reads input frame t + i - SHIFT
    CHUNKED: tl.constexpr, HAS_CTX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: multiply in fp32 (its bf16 arithmetic is wrong)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT_K: tl.constexpr = False,  # one dynamic loop over taps x Cin blocks (pipelines across taps)
    BIG_M: tl.constexpr = False,  # M >= 2^31: row indices in int64
    W_TMA_OK: tl.constexpr = False,  # w_desc is a descriptor (the autotuner may pick W_TMA configs)
    W_TMA: tl.constexpr = False,  # weights (B) by TMA descriptor w_desc
    A_TMA_OK: tl.constexpr = False,  # x_desc (and ctx_desc) are descriptors (A_TMA configs allowed)
    A_TMA: tl.constexpr = False,  # the TMA path (conv3d_tma.py): activations by x_desc/ctx_desc too
    BH: tl.constexpr = 1, BW: tl.constexpr = 1,  # A_TMA: the pixel tile (BLOCK_M = BH * BW)
    EPI_TMA: tl.constexpr = False,  # A_TMA: out (and residual) by res_desc/out_desc (channels-last)
):
    if A_TMA:
        conv3d_fwd_tma_body(x_desc, ctx_desc, w_desc, bias_ptr, res_ptr, out_ptr, res_desc, out_desc, T, H, W, Cin,
                            Cout, CTX_N, CHUNK, srb, src, srt, srh, srw, sob, soc, sot, soh, sow, KT, KH, KW, SHIFT,
                            CHUNKED, HAS_CTX, HAS_BIAS, HAS_RES, UPCAST, PRECISION, BH, BW, BLOCK_N, BLOCK_K, EPI_TMA)
    else:
        _pointer_body(x_ptr, ctx_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, w_desc, M, T, H, W, Cin, Cout, CTX_N, CHUNK,
                      sxb, sxt, sxh, sxw, scb, sct, sch, scw, srb, src, srt, srh, srw, sob, soc, sot, soh, sow,
                      KT, KH, KW, SHIFT, CHUNKED, HAS_CTX, HAS_BIAS, HAS_RES, UPCAST, PRECISION,
                      BLOCK_M, BLOCK_N, BLOCK_K, FLAT_K, BIG_M, W_TMA)


@triton.jit
def _pointer_body(
    x_ptr, ctx_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, w_desc,
    M, T, H, W, Cin, Cout, CTX_N, CHUNK,
    sxb, sxt, sxh, sxw, scb, sct, sch, scw, srb, src, srt, srh, srw, sob, soc, sot, soh, sow,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_CTX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT_K: tl.constexpr, BIG_M: tl.constexpr,
    W_TMA: tl.constexpr,
):
    """The pointer path: rows are flat output positions, masked loads carry the temporal rule and
    the spatial borders; weights by pointers or (W_TMA) descriptor."""
    # 1D grid, N tiles fastest: programs sharing an A tile run together, and the M tile count
    # (up to ~3e5 at 720p) stays clear of the 65535 limit of grid axes 1 and 2.
    num_n = tl.cdiv(Cout, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n

    # Output positions in int32 (int64 only past 2^31 rows: 32-bit index math keeps registers free
    # for the pipelined tiles); element offsets are int64, as tensors pass 2^31 elements on video.
    if BIG_M:
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    w_o = rows % W
    r = rows // W
    h_o = r % H
    r = r // H
    t_o = r % T
    b_o = r // T
    if CHUNKED:
        t_end = tl.minimum((t_o // CHUNK + 1) * CHUNK, T)  # first frame of the next chunk
    else:
        t_end = T
    b64, t64, h64, w64 = b_o.to(tl.int64), t_o.to(tl.int64), h_o.to(tl.int64), w_o.to(tl.int64)
    row_base = b64 * sxb + t64 * sxt + h64 * sxh + w64 * sxw  # offset of (b, t, h, w, c=0) in x
    if HAS_CTX:  # offset of the same (h, w) in frame t + CTX_N of the context (frame t - n of the clip)
        ctx_base = ctx_ptr + (b64 * scb + (t64 + CTX_N) * sct + h64 * sch + w64 * scw)

    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Cout
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        # The reduction as one loop of KT*KH*KW*cdiv(Cin, BLOCK_K) steps, so that the software
        # pipeliner overlaps the loads of the next tap with this tap's dot; the nested form below
        # has one short loop per tap (Cin / BLOCK_K steps), each with its own prologue.
        nk = tl.cdiv(Cin, BLOCK_K)
        for it in range(KT * KH * KW * nk):
            tap = it // nk
            k0 = (it - tap * nk) * BLOCK_K
            di = tap // (KH * KW) - SHIFT
            dj = (tap // KW) % KH - KH // 2
            dl = tap % KW - KW // 2
            s = t_o + di
            hh = h_o + dj
            ww = w_o + dl
            ok = row_ok & (s < t_end) & (s >= -CTX_N) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            a_row = x_ptr + (row_base + (di * sxt + dj * sxh + dl * sxw))
            if HAS_CTX:
                a_row = tl.where(s >= 0, a_row, ctx_base + (di * sct + dj * sch + dl * scw))
            kk = k0 + ks
            acc = accumulate_tap(acc, a_row, ok, k0, kk, kk < Cin, w_ptr, w_desc, tap * Cin, Cout, col0, cols, col_ok,
                                 UPCAST, PRECISION, W_TMA)
    else:
        for i in tl.static_range(KT):
            s = t_o + (i - SHIFT)  # input frame of this tap; < 0 means the context
            t_ok = row_ok & (s < t_end) & (s >= -CTX_N)
            for j in tl.static_range(KH):
                hh = h_o + (j - KH // 2)
                for l in tl.static_range(KW):
                    ww = w_o + (l - KW // 2)
                    ok = t_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                    di, dj, dl = i - SHIFT, j - KH // 2, l - KW // 2
                    a_row = x_ptr + (row_base + (di * sxt + dj * sxh + dl * sxw))
                    if HAS_CTX and i < SHIFT:  # only taps reaching back can leave the clip
                        a_row = tl.where(s >= 0, a_row, ctx_base + (di * sct + dj * sch + dl * scw))
                    w_tap = ((i * KH + j) * KW + l) * Cin
                    for k0 in range(0, Cin, BLOCK_K):
                        kk = k0 + ks
                        acc = accumulate_tap(acc, a_row, ok, k0, kk, kk < Cin, w_ptr, w_desc, w_tap, Cout, col0, cols,
                                             col_ok, UPCAST, PRECISION, W_TMA)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cols64 = cols.to(tl.int64)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        r_off = (b64 * srb + t64 * srt + h64 * srh + w64 * srw)[:, None] + cols64[None, :] * src
        acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    o_off = (b64 * sob + t64 * sot + h64 * soh + w64 * sow)[:, None] + cols64[None, :] * soc
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


INTERPRET = isinstance(_conv3d_fwd, InterpretedFunction)


# The interpreter cannot benchmark, so it runs one fixed config (small tiles test the masks);
# tests switch FLAT_K and W_TMA to cover both reduction loops and both weight paths.
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "FLAT_K": True, "W_TMA": False, "A_TMA": False,
                    "BH": 1, "BW": 1}


def _set_w_box(nargs):
    """pre_hook of the W_TMA configs: the weight descriptor's box is one [BLOCK_K, BLOCK_N] tile."""
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def with_weight_tma(configs):
    """The configs plus, where this triton has descriptors, W_TMA twins of them (weights by TMA)."""
    if TensorDescriptor is None:
        return configs
    return configs + [triton.Config({**c.kwargs, "W_TMA": True}, num_warps=c.num_warps, num_stages=c.num_stages,
                                    pre_hook=_set_w_box) for c in configs]


def _set_tma_boxes(nargs):
    """pre_hook of the A_TMA configs: weight box [BLOCK_K, BLOCK_N], activation boxes
    [1, 1, BH, BW, BLOCK_K] (the context's too), output/residual boxes [1, 1, BH, BW, BLOCK_N]."""
    _set_w_box(nargs)
    for name, channels in (("x_desc", "BLOCK_K"), ("ctx_desc", "BLOCK_K"), ("res_desc", "BLOCK_N"),
                           ("out_desc", "BLOCK_N")):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, 1, nargs["BH"], nargs["BW"], nargs[channels]]


def tma_path_config(bh: int, bw: int, block_n: int, block_k: int, num_warps: int, num_stages: int):
    """A config of the TMA path (conv3d_tma.py): a BH x BW pixel tile of one frame."""
    return triton.Config({"BLOCK_M": bh * bw, "BLOCK_N": block_n, "BLOCK_K": block_k, "A_TMA": True, "W_TMA": True,
                          "BH": bh, "BW": bw}, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_tma_boxes)


def _prune_forward(configs, nargs, **kwargs):
    """W_TMA / A_TMA configs only where the launch built those descriptors."""
    return runnable_configs(configs, nargs, kwargs, {"W_TMA": "W_TMA_OK", "A_TMA": "A_TMA_OK"})


def ndhwc_descriptors(tensors, box):
    """5D descriptors over the [B, T, H, W, C] memory of channels-last tensors (the TMA path's
    activations, context, residual and output), or None where a rule fails: Hopper or newer (or
    the interpreter), channels dense, C·itemsize and every stride a multiple of 16 bytes, a 16-byte
    aligned base. `box` is the interpreter's; on the GPU the config's pre_hook sets it."""
    if not can_use_tma(tensors[0], INTERPRET):
        return None
    descs = []
    for tensor in tensors:
        b, c, t, h, w = tensor.shape
        # a size-1 axis may carry any stride in torch; give it the dense channels-last one
        dense = (t * h * w * c, 1, h * w * c, w * c, c)
        st = [d if n == 1 else s for n, s, d in zip(tensor.shape, tensor.stride(), dense)]
        size = tensor.element_size()
        if st[1] != 1 or tensor.data_ptr() % 16 or any(v * size % 16 for v in (st[0], st[2], st[3], st[4])):
            return None
        descs.append(TensorDescriptor(tensor, [b, t, h, w, c], [st[0], st[2], st[3], st[4], 1], box))
    return descs


def activation_descriptors(xl, ctx, use_context: bool, interpret_box=None):
    """(x_desc, ctx_desc) for the TMA path (ctx_desc None without a context), or None."""
    descs = ndhwc_descriptors([xl, ctx] if use_context else [xl], interpret_box or [1, 1, 8, 8, 16])
    return None if descs is None else (descs[0], descs[1] if use_context else None)


def prune_weight_tma(configs, nargs, **kwargs):
    """W_TMA configs only where the launch built a weight descriptor (W_TMA_OK)."""
    return runnable_configs(configs, nargs, kwargs, {"W_TMA": "W_TMA_OK"})


def weight_descriptor(w2d, interpret_box=None):
    """A TMA descriptor over the GEMM's B operand [K, N] (row-major), or None where a TMA rule
    fails: Hopper or newer (or the interpreter), N·itemsize a multiple of 16 bytes (the RGB layers'
    3 channels are not), a 16-byte aligned base. `interpret_box` is the box for the interpreter's
    fixed config; on the GPU the config's pre_hook sets it."""
    if not can_use_tma(w2d, INTERPRET):
        return None
    if w2d.stride(1) != 1 or w2d.stride(0) * w2d.element_size() % 16 or w2d.data_ptr() % 16:
        return None
    return TensorDescriptor(w2d, list(w2d.shape), list(w2d.stride()), interpret_box or [16, 16])


def _configs():
    if INTERPRET:
        return [triton.Config(dict(INTERPRET_CONFIG))]
    # A per-tap config compiles for 20-30 s on sm_90 (27 unrolled loops) against ~1 s for a flat one,
    # once per layer shape on a cold cache: with a handful of shapes per model that is minutes on a
    # first call, so the autotuner gets flat configs only, unless DCVG_KERNELS_PER_TAP=1 adds the
    # per-tap config timed on the H200 on 2026-11-25 (to compare the two loops side by side).
    nested = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ] if os.environ.get("DCVG_KERNELS_PER_TAP") == "1" else []
    # Chosen from an offline sm_90 compile (tools/bench/compile_report.py): none of these spills
    # registers; 128x256 and 256x128 tiles did, so they are left out. Weight-TMA twins only of the
    # 128x128x64 tiles: 150 registers instead of 240; for the other tiles TMA weights need as many
    # registers or more than pointer loads.
    k64 = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "FLAT_K": True}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "FLAT_K": True}, num_warps=8, num_stages=4),
    ]
    others = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "FLAT_K": True}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "FLAT_K": True}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "FLAT_K": True}, num_warps=4, num_stages=4),
    ]
    # The TMA path (conv3d_tma.py): 94-106 registers, no spills on sm_90; untimed.
    tma_path = [tma_path_config(8, 16, 128, 64, 8, 3), tma_path_config(8, 16, 128, 64, 8, 4),
                tma_path_config(4, 32, 128, 64, 8, 3), tma_path_config(8, 8, 128, 64, 4, 3)]
    return nested + with_weight_tma(k64) + others + (tma_path if TensorDescriptor is not None else [])


_conv3d_tuned = triton.autotune(configs=_configs(),
                                key=["Cin", "Cout", "KT", "KH", "KW", "W_TMA_OK", "A_TMA_OK", "EPI_TMA"],
                                prune_configs_by={"early_config_prune": _prune_forward})(_conv3d_fwd)


def conv3d_triton(x, weight, bias, *, mode, chunk=0, context=None, residual=None) -> torch.Tensor:
    """Forward of `reference.conv3d_reference` by the Triton kernel (CUDA, or CPU when interpreted).

    NCDHW inputs are copied once to channels-last; pass channels_last_3d tensors to avoid it.
    The output has the input's layout.
    """
    plan = check_conv3d_args(x, weight, bias, mode=mode, chunk=chunk, context=context, residual=residual)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton conv3d supports {DTYPES}, got {x.dtype}; use the torch backend")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton conv3d runs on CUDA, or on CPU in the Triton interpreter; x is on {x.device} and "
            "dcvg_kernels.conv3d was imported without TRITON_INTERPRET=1 (set it before the first Triton call)")
    b, cin, t, h, w = x.shape
    cout, _, kt, kh, kw = weight.shape
    out = torch.empty((b, cout, t, h, w), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out

    xl = x.contiguous(memory_format=torch.channels_last_3d)
    # [kt, kh, kw, Cin, Cout]: the GEMM's B operand, K index = tap * Cin + c, Cout contiguous
    wk = weight.permute(2, 3, 4, 1, 0).contiguous()
    ctx = context.contiguous(memory_format=torch.channels_last_3d) if plan.use_context else xl
    res = residual if residual is not None else out
    for name, tensor in (("x", xl), ("context", ctx)):
        if tensor.shape[1] > 1 and tensor.stride(1) != 1:
            raise ValueError(f"{name} must be channels-last dense after conversion, strides {tensor.stride()}")

    sx, sc = xl.stride(), ctx.stride()
    precision = None  # 16-bit inputs: the dtype decides
    if x.dtype == torch.float32:  # fp32 follows torch's conv policy: tf32 unless disabled
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    def grid(meta):
        if meta.get("A_TMA"):  # one program per frame tile of BH x BW pixels
            tiles = b * t * triton.cdiv(h, meta["BH"]) * triton.cdiv(w, meta["BW"])
        else:
            tiles = triton.cdiv(out.numel() // cout, meta["BLOCK_M"])
        return (tiles * triton.cdiv(cout, meta["BLOCK_N"]),)

    kernel = _conv3d_fwd[grid] if INTERPRET else _conv3d_tuned[grid]
    cfg = INTERPRET_CONFIG
    w_desc = weight_descriptor(wk.view(-1, cout), [cfg["BLOCK_K"], cfg["BLOCK_N"]])
    a_descs = activation_descriptors(xl, ctx, plan.use_context, [1, 1, cfg["BH"], cfg["BW"], cfg["BLOCK_K"]])
    if w_desc is None:
        a_descs = None  # the TMA path reads both operands by descriptor
    if INTERPRET and ((cfg["W_TMA"] and w_desc is None) or (cfg["A_TMA"] and a_descs is None)):
        raise ValueError("INTERPRET_CONFIG asks for a TMA config, but these tensors cannot have descriptors")
    # the TMA path's epilogue by descriptors where the output (and residual) are channels-last
    epi = ndhwc_descriptors([out, res] if residual is not None else [out], [1, 1, cfg["BH"], cfg["BW"], cfg["BLOCK_N"]])
    epi_descs = (epi[1] if residual is not None else None, epi[0]) if epi is not None and a_descs is not None else None
    kernel(
        xl, ctx, wk, bias if bias is not None else wk, res, out, w_desc, *(a_descs or (None, None)),
        *(epi_descs or (None, None)),
        b * t * h * w, t, h, w, cin, cout, ctx.shape[2] if plan.use_context else 0, max(plan.chunk, 1),
        sx[0], sx[2], sx[3], sx[4],
        sc[0], sc[2], sc[3], sc[4],
        *res.stride(),
        *out.stride(),
        KT=kt, KH=kh, KW=kw, SHIFT=plan.shift,
        CHUNKED=plan.chunk > 0, HAS_CTX=plan.use_context, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, UPCAST=INTERPRET, PRECISION=precision, BIG_M=b * t * h * w >= 2**31,
        W_TMA_OK=w_desc is not None, A_TMA_OK=a_descs is not None, EPI_TMA=epi_descs is not None,
        **(INTERPRET_CONFIG if INTERPRET else {}),
    )
    return out
