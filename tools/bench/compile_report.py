"""Compile the dcvg-kernels Triton kernels for an H100/H200 (sm_90) on a machine without a GPU and
report what the compiler made of each autotune config: registers per thread, spilled stack
bytes, shared memory, wgmma instructions (Hopper tensor cores) and cp.async copies (pipelined
loads), and the compile time.

Why: GPU time is scarce here, and these facts explain most of a kernel's speed before it runs.
A config that spills or has no cp.async (loads not pipelined) will be slow whatever the GPU; a
27-way unrolled loop that takes 20 s to compile makes every first call slow. The arguments are
specialised as the JIT does at run time (pointers 16-byte aligned, integers divisible by 16
marked so) for the shapes in SHAPES, so the code is what a real launch compiles.

    python tools/bench/compile_report.py                # every kernel, every config (a few minutes on CPU)
    python tools/bench/compile_report.py --what conv    # or: attention
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, do not interpret
_CACHE = tempfile.mkdtemp(prefix="compile_report_")
os.environ["TRITON_CACHE_DIR"] = _CACHE  # a cold cache: real compile times, and nothing left in the user's
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
DIV16 = [["tt.divisibility", 16]]
# The run-time values of the integer arguments (DC-AE-V decoder stage 1 at 720p; Wan 14B attention
# at L = 32k, 40 heads x 128): the JIT marks those divisible by 16, which enables vector loads.
SHAPES = {
    "conv": {"M": 8 * 368 * 640, "T": 8, "H": 368, "W": 640, "Cin": 256, "Cout": 256, "CTX_N": 0, "CHUNK": 40,
             "sxb": 8 * 368 * 640 * 256, "sxt": 368 * 640 * 256, "sxh": 640 * 256, "sxw": 256},
    "attention": {"H": 40, "Lq": 32760, "Lk": 32760, "sqb": 32760 * 5120, "sql": 5120, "sqh": 128},
}


def _int_value(kernel: str, name: str) -> int:
    """The run-time value of an integer argument: from SHAPES, strides by their axis letter (every
    tensor of a launch has the layout of x, or of q)."""
    shape = SHAPES[kernel]
    if name in shape:
        return shape[name]
    if kernel == "conv" and re.fullmatch(r"s[xcrog][btwhc]", name):
        return 1 if name[-1] == "c" else shape["sx" + name[-1]]
    if kernel == "attention" and re.fullmatch(r"s[qkvdo][blh]", name):
        return shape["sq" + name[-1]]
    return 1


def compile_one(fn, kernel: str, types: dict[str, str], const: dict, num_warps: int, num_stages: int) -> dict:
    names = fn.arg_names
    # constexpr parameters left out take their defaults, as a launch does
    const = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **const}
    signature, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            signature[n] = "constexpr"
        elif types.get(n, "").startswith("*"):
            signature[n] = types[n]
            attrs[(i,)] = DIV16
        else:
            signature[n] = types.get(n, "i32")
            if signature[n] == "i32" and _int_value(kernel, n) % 16 == 0:
                attrs[(i,)] = DIV16
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"regs": int(reg.group(1)) if reg else None, "stack": int(stack.group(1)) if stack else None,
            "shared": compiled.metadata.shared, "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "cp_async": len(re.findall(r"cp\.async", ptx)), "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "seconds": seconds}


def conv_rows():
    from dcvg_kernels import conv3d
    from dcvg_kernels import conv3d_backward as bw

    fixed = {"KT": 3, "KH": 3, "KW": 3, "SHIFT": 1, "CHUNKED": True, "HAS_CTX": False, "UPCAST": False,
             "PRECISION": None, "BIG_M": False}
    kernels = [("fwd", conv3d._conv3d_fwd, conv3d._configs(), {"HAS_BIAS": True, "HAS_RES": False}),
               ("dgrad", bw._conv3d_dgrad, bw._dgrad_configs(), {})]
    for label, fn, configs, extra in kernels:
        for cfg in configs:
            types = {n: "*bf16" for n in fn.arg_names if n.endswith("_ptr")}
            const = {**fixed, **extra, "FLAT_K": False, "W_TMA": False, **cfg.kwargs}
            if const["W_TMA"]:  # descriptors are typed by their boxes
                types["w_desc"] = f"tensordesc<bf16[{const['BLOCK_K']},{const['BLOCK_N']}]>"
            else:
                const["w_desc"] = None
            if const.get("A_TMA"):  # channels-last output: the descriptor epilogue, as from dcae-v
                box_k, box_n = ([1, 1, const["BH"], const["BW"], const[c]] for c in ("BLOCK_K", "BLOCK_N"))
                types.update(x_desc=f"tensordesc<bf16{box_k}>".replace(" ", ""),
                             out_desc=f"tensordesc<bf16{box_n}>".replace(" ", ""))
                const.update(ctx_desc=None, res_desc=None, A_TMA_OK=True, W_TMA_OK=True, EPI_TMA=True)
                name = (f"conv3d {label} bf16 {const['BH']}x{const['BW']}x{const['BLOCK_N']}x{const['BLOCK_K']} "
                        f"w{cfg.num_warps} s{cfg.num_stages} tma-path")
                yield name, fn, "conv", types, const, cfg
                # and with a streaming context and a residual (the decoder's ResBlocks while streaming)
                const = {k: v for k, v in const.items() if k not in ("ctx_desc", "res_desc")}
                const.update(HAS_CTX=True, HAS_RES=True)
                types = {**types, "ctx_desc": types["x_desc"], "res_desc": types["out_desc"]}
                yield name + " +ctx+res", fn, "conv", types, const, cfg
                continue
            const.update({n: None for n in ("x_desc", "ctx_desc") if n in fn.arg_names})
            name = (f"conv3d {label} bf16 {const['BLOCK_M']}x{const['BLOCK_N']}x{const['BLOCK_K']} "
                    f"w{cfg.num_warps} s{cfg.num_stages} {'flat' if const['FLAT_K'] else 'per-tap'}"
                    f"{' w-tma' if const['W_TMA'] else ''}")
            yield name, fn, "conv", types, const, cfg


def attention_rows():
    from dcvg_kernels import flash_attention as fa

    fixed = {"HEAD_D": 128, "BLOCK_D": 128, "UPCAST": False, "PRECISION": None}
    kernels = [("fwd", fa._attn_fwd, fa._configs("fwd")), ("bwd dkdv", fa._attn_bwd_dkdv, fa._configs("dkdv")),
               ("bwd dq", fa._attn_bwd_dq, fa._configs("dq"))]
    for label, fn, configs in kernels:
        for cfg in configs:
            types = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
            types.update({n: "*fp32" for n in ("LSE", "DELTA")})
            types.update({"qk_scale": "fp32", "sm_scale": "fp32"})
            const = {**fixed, **cfg.kwargs}
            tma = bool(cfg.kwargs["USE_TMA"])
            const["TMA_OK"] = tma
            if label == "fwd":
                const["FOLD_SCALE"] = True
            for name in (n for n in fn.arg_names if n.startswith("desc_")):  # typed by their boxes, or None
                if tma:
                    block = cfg.kwargs["BLOCK_M" if name in fa._Q_SIDE else "BLOCK_N"]
                    types[name] = f"tensordesc<bf16[1,{block},128]>"
                else:
                    const[name] = None
            loads = " tma" if tma else " pointers"
            name = (f"attention {label} bf16 d128 {const['BLOCK_M']}x{const['BLOCK_N']} w{cfg.num_warps} "
                    f"s{cfg.num_stages}{loads}")
            yield name, fn, "attention", types, const, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=("all", "conv", "attention"), default="all")
    ap.add_argument("--only", default=None, help="a regular expression: only the configs whose row name matches")
    args = ap.parse_args(argv)
    print(f"# sm_90 compile report (triton {triton.__version__}, no GPU needed)\n")
    print("| kernel / config | regs | spill stack B | shared KB | wgmma | cp.async | TMA copies | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    if args.what in ("all", "conv"):
        rows += list(conv_rows())
    if args.what in ("all", "attention"):
        rows += list(attention_rows())
    for name, fn, kernel, types, const, cfg in rows:
        if args.only and not re.search(args.only, name):
            continue
        try:
            r = compile_one(fn, kernel, types, const, cfg.num_warps, cfg.num_stages)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding, not a crash
            print(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} |||||||", flush=True)
            continue
        print(f"| {name} | {r['regs']} | {r['stack']} | {r['shared'] / 1024:.0f} | {r['wgmma']} | {r['cp_async']} | {r['tma']} | "
              f"{r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
