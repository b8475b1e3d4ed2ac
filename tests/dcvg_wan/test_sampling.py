"""Flow-matching schedules and solvers against diffusers (test-only reference) and closed forms;
defaults, noise and guidance of the sampling loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from dcvg_wan.errors import InputError
from dcvg_wan.sampling import (
    NEGATIVE_PROMPT,
    cfg_combine,
    make_noise,
    resolve_seed,
    sample,
    sample_defaults,
)
from dcvg_wan.schedulers import flow_schedule, make_solver, shift_sigma

TOL = 1e-5
CASES = [(50, 5.0), (12, 3.0), (4, 16.0), (1, 5.0), (2, 1.0)]


def official_unshifted(steps: int, solver: str = "unipc") -> np.ndarray:
    """The official sigmas before the shift, written with numpy as the Wan2.1 code does."""
    if solver == "dpm++":
        return np.linspace(1, 0, steps + 1)[:steps]
    sigma_max = float(np.float32(1 - np.linspace(1, 1 / 1000, 1000)[::-1][0]))
    return np.linspace(sigma_max, 0, steps + 1)[:-1]


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear in x with a timestep-dependent term, so every solver coefficient matters."""
    c = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    s = t.float().view(-1, *[1] * (x.ndim - 1)) / 1000
    return (0.8 - 0.5 * s) * x - 0.3 * c + 0.2 * s


def run_ours(solver: str, steps: int, shift: float, x: torch.Tensor) -> list[torch.Tensor]:
    sched = flow_schedule(steps, shift, solver)
    stepper, out = make_solver(solver, sched), []
    for t in sched.timesteps:
        x = stepper.step(toy_denoiser(x, t.expand(x.shape[0])), x)
        out.append(x)
    return out


