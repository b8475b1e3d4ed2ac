"""dcvg-kernels side by side with torch: fused attention vs SDPA, chunk-causal conv3d vs pad + cuDNN.

    python tools/bench/kernels.py                 # CUDA if present, else the CPU smoke table
    python tools/bench/kernels.py --device cuda --lengths 8192,16384 --resolutions 720p
    python tools/bench/kernels.py --device cpu    # torch fallback vs pure-torch reference, small shapes

CUDA (kernels.md §4): every row is timed in this run with `triton.testing.do_bench` (median and
p20/p80, L2 flushed between calls) after one untimed call and an accuracy check.
* Attention, [B, L, H, 128] bf16, B = 1: Triton vs SDPA pinned to the cuDNN and to the flash
  backend (`sdpa_kernel(..., set_priority=True)`), fed `transpose(1, 2)` views of the same
  tensors. Forward and forward+backward; TFLOP/s = 4·B·H·L²·D / t (x3.5 for fwd+bwd).
* Conv, DC-AE-V decoder ResBlock convs (3x3x3, C -> C) of the f32t4c32 preset at 720p and 2160p
  (frame sizes padded to a multiple of 32, as dcae-v does), channels_last_3d bf16: Triton vs the
  reference path (dcae-v's `conv3d_torch`: zero/context frames concatenated, then F.conv3d) and
  vs F.conv3d alone on an already padded input (the cuDNN GEMM floor).
  TFLOP/s = 2·(B·T·H·W)·Cout·(27·Cin) / t, all 27 taps counted.

CPU: the Triton interpreter is far too slow to time (kernels.md §1), so the CPU table times the
torch paths this package falls back to (SDPA; the conv reference) against the pure-torch
references, on small shapes, with time.perf_counter. It says nothing about GPU speed; the GPU
table is reported as pending.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

# Keep this folder off sys.path: its dcae_v.py would shadow the dcae_v package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
import torch.nn.functional as F

from dcae_v.config import PRESETS
from dcae_v.temporal import TemporalRule, conv3d_torch
from dcvg_kernels import (
    attention,
    attention_reference,
    attention_with_lse,
    chunk_causal_conv3d,
)
from dcvg_kernels.reference import conv3d_reference

RESOLUTIONS = {"720p": (720, 1280), "2160p": (2160, 3840)}


# ---- shapes ------------------------------------------------------------------------------------
def decoder_conv_shapes(preset: str, height: int, width: int, frames: int) -> list[dict]:
    """One ResBlock conv per active decoder stage: (stage, C, T, h, w, chunk) at this frame size."""
    cfg = PRESETS[preset]
    f = cfg.spatial_compression
    h_pad, w_pad = -(-height // f) * f, -(-width // f) * f
    shapes, down = [], 2  # project_in halves the frame
    for stage in cfg.active_stages:
        latent = stage > cfg.temporal_stage
        t = max(1, frames // cfg.temporal_compression) if latent else frames
        chunk = cfg.latent_chunk_size if latent else cfg.chunk_size
        shapes.append({"stage": stage, "c": cfg.widths[stage], "t": t, "h": h_pad // down, "w": w_pad // down,
                       "chunk": chunk})
        if stage < cfg.temporal_stage:
            down *= 2
    return shapes


# ---- timing ------------------------------------------------------------------------------------
def cpu_time(fn, repeat: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds over `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def gpu_time(fn, grad_to_none=None) -> tuple[float, float, float]:
    from triton.testing import do_bench

    fn()  # JIT, autotune, cuDNN plan selection: not timed
    torch.cuda.synchronize()
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return med, p20, p80


def fmt_ms(t) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


# ---- GPU ---------------------------------------------------------------------------------------
def sdpa_on(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend], set_priority=True):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return run


def _fwd_bwd(fn, q, k, v, grad):
    fn(q, k, v).backward(grad)


def gpu_attention(lengths, heads, dtype, device="cuda", timer=gpu_time) -> list[dict]:
    from torch.nn.attention import SDPBackend

    impls = {"triton": lambda q, k, v: attention(q, k, v, backend="triton"),
             "sdpa-cudnn": sdpa_on(SDPBackend.CUDNN_ATTENTION), "sdpa-flash": sdpa_on(SDPBackend.FLASH_ATTENTION)}
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, length, heads, 128, device=device, dtype=dtype).requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        fwd_flops = 4.0 * heads * length * length * 128
        with torch.no_grad():
            want = impls["sdpa-flash"](q, k, v)
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    err = (fn(q, k, v).float() - want.float()).abs().max().item()
                fwd = timer(functools.partial(fn, q, k, v))
                both = timer(functools.partial(_fwd_bwd, fn, q, k, v, grad), grad_to_none=[q, k, v])
            except bench_errors() as e:  # a backend unavailable for this shape / build, a compile failure
                rows.append({"kernel": "attention", "L": length, "impl": name, "error": _first_line(e)})
                continue
            rows.append({"kernel": "attention", "L": length, "H": heads, "D": 128, "impl": name, "max_err": err,
                         "fwd_ms": fwd, "fwd_tflops": fwd_flops / fwd[0] / 1e9,
                         "fwdbwd_ms": both, "fwdbwd_tflops": 3.5 * fwd_flops / both[0] / 1e9,
                         "config": tuned_attention_configs() if name == "triton" else ""})
        del q, k, v, grad
        if device == "cuda":
            torch.cuda.empty_cache()
    return _ratios(rows, ("fwd_ms", "fwdbwd_ms"), key="L")


def gpu_conv(resolutions, frames, dtype, device="cuda", timer=gpu_time) -> list[dict]:
    torch.backends.cudnn.benchmark = True
    rows = []
    for res in resolutions:
        for s in decoder_conv_shapes("f32t4c32", *RESOLUTIONS[res], frames):
            c, t, h, w, chunk = s["c"], s["t"], s["h"], s["w"], s["chunk"]
            shape = f"{res} stage {s['stage']}: C {c}, {t}x{h}x{w}"
            try:
                x = torch.randn(1, c, t, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
                weight = (torch.randn(c, c, 3, 3, 3, device=device, dtype=dtype) / (27 * c) ** 0.5).contiguous(
                    memory_format=torch.channels_last_3d)
                bias = torch.randn(c, device=device, dtype=dtype)
                padded = F.pad(x, (1, 1, 1, 1, 1, 1)).contiguous(memory_format=torch.channels_last_3d)
                rule = TemporalRule("chunk_causal", chunk)
                impls = {
                    "triton": functools.partial(chunk_causal_conv3d, x, weight, bias, mode="chunk_causal",
                                                chunk=chunk, backend="triton"),
                    "pad+cudnn (conv3d_torch)": functools.partial(conv3d_torch, x, weight, bias, rule),
                    "cudnn conv only": functools.partial(F.conv3d, padded, weight, bias),
                }
                with torch.no_grad():
                    want = impls["pad+cudnn (conv3d_torch)"]()
                    scale = want.abs().max().float().item()
                flops = 2.0 * t * h * w * c * 27 * c
                for name, fn in impls.items():
                    try:
                        with torch.no_grad():  # in the input dtype: fp32 copies of 2160p activations would not fit
                            err = (fn() - want).abs_().max().float().item() / scale
                            ms = timer(fn)
                    except bench_errors() as e:  # compile failure, unsupported shape: report and go on
                        rows.append({"kernel": "conv3d", "shape": shape, "impl": name, "error": _first_line(e)})
                        continue
                    rows.append({"kernel": "conv3d", "shape": shape, "impl": name, "rel_err": err, "fwd_ms": ms,
                                 "fwd_tflops": flops / ms[0] / 1e9})
                    if name == "triton":  # which autotune config (and reduction loop) won for this shape
                        rows[-1]["config"] = tuned_conv_config()
                del x, padded, want
            except torch.OutOfMemoryError as e:
                rows.append({"kernel": "conv3d", "shape": shape, "impl": "all", "error": _first_line(e)})
            if device == "cuda":
                torch.cuda.empty_cache()
    return _ratios(rows, ("fwd_ms",), key="shape")


def bench_errors() -> tuple[type[Exception], ...]:
    """Failures that cost one table row, not the run: unavailable backends, Triton compile errors."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return RuntimeError, ValueError, CompilationError, OutOfResources


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _ratios(rows, fields, key):
    """ratio = t_baseline / t_triton for every baseline row (> 1: Triton is faster)."""
    triton_rows = {r[key]: r for r in rows if r["impl"] == "triton" and "error" not in r}
    for r in rows:
        base = triton_rows.get(r[key])
        if base is not None and r["impl"] != "triton" and "error" not in r:
            for f in fields:
                r[f.replace("_ms", "_ratio")] = r[f][0] / base[f][0]
    return rows


