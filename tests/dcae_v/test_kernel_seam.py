"""The `dcvg-kernels` seam: which convolution runs, and that the model only convolves through it."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dcae_v import DCAEV, kernels
from dcae_v.blocks import TemporalConv3d
from dcae_v.temporal import TemporalRule, conv3d_torch


class _FakeCuda:
    """Stands in for a CUDA tensor: select_conv only looks at `is_cuda`."""

    is_cuda = True
    shape = (1, 2, 3, 4, 4)
    dtype = torch.bfloat16
    device = "cuda:0"

    def is_contiguous(self, memory_format=None):
        return True


def _fake_kernel(*args, **kwargs):
    raise AssertionError("the fake kernel is only selected, never run")


@pytest.fixture
def seam(monkeypatch):
    """A clean kernel cache and environment; both are restored afterwards."""
    monkeypatch.setenv("DCAE_V_KERNELS", "1")
    monkeypatch.setattr(kernels, "_decisions", {})
    kernels._triton_conv.cache_clear()
    yield monkeypatch
    kernels._triton_conv.cache_clear()  # runs before monkeypatch puts sys.modules back


def _install(monkeypatch, **attrs) -> types.ModuleType:
    module = types.ModuleType("dcvg_kernels")
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, "dcvg_kernels", module)
    kernels._triton_conv.cache_clear()
    return module


def test_cpu_tensors_use_the_torch_reference(seam):
    assert kernels.select_conv(torch.zeros(1)) is conv3d_torch
    _install(seam, chunk_causal_conv3d=_fake_kernel)
    assert kernels.kernel_available()
    assert kernels.select_conv(torch.zeros(1, 2, 3, 4, 5)) is conv3d_torch  # installed, but not CUDA


def _routes_to(fn, kernel) -> bool:
    return getattr(fn, "args", None) == (kernel,)


def test_cuda_inputs_go_to_the_kernel_when_installed(seam):
    _install(seam, chunk_causal_conv3d=_fake_kernel)
    assert _routes_to(kernels.select_conv(_FakeCuda()), _fake_kernel)


def test_kernel_receives_plain_arguments(seam):
    """dcvg-kernels is a leaf: it gets mode/chunk/context, never a dcae_v object."""
    calls = []
    _install(seam, chunk_causal_conv3d=lambda *a, **kw: calls.append((a, kw)) or "out")
    x, w, b, ctx = _FakeCuda(), torch.zeros(2, 2, 3, 3, 3), torch.zeros(2), torch.zeros(1, 2, 1, 4, 4)
    assert kernels.conv3d(x, w, b, TemporalRule("causal", 0), ctx) == "out"
    (args, kw), = calls
    assert args == (x, w, b) and kw == {"mode": "causal", "chunk": 0, "context": ctx}


def test_default_is_auto_on_cuda(seam):
    _install(seam, chunk_causal_conv3d=_fake_kernel)
    seam.delenv("DCAE_V_KERNELS")
    fn = kernels.select_conv(_FakeCuda())
    assert fn.func is kernels._auto and fn.args == (_fake_kernel,)


def test_env_var_forces_torch_or_kernel(seam):
    _install(seam, chunk_causal_conv3d=_fake_kernel)
    seam.setenv("DCAE_V_KERNELS", "0")
    assert kernels.select_conv(_FakeCuda()) is conv3d_torch
    seam.setenv("DCAE_V_KERNELS", "1")
    assert _routes_to(kernels.select_conv(_FakeCuda()), _fake_kernel)


def test_bad_env_value_is_a_clear_input_error(seam):
    from dcae_v.errors import InputError

    _install(seam, chunk_causal_conv3d=_fake_kernel)
    seam.setenv("DCAE_V_KERNELS", "yes")
    with pytest.raises(InputError, match="DCAE_V_KERNELS='yes'.*auto.*1.*0"):
        kernels.select_conv(_FakeCuda())


def _timer(times):
    """A fake timer: runs the candidate once and returns its scripted time."""
    def timer(fn):
        return times[fn()]
    return timer


def test_auto_picks_the_faster_path_once_per_signature(seam):
    calls = []
    run_kernel = lambda: calls.append("kernel") or "kernel"
    run_torch = lambda: calls.append("torch") or "torch"
    assert kernels.decide("a", run_kernel, run_torch, _timer({"kernel": 1.0, "torch": 2.0})) is True
    assert kernels.decide("b", run_kernel, run_torch, _timer({"kernel": 3.0, "torch": 2.0})) is False
    assert calls == ["kernel", "torch", "kernel", "torch"]
    # remembered: no more timing for known signatures, whatever a timer would say now
    assert kernels.decide("a", run_kernel, run_torch, _timer({"kernel": 9.0, "torch": 1.0})) is True
    assert kernels.decide("b", run_kernel, run_torch, _timer({"kernel": 0.0, "torch": 1.0})) is False
    assert len(calls) == 4


def test_auto_keeps_torch_with_a_warning_when_the_kernel_fails(seam):
    def broken():
        raise RuntimeError("out of shared memory")

    with pytest.warns(RuntimeWarning, match="Triton conv failed.*out of shared memory.*DCAE_V_KERNELS=0"):
        assert kernels.decide("k", broken, lambda: "torch", lambda fn: fn() and 1.0) is False
    assert kernels._decisions["k"] is False


def test_auto_dispatch_runs_the_decided_path(seam):
    """_auto on real (CPU) tensors with the timing replaced: the output is the chosen path's."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 2, 4, 5, 5), torch.randn(3, 2, 3, 3, 3), torch.randn(3)
    rule = TemporalRule("chunk_causal", 2)
    kernel = lambda *a, **kw: torch.full((1, 3, 4, 5, 5), 7.0)
    for kernel_ms, expected in ((1.0, torch.full((1, 3, 4, 5, 5), 7.0)), (5.0, conv3d_torch(x, w, b, rule))):
        seam.setattr(kernels, "_decisions", {})
        seam.setattr(kernels, "_milliseconds", lambda fn, device, ms=kernel_ms: ms if fn().eq(7).all() else 2.0)
        assert torch.equal(kernels._auto(kernel, x, w, b, rule), expected)
        assert list(kernels._decisions) == [kernels.signature(x, w, rule, None)]