def run_diffusers(scheduler, x: torch.Tensor, model_timesteps: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`model_timesteps`: what the denoiser is given (ours: int64) when the scheduler's own
    timesteps differ (FlowMatchEuler keeps floats); the scheduler always gets its own."""
    out = []
    model_timesteps = scheduler.timesteps if model_timesteps is None else model_timesteps
    for t, t_model in zip(scheduler.timesteps, model_timesteps):
        v = toy_denoiser(x, t_model.expand(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]
        out.append(x)
    return out


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 2, 4, 5, generator=torch.Generator().manual_seed(seed))


def assert_trajectories_match(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    print(f"max abs diff over {len(ours)} steps: {worst:.2e}")
    assert worst <= tol


# ---- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps,shift", CASES)
def test_schedule_closed_form(solver, steps, shift):
    sched = flow_schedule(steps, shift, solver)
    base = official_unshifted(steps, solver)
    shifted = shift * base / (1 + (shift - 1) * base)
    assert sched.timesteps.dtype == torch.int64 and sched.sigmas.dtype == torch.float32
    assert sched.timesteps.tolist() == (shifted * 1000).astype(np.int64).tolist()
    assert sched.sigmas.tolist() == np.concatenate([shifted, [0.0]]).astype(np.float32).tolist()
    assert sched.timesteps[0] == (1000 if solver == "dpm++" else 999)


def test_schedule_known_values():
    """50 steps, shift 5 (the T2V default): spot values computed by hand from the formula."""
    sched = flow_schedule(50, 5.0)
    assert sched.timesteps[:3].tolist() == [999, 995, 991]
    assert sched.timesteps[-1].item() == int(1000 * shift_sigma(0.999 / 50, 5.0))  # 90
    assert len(sched) == 50 and sched.sigmas[-1] == 0


@pytest.mark.parametrize("bad", [{"steps": 0, "shift": 5.0}, {"steps": 5, "shift": 0.0}])
def test_schedule_rejects_bad_input(bad):
    with pytest.raises(InputError, match="steps|shift"):
        flow_schedule(**bad)


def test_unknown_solver():
    with pytest.raises(InputError, match="unknown sample solver 'heun'.*unipc"):
        flow_schedule(10, 5.0, "heun")


# ---- step-by-step parity with diffusers -------------------------------------------------------
@pytest.mark.parametrize("steps,shift", CASES)
def test_unipc_matches_diffusers(steps, shift):
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    assert ref.config.solver_order == 2 and ref.config.solver_type == "bh2" and ref.config.lower_order_final
    ref.set_timesteps(sigmas=official_unshifted(steps))  # diffusers shifts them with flow_shift
    ours = flow_schedule(steps, shift)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas)
    assert_trajectories_match(run_ours("unipc", steps, shift, start()), run_diffusers(ref, start()))


@pytest.mark.parametrize("steps,shift", CASES)
def test_euler_matches_diffusers(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=official_unshifted(steps).tolist())
    ours = flow_schedule(steps, shift, "euler")
    assert torch.allclose(ref.sigmas, ours.sigmas)
    assert_trajectories_match(run_ours("euler", steps, shift, start()), run_diffusers(ref, start(), ours.timesteps))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("steps,shift", CASES)
def test_dpmpp_matches_diffusers(steps, shift):
    """diffusers' flow sigmas for DPM++ start below 1, the official ones at 1: install ours."""
    ref = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    assert ref.config.algorithm_type == "dpmsolver++" and ref.config.solver_type == "midpoint"
    ref.set_timesteps(steps)
    ours = flow_schedule(steps, shift, "dpm++")
    ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
    assert_trajectories_match(run_ours("dpm++", steps, shift, start()), run_diffusers(ref, start()))


def test_solver_refuses_an_extra_step():
    stepper = make_solver("unipc", flow_schedule(2, 5.0))
    x = start()
    for _ in range(2):
        x = stepper.step(x, x)
    with pytest.raises(InputError, match="2 steps"):
        stepper.step(x, x)


# ---- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_point_mass_is_reached_exactly(solver, steps):
    """Data = one point x*: the exact velocity is (x - x*) / sigma, every x0 prediction is x*."""
    target = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    sigma_of = {int(t): s for t, s in zip(*_pairs(steps, solver))}

    def exact(x, t):
        return (x - target) / sigma_of[int(t[0])]

    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    out = sample(exact, noise, steps=steps, shift=5.0, solver=solver)
    assert (out - target).abs().max().item() <= 1e-5


def _pairs(steps, solver):
    sched = flow_schedule(steps, 5.0, solver)
    return sched.timesteps.tolist(), sched.sigmas[:-1].tolist()


def gaussian_velocity(mu: float, s: float, sigma: float):
    """Exact flow for data N(mu, s^2): E[noise - x0 | x_sigma] (jointly Gaussian, closed form)."""
    a = 1 - sigma
    var = a * a * s * s + sigma * sigma

    def v(x):
        r = x - a * mu
        return sigma / var * r - (mu + a * s * s / var * r)

    return v


def path_error(solver: str, steps: int, mu: float = 0.7, s: float = 0.4) -> float:
    """Sample data N(mu, s^2) with its exact velocity. The probability-flow ODE is then linear:
    noise e (sigma 1) travels along x_sigma = (1-sigma)*mu + sqrt((1-sigma)^2 s^2 + sigma^2) * e.
    Error against that path at the last sigma before 0 (the final step returns the posterior
    mean E[x0|x], exact only as sigma -> 0)."""
    sched = flow_schedule(steps, 3.0, solver)
    sigma_of = {int(t): sg for t, sg in zip(sched.timesteps.tolist(), sched.sigmas.tolist())}

    def exact(x, t):
        return gaussian_velocity(mu, s, sigma_of[int(t[0])])(x)

    def on_path(sigma, noise):
        return (1 - sigma) * mu + ((1 - sigma) ** 2 * s * s + sigma * sigma) ** 0.5 * noise

    noise, seen = start(5).double(), {}
    x_start = on_path(sched.sigmas[0].item(), noise)
    sample(exact, x_start, steps=steps, shift=3.0, solver=solver, callback=lambda i, t, x: seen.update({i: x}))
    return (seen[steps - 2] - on_path(sched.sigmas[-2].item(), noise)).abs().max().item()


@pytest.mark.parametrize("solver,order", [("unipc", 2), ("dpm++", 2), ("euler", 1)])
def test_gaussian_data_converges_at_the_solver_order(solver, order):
    """Tripling the steps (100 -> 300) divides the error by ~3^order: >= 4.5 for the second-order
    solvers, <= 3.5 for Euler; the second-order ones are also several times more accurate."""
    e100, e300 = path_error(solver, 100), path_error(solver, 300)
    print(f"{solver}: error {e100:.2e} @100 steps, {e300:.2e} @300, ratio {e100 / e300:.1f}")
    assert e300 < e100 <= (1.5e-2 if order == 2 else 5e-2)
    assert e100 / e300 >= 4.5 if order == 2 else 2.5 <= e100 / e300 <= 3.5


# ---- guidance and the loop ----------------------------------------------------------------------
def test_cfg_combine_formula():
    vc, vu = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg_combine(vc, vu, 5.0), vu + 5.0 * (vc - vu))
    assert torch.equal(cfg_combine(vc, vu, 1.0), vc)