# ---- CUDA correctness (run before trusting any timing) ------------------------------------------
# ragged shapes: L and H·W not multiples of any tile, Lkv = 512 as in Wan's cross-attention
CHECK_ATTENTION = [((2, 1000, 1000, 3, 128), torch.bfloat16), ((1, 777, 512, 2, 64), torch.float16),
                   ((1, 4096, 4096, 2, 128), torch.bfloat16), ((1, 300, 70, 2, 64), torch.float32)]
# (Cin, Cout, T, (H, W), kernel, mode, chunk, context frames)
CHECK_CONV = [((64, 96, 5, (17, 23), (3, 3, 3), "chunk_causal", 2, 1), torch.bfloat16),
              ((256, 256, 8, (40, 72), (3, 3, 3), "chunk_causal", 40, 1), torch.bfloat16),
              ((3, 32, 4, (16, 16), (3, 3, 3), "causal", 0, 2), torch.float32),
              ((40, 24, 3, (9, 11), (1, 1, 1), "non_causal", 0, 0), torch.bfloat16)]


def _rel(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def _attention_check_runs():
    """(label, run) pairs, run(q, k, v, grad) -> [out, lse, dq, dk, dv]: the autotuned custom op,
    then one pointer and one TMA config alone, so both load paths are checked whichever one the
    autotuners pick."""
    from dcvg_kernels import flash_attention as fa

    def op(q, k, v, grad):
        out, lse = attention_with_lse(q, k, v, backend="triton")
        return [out, lse, *torch.autograd.grad(out, (q, k, v), grad)]

    def alone(config):
        def run(q, k, v, grad):
            out, lse = fa.attention_forward(q.detach(), k.detach(), v.detach(), config=config)
            return [out, lse, *fa.attention_backward(grad, q.detach(), k.detach(), v.detach(), out, lse, config=config)]
        return run

    return [("autotuned", op), ("64x64 w4 s2 pointers", alone(fa.attention_config(64, 64, 4, 2))),
            ("64x64 w4 s2 tma", alone(fa.attention_config(64, 64, 4, 2, tma=True)))]


def _conv_check_configs(cin, cout, dtype, device="cuda"):
    """(label, {autotuner: configs}) runs for the conv check: the autotuned op, then, where the
    tensors can have descriptors (rows of Cin and Cout channels), the forward and dgrad W_TMA
    configs alone and the forward TMA path alone, so each is checked whichever configs win."""
    from dcvg_kernels import conv3d
    from dcvg_kernels import conv3d_backward as bw

    runs = [("autotuned", {})]
    fwd, dgrad = ([c for c in tuned.configs if c.kwargs.get("W_TMA") and not c.kwargs.get("A_TMA")][:1]
                  for tuned in (conv3d._conv3d_tuned, bw._dgrad_tuned))
    tma_path = [c for c in conv3d._conv3d_tuned.configs if c.kwargs.get("A_TMA")][:1]
    rows_ok = all(conv3d.weight_descriptor(torch.empty(16, n, device=device, dtype=dtype)) is not None
                  for n in (cin, cout))
    if fwd and dgrad and rows_ok:
        runs.append(("w-tma", {conv3d._conv3d_tuned: fwd, bw._dgrad_tuned: dgrad}))
    if tma_path and rows_ok:
        runs.append(("tma-path", {conv3d._conv3d_tuned: tma_path}))
    return runs


@contextlib.contextmanager
def only_configs(replacements):
    """Let each given autotuner choose among these configs only (its cache emptied), then restore."""
    saved = {tuned: (tuned.configs, tuned.cache) for tuned in replacements}
    try:
        for tuned, configs in replacements.items():
            tuned.configs, tuned.cache = configs, {}
        yield
    finally:
        for tuned, (configs, cache) in saved.items():
            tuned.configs, tuned.cache = configs, cache


def check_cuda(device: str = "cuda", what: str = "all") -> bool:
    """Triton vs the fp32 torch references on ragged shapes, forward and all gradients."""
    ok = True
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}  # fp32: tf32 dots
    print("| check | dtype | max rel err per tensor | ok |\n|---|---|---|---|")
    for (b, lq, lk, h, d), dtype in CHECK_ATTENTION if what in ("all", "attention") else []:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype).requires_grad_() for n in (lq, lk, lk))
        grad = torch.randn(b, lq, h, d, device=device, dtype=dtype)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        out32, lse32 = attention_reference(q32, k32, v32)
        want = [out32, lse32, *torch.autograd.grad(out32, (q32, k32, v32), grad.float())]
        for label, run in _attention_check_runs():
            try:
                got = run(q, k, v, grad)
            except ValueError as e:  # a TMA config this input cannot take
                print(f"| attention B{b} Lq{lq} Lk{lk} H{h} D{d} {label} | {dtype} | n/a: {_first_line(e)} | - |")
                continue
            errs = [_rel(g, w) for g, w in zip(got, want)]
            good = max(errs) < tol[dtype]
            ok &= good
            print(f"| attention B{b} Lq{lq} Lk{lk} H{h} D{d} {label} (out, lse, dq, dk, dv) | {dtype} | "
                  f"{', '.join(f'{e:.1e}' for e in errs)} | {good} |")
    for (cin, cout, t, hw, kk, mode, chunk, ctx), dtype in CHECK_CONV if what in ("all", "conv") else []:
        torch.manual_seed(0)
        x = torch.randn(1, cin, t, *hw, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
        w = (torch.randn(cout, cin, *kk, device=device) / (cin * kk[0] * kk[1] * kk[2]) ** 0.5).to(dtype).requires_grad_()
        bias = torch.randn(cout, device=device, dtype=dtype).requires_grad_()
        c = torch.randn(1, cin, ctx, *hw, device=device, dtype=dtype).requires_grad_() if ctx else None
        leaves = [x, w, bias] + ([c] if ctx else [])
        grad = torch.randn(1, cout, t, *hw, device=device, dtype=dtype)
        leaves32 = [t.detach().float().requires_grad_() for t in leaves]
        y32 = conv3d_reference(*leaves32[:3], mode=mode, chunk=chunk, context=leaves32[3] if ctx else None)
        want = [y32, *torch.autograd.grad(y32, leaves32, grad.float(), allow_unused=True)]
        for label, configs in _conv_check_configs(cin, cout, dtype, device):
            with only_configs(configs):
                y = chunk_causal_conv3d(x, w, bias, mode=mode, chunk=chunk, context=c, backend="triton")
                got = [y, *torch.autograd.grad(y, leaves, grad, allow_unused=True)]
            errs = [0.0 if w_ is None and (g is None or g.abs().max() == 0) else _rel(g, w_)
                    for g, w_ in zip(got, want)]
            good = max(errs) < tol[dtype]
            ok &= good
            print(f"| conv3d {cin}->{cout} T{t} {hw[0]}x{hw[1]} k{kk} {mode} chunk {chunk} ctx {ctx} {label} "
                  f"(y, dx, dw, db{', dctx' if ctx else ''}) | {dtype} | {', '.join(f'{e:.1e}' for e in errs)} | "
                  f"{good} |")
    print(f"\nall checks passed: {ok}")
    return ok


# ---- CPU ---------------------------------------------------------------------------------------
def cpu_rows(repeat) -> list[dict]:
    rows = []
    for length, d in ((256, 64), (1024, 128)):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, length, 4, d) for _ in range(3))
        fallback = cpu_time(functools.partial(attention, q, k, v, backend="torch"), repeat)
        reference = cpu_time(functools.partial(attention_reference, q, k, v), repeat)
        err = (attention(q, k, v, backend="torch") - attention_reference(q, k, v)[0]).abs().max().item()
        rows.append({"what": f"attention fp32 [1, {length}, 4, {d}]", "fallback": "SDPA (backend='torch')",
                     "fallback_ms": fallback, "baseline": "attention_reference (einsum)", "baseline_ms": reference,
                     "ratio": reference[0] / fallback[0], "max_err": err})
    for s in decoder_conv_shapes("f32t4c32", 128, 128, 8)[:3]:
        c, t, h, w, chunk = s["c"] // 8, s["t"], s["h"], s["w"], s["chunk"]
        torch.manual_seed(0)
        x = torch.randn(1, c, t, h, w)
        weight = torch.randn(c, c, 3, 3, 3) / (27 * c) ** 0.5
        bias = torch.randn(c)
        rule = TemporalRule("chunk_causal", chunk)
        fallback = cpu_time(functools.partial(chunk_causal_conv3d, x, weight, bias, mode="chunk_causal", chunk=chunk,
                                              backend="torch"), repeat)
        baseline = cpu_time(functools.partial(conv3d_torch, x, weight, bias, rule), repeat)
        err = (chunk_causal_conv3d(x, weight, bias, mode="chunk_causal", chunk=chunk, backend="torch")
               - conv3d_torch(x, weight, bias, rule)).abs().max().item()
        rows.append({"what": f"conv3d fp32 C {c}, {t}x{h}x{w} (stage {s['stage']} at 128x128, C/8)",
                     "fallback": "op, backend='torch' (padded-window fallback)", "fallback_ms": fallback,
                     "baseline": "dcae-v conv3d_torch (pad + conv)", "baseline_ms": baseline,
                     "ratio": baseline[0] / fallback[0], "max_err": err})
    return rows


