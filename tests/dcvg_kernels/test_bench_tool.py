"""tools/bench/kernels.py: the layer shapes it times and its CPU/GPU switch (the timing itself
needs a GPU, or minutes of CPU; see the package README for its output)."""

import pathlib
import runpy

import pytest

BENCH = pathlib.Path(__file__).parents[2] / "tools" / "bench" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


def test_decoder_conv_shapes_follow_the_f32t4c32_preset(bench):
    """720p pads to 736 x 1280 (multiple of 32); stage s of the decoder runs at 1/2^s of it (stage 6,
    after the 4x temporal upsampling, at stage 5's size), widths from the preset, T/4 at stage 6."""
    got = [(s["stage"], s["c"], s["t"], s["h"], s["w"], s["chunk"])
           for s in bench["decoder_conv_shapes"]("f32t4c32", 720, 1280, 8)]
    assert got == [(1, 256, 8, 368, 640, 40), (2, 512, 8, 184, 320, 40), (3, 512, 8, 92, 160, 40),
                   (4, 1024, 8, 46, 80, 40), (5, 1024, 8, 23, 40, 40), (6, 1024, 2, 23, 40, 10)]
    assert bench["decoder_conv_shapes"]("f32t4c32", 2160, 3840, 8)[0]["h"] == 2176 // 2


def test_ratio_is_baseline_over_triton(bench):
    rows = [{"L": 1, "impl": "triton", "fwd_ms": (2.0, 0, 0)}, {"L": 1, "impl": "sdpa", "fwd_ms": (3.0, 0, 0)},
            {"L": 1, "impl": "broken", "error": "x"}]
    out = bench["_ratios"](rows, ("fwd_ms",), key="L")
    assert out[1]["fwd_ratio"] == 1.5 and "fwd_ratio" not in out[2]


def test_check_needs_cuda(bench):
    with pytest.raises(SystemExit):
        bench["main"](["--device", "cpu", "--check"])


def test_kernels_compile_for_hopper_without_spills():
    """tools/bench/compile_report.py compiles for sm_90 on this GPU-less machine (triton ships ptxas):
    a flat conv forward and dgrad config (weights by pointers and by TMA), the conv's TMA path (with
    and without context + residual) and an attention forward and dK-dV config (tiles by pointers and
    by TMA) lower to wgmma with pipelined cp.async (or TMA bulk) loads and spill nothing. A kernel change that breaks Hopper compilation, or makes these
    configs spill, fails here instead of on the next lent GPU."""
    import re
    import subprocess
    import sys

    only = (r"fwd bf16 128x128x64 w8 s3 flat|dgrad bf16 128x128x64 w8 s3 flat|fwd bf16 8x16x128x64 w8 s3 tma-path"
            r"|attention fwd .* 128x64 w8 s3|dkdv .* 64x64 w8 s3")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH.with_name("compile_report.py")), "--only", only], check=False,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if re.match(r"\| (conv3d|attention) ", line)]
    assert len(rows) == 10, proc.stdout
    for name, regs, stack, shared, wgmma, cp_async, tma, _ in (map(str.strip, r) for r in rows):
        assert not regs.startswith("error"), f"{name}: {regs}"
        assert int(stack) == 0 and int(wgmma) > 0 and int(cp_async) > 0, (name, regs, stack, wgmma, cp_async)
        assert (int(tma) > 0) == ("tma" in name), (name, tma)


def test_bench_names_the_attention_configs_it_timed(bench):
    """The GPU table says which config (and pointer or TMA loads) each autotuner picked; here the
    interpreter's single config, after one forward and backward through the custom op."""
    import torch

    from dcvg_kernels import attention

    q, k, v = (torch.randn(1, 20, 1, 16, requires_grad=True) for _ in range(3))
    attention(q, k, v, backend="triton").sum().backward()
    assert bench["tuned_attention_configs"]() == ("[fwd 32x32 w4 s2 pointers, dkdv 32x32 w4 s2 pointers, "
                                                  "dq 32x32 w4 s2 pointers]")


def test_gpu_check_runs_every_load_path(bench):
    """`--check` checks the autotuned op and a pointer and a TMA config run alone; each of its runs
    gives out, lse and the three gradients of the reference (here in the interpreter, fp32)."""
    import torch

    from dcvg_kernels import attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 32, generator=g).requires_grad_() for n in (70, 45, 45))
    grad = torch.randn(2, 70, 2, 32, generator=g)
    out, lse = attention_reference(*(t.double() for t in (q, k, v)))
    want = [out, lse, *torch.autograd.grad(out, (q, k, v), grad.double())]
    runs = bench["_attention_check_runs"]()
    assert [label.split()[-1] for label, _ in runs] == ["autotuned", "pointers", "tma"]
    for label, run in runs:
        for got, ref in zip(run(q, k, v, grad), want):
            torch.testing.assert_close(got.double(), ref.double(), atol=2e-5, rtol=2e-5, msg=lambda m, run=label: f"{run}: {m}")


def test_only_configs_restores_the_autotuner(bench):
    """`--check` runs chosen configs alone through the autotuners, then puts their lists back."""
    from dcvg_kernels import conv3d

    tuned = conv3d._conv3d_tuned
    before, cache = list(tuned.configs), tuned.cache
    with bench["only_configs"]({tuned: before[:1]}):
        assert tuned.configs == before[:1] and tuned.cache == {}
    assert tuned.configs == before and tuned.cache is cache
    # the interpreter's single config has no W_TMA twin: only the autotuned run is checked here
    assert [label for label, _ in bench["_conv_check_configs"](20, 40, __import__("torch").float32, "cpu")] == [
        "autotuned"]


def test_gpu_check_runs_end_to_end_in_the_interpreter(bench, monkeypatch, capsys):
    """The `--check` code path itself (it otherwise runs only on a lent GPU), on tiny shapes."""
    import torch

    module = bench["check_cuda"].__globals__  # run_path hands back a copy of the module's globals
    monkeypatch.setitem(module, "CHECK_ATTENTION", [((1, 40, 33, 2, 32), torch.float32)])
    monkeypatch.setitem(module, "CHECK_CONV", [((8, 12, 3, (5, 6), (3, 3, 3), "chunk_causal", 2, 1), torch.float32)])
    assert bench["check_cuda"](device="cpu")
    out = capsys.readouterr().out
    assert out.count("| True |") == 4 and "all checks passed: True" in out  # 3 attention runs, 1 conv run