def test_sample_with_guidance_equals_sampling_the_guided_field():
    def cond(x, t):
        return toy_denoiser(x, t)

    def uncond(x, t):
        return 0.5 * x

    guided = sample(cond, start(), steps=6, shift=5.0, guide_scale=4.0, uncond_fn=uncond)
    direct = sample(lambda x, t: uncond(x, t) + 4.0 * (cond(x, t) - uncond(x, t)), start(), steps=6, shift=5.0)
    assert torch.equal(guided, direct)


def test_guide_scale_one_skips_the_unconditional_pass_and_callback_sees_every_step():
    seen = []

    def fail(x, t):
        raise AssertionError("uncond_fn must not run at guide_scale 1")

    out = sample(toy_denoiser, start(), steps=5, shift=5.0, uncond_fn=fail, callback=lambda i, t, x: seen.append(int(t)))
    assert seen == flow_schedule(5, 5.0).timesteps.tolist()
    assert torch.isfinite(out).all()


def test_guidance_without_uncond_raises():
    with pytest.raises(InputError, match="uncond_fn"):
        sample(toy_denoiser, start(), steps=2, shift=5.0, guide_scale=5.0)


def test_denoiser_sees_int64_timesteps_per_batch_row():
    got = []

    def spy(x, t):
        got.append(t.clone())
        return torch.zeros_like(x)

    sample(spy, start(), steps=3, shift=5.0, solver="unipc")
    assert all(t.dtype == torch.int64 and t.shape == (2,) for t in got)
    assert [t[0].item() for t in got] == flow_schedule(3, 5.0).timesteps.tolist()


# ---- noise --------------------------------------------------------------------------------------
def test_noise_is_reproducible_and_seed_dependent():
    a = make_noise((1, 16, 2, 4, 4), seed=42)
    assert torch.equal(a, make_noise((1, 16, 2, 4, 4), seed=42))
    assert not torch.equal(a, make_noise((1, 16, 2, 4, 4), seed=43))
    assert a.dtype == torch.float32
    # torch's CPU generator (mt19937) is stable across versions and machines: pin the values
    expected = torch.randn(4, generator=torch.Generator().manual_seed(42))
    assert torch.equal(make_noise((4,), seed=42), expected)
    assert [round(v, 4) for v in expected.tolist()] == [0.3367, 0.1288, 0.2345, 0.2303]
    assert make_noise((4,), seed=42, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_resolve_seed():
    assert resolve_seed(7) == 7
    assert 0 <= resolve_seed(-1)


# ---- defaults -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,size,steps,shift,frames",
    [
        ("t2v-1.3B", "832*480", 50, 5.0, 81),
        ("t2v-14B", "1280*720", 50, 5.0, 81),
        ("i2v-14B", "1280*720", 40, 5.0, 81),
        ("i2v-14B", "480*832", 40, 3.0, 81),
        ("i2v-14B-480p", None, 40, 3.0, 81),  # our preset name: 480p size by default
        ("i2v-14B-720p", None, 40, 5.0, 81),
        ("flf2v-14B", "1280*720", 50, 16.0, 81),
        ("vace-1.3B", "832*480", 50, 16.0, 81),
        ("t2i-14B", "1024*1024", 50, 5.0, 1),
        ("dcvg-t2v-14B", "1280*720", 50, 5.0, 81),
    ],
)
def test_official_defaults(task, size, steps, shift, frames):
    d = sample_defaults(task, size)
    assert (d.steps, d.shift, d.frame_num, d.guide_scale, d.solver, d.fps) == (steps, shift, frames, 5.0, "unipc", 16)


def test_default_sizes_and_negative_prompts():
    assert sample_defaults("t2v-1.3B").size == "832*480"  # 1280*720 is not supported by the 1.3B model
    assert sample_defaults("t2v-14B").size == "1280*720"
    assert sample_defaults("t2v-14B").negative_prompt == NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert sample_defaults("i2v-14B").negative_prompt == "镜头晃动，" + NEGATIVE_PROMPT
    assert sample_defaults("flf2v-14B").negative_prompt == "镜头切换，" + NEGATIVE_PROMPT


def test_defaults_reject_unknown_task_and_size():
    with pytest.raises(InputError, match="unknown task 'x2v'"):
        sample_defaults("x2v")
    with pytest.raises(InputError, match="unsupported size '1280\\*720' for task t2v-1.3B.*832\\*480"):
        sample_defaults("t2v-1.3B", "1280*720")