def print_cpu(rows):
    print("| shape | package path (ms, median [p20, p80]) | torch baseline (ms) | ratio base/pkg | max err |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['fallback']}: {fmt_ms(r['fallback_ms'])} | {r['baseline']}: "
              f"{fmt_ms(r['baseline_ms'])} | {r['ratio']:.2f} | {r['max_err']:.1e} |")


ATTENTION_HEADER = ("| L | impl | fwd ms | fwd TFLOP/s | fwd ratio | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd ratio "
                    "| max err |\n|---|---|---|---|---|---|---|---|---|")
CONV_HEADER = "| shape | impl | ms | TFLOP/s | ratio | rel err |\n|---|---|---|---|---|---|"


def tuned_conv_config() -> str:
    """The forward conv autotuner's last pick, e.g. `[128x128x64 w8 s3 flat w-tma]`."""
    from dcvg_kernels import conv3d

    best = getattr(conv3d._conv3d_tuned, "best_config", None)
    if best is None:
        return ""
    kw = best.kwargs
    if kw.get("A_TMA"):
        return f"[{kw['BH']}x{kw['BW']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{best.num_warps} s{best.num_stages} tma-path]"
    loop = "flat" if kw.get("FLAT_K") else "per-tap"
    weights = " w-tma" if kw.get("W_TMA") else ""
    return f"[{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{best.num_warps} s{best.num_stages} {loop}{weights}]"