def test_package_without_the_kernel_falls_back(seam):
    _install(seam)  # like today's dcvg-kernels skeleton: nothing exported
    assert not kernels.kernel_available()
    assert kernels.select_conv(_FakeCuda()) is conv3d_torch


def test_package_that_fails_to_import_falls_back(seam):
    seam.setitem(sys.modules, "dcvg_kernels", None)  # makes `import dcvg_kernels` raise ImportError
    kernels._triton_conv.cache_clear()
    assert not kernels.kernel_available()
    assert kernels.select_conv(_FakeCuda()) is conv3d_torch


def test_conv3d_passes_every_argument_to_the_selected_function(seam):
    seen = []
    x, w, b = torch.zeros(1, 2, 3, 4, 4), torch.zeros(5, 2, 3, 3, 3), torch.zeros(5)
    rule, context = TemporalRule("chunk_causal", 4), torch.ones(1, 2, 1, 4, 4)
    seam.setattr(kernels, "select_conv", lambda t: (lambda *a: seen.append(a) or "out"))
    assert kernels.conv3d(x, w, b, rule, context) == "out"
    assert len(seen) == 1 and all(p is q for p, q in zip(seen[0], (x, w, b, rule, context)))


def test_fakes_do_not_leak_into_later_tests():
    """Runs after the tests above: the fixture cleared the cache, so the real package is seen again."""
    import dcvg_kernels

    assert sys.modules["dcvg_kernels"] is dcvg_kernels and dcvg_kernels.__file__
    assert kernels._triton_conv() is getattr(dcvg_kernels, "chunk_causal_conv3d", None)
    assert kernels.select_conv(torch.zeros(1)) is conv3d_torch


@torch.no_grad()
@pytest.mark.parametrize("frames_per_tile", [None, 8])
def test_every_temporal_conv_goes_through_the_seam(seam, frames_per_tile):
    torch.manual_seed(0)
    model = DCAEV.from_preset("debug", chunk_size=8).eval()
    x = torch.rand(1, 3, 16, 32, 32) * 2 - 1
    reference = model.decode(model.encode(x, frames_per_tile), frames_per_tile)

    convs = [m for m in model.modules() if isinstance(m, TemporalConv3d)]
    forwards, routed = [], []
    hooks = [m.register_forward_hook(lambda mod, args, out: forwards.append(mod)) for m in convs]
    real = kernels.select_conv

    def counting_select(t):
        fn = real(t)

        def counted(*args, **kwargs):
            routed.append(args[0].shape)
            return fn(*args, **kwargs)

        return counted

    seam.setattr(kernels, "select_conv", counting_select)
    try:
        y = model.decode(model.encode(x, frames_per_tile), frames_per_tile)
    finally:
        for h in hooks:
            h.remove()
    calls_per_conv = 1 if frames_per_tile is None else 16 // frames_per_tile
    assert len(forwards) == len(convs) * calls_per_conv
    assert len(routed) == len(forwards)  # every TemporalConv3d call went through select_conv
    assert torch.equal(y, reference)


@torch.no_grad()
def test_model_output_comes_from_the_selected_function(seam):
    torch.manual_seed(0)
    model = DCAEV.from_preset("debug", chunk_size=8).eval()
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    baseline = model.encode(x)
    seam.setattr(kernels, "select_conv", lambda t: (lambda *a: conv3d_torch(*a) * 0))
    z = model.encode(x)
    assert not torch.allclose(z, baseline)
    # with every conv zeroed, only the biases/norms' constant path is left: the latent is constant
    assert torch.equal(z, torch.zeros_like(z))