def tuned_attention_configs() -> str:
    """The attention autotuners' last picks, e.g. `[fwd 128x64 w8 s3 tma, dkdv ..., dq ...]`."""
    from dcvg_kernels import flash_attention as fa

    picks = []
    for label, tuned in (("fwd", fa._fwd_tuned), ("dkdv", fa._dkdv_tuned), ("dq", fa._dq_tuned)):
        best = getattr(tuned, "best_config", None)
        if best is not None:
            kw = best.kwargs
            loads = "tma" if kw.get("USE_TMA") else "pointers"
            picks.append(f"{label} {kw['BLOCK_M']}x{kw['BLOCK_N']} w{best.num_warps} s{best.num_stages} {loads}")
    return f"[{', '.join(picks)}]" if picks else ""


def print_gpu(rows):
    """Table rows (ratio = baseline time / Triton time; > 1 means Triton is faster)."""
    for r in rows:
        if r["kernel"] == "attention":
            if "error" in r:
                print(f"| {r['L']} | {r['impl']} | error: {r['error']} |||||||")
                continue
            impl = f"{r['impl']} {r['config']}" if r.get("config") else r["impl"]
            print(f"| {r['L']} | {impl} | {fmt_ms(r['fwd_ms'])} | {r['fwd_tflops']:.0f} | "
                  f"{r.get('fwd_ratio', 1.0):.2f} | {fmt_ms(r['fwdbwd_ms'])} | {r['fwdbwd_tflops']:.0f} | "
                  f"{r.get('fwdbwd_ratio', 1.0):.2f} | {r['max_err']:.1e} |")
        elif "error" in r:
            print(f"| {r['shape']} | {r['impl']} | error: {r['error']} ||||")
        else:
            impl = f"{r['impl']} {r['config']}" if r.get("config") else r["impl"]
            print(f"| {r['shape']} | {impl} | {fmt_ms(r['fwd_ms'])} | {r['fwd_tflops']:.0f} | "
                  f"{r.get('fwd_ratio', 1.0):.2f} | {r['rel_err']:.1e} |")


def setup_line(device) -> str:
    line = f"{datetime.date.today()}, torch {torch.__version__}"
    try:
        import triton

        line += f", triton {triton.__version__}"
    except ImportError:
        line += ", triton not installed"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        line += (f", {props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}, "
                 f"cuDNN {torch.backends.cudnn.version()}")
    else:
        line += f", CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--lengths", default="8192,16384,32768,65536", help="attention sequence lengths (CUDA)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (16 x 128 = hidden 2048, FA3 setup)")
    ap.add_argument("--resolutions", default="720p,2160p", help=f"conv frame sizes, from {list(RESOLUTIONS)}")
    ap.add_argument("--frames", type=int, default=8, help="frames per conv call at the pixel frame rate")
    ap.add_argument("--what", choices=("all", "attention", "conv"), default="all")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per CPU row")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--check", action="store_true", help="CUDA: only check Triton against the references")
    args = ap.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    print(f"# dcvg-kernels benchmark ({setup_line(device)})\n")
    if args.check:
        if device != "cuda":
            ap.error("--check runs the Triton kernels compiled, on CUDA")
        return 0 if check_cuda(what=args.what) else 1
    if device == "cuda":
        rows = []  # printed as measured, so a run cut short still leaves its rows
        if args.what in ("all", "attention"):
            print(ATTENTION_HEADER)
            for length in args.lengths.split(","):
                rows += gpu_attention([int(length)], args.heads, torch.bfloat16)
                print_gpu([r for r in rows if r.get("L") == int(length)])
        if args.what in ("all", "conv"):
            print("\n" + CONV_HEADER)
            for res in args.resolutions.split(","):
                new = gpu_conv([res], args.frames, torch.bfloat16)
                print_gpu(new)
                rows += new
    else:
        print("CPU: torch fallback paths vs pure-torch references (Triton is not timed on CPU: the "
              "interpreter is far too slow to mean anything).\n")
        rows = cpu_rows(args.repeat)
        print_cpu(rows)
        print("\nGPU table: pending (no CUDA device in this run).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup_line(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
