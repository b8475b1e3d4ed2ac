"""Flow-matching noise schedules and ODE solvers, as Wan-2.1 samples (wan/utils/fm_solvers*.py).

x_sigma = (1 - sigma) * x0 + sigma * noise; the DiT predicts the velocity v = noise - x0, so
x0 = x_sigma - sigma * v. A schedule is N decreasing sigmas (after the timestep shift) plus a
final 0; the DiT sees int64(sigma * 1000), as in the official code. Each solver keeps its own
history and is stepped once per model call: `x = solver.step(v, x)`.

The solver coefficients are computed with float32 scalar tensors in the same order as the
official schedulers, so the results match them (and diffusers) to float32 rounding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from dcvg_wan.errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "dpm++", "euler")


def shift_sigma(sigma: float, shift: float) -> float:
    """The timestep shift sigma' = s*sigma / (1 + (s-1)*sigma): s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace(start, stop, num) in float64, value for value (i*step + start, exact end)."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [stop]


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class FlowSchedule:
    """sigmas [N+1] float32 ending in 0; timesteps [N] int64 (what the DiT is given)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


GRIDS = ("wan", "diffusers")


def flow_schedule(
    steps: int, shift: float, solver: str = "unipc", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    grid: str = "wan",
) -> FlowSchedule:
    """The sigmas for `steps` model calls.

    grid "wan" (the official code): unipc (and euler): linspace(sigma_max, 0, N+1)[:-1] with
    sigma_max = float32(1 - 1/T) = 0.999 (`FlowUniPCMultistepScheduler.set_timesteps`); dpm++:
    linspace(1, 0, N+1)[:-1] (`get_sampling_sigmas`). grid "diffusers" (unipc only): diffusers'
    `UniPCMultistepScheduler(use_flow_sigmas=True)`, which NVIDIA's DC-VideoGen pipelines sample
    with: linspace(1, 1/T, N+1)[:-1], and a first shifted sigma of 1 lowered by 1e-6. Then
    shifted, timesteps = int64(sigma * T), final sigma 0."""
    _check_solver(solver)
    if grid not in GRIDS:
        raise InputError(f"unknown sigma grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if grid == "diffusers" and solver != "unipc":
        raise InputError(f"the diffusers sigma grid is UniPC's; solver {solver!r} samples on the official grid")
    if int(steps) < 1:
        raise InputError(f"steps must be a positive integer, got {steps}")
    if not shift > 0:
        raise InputError(f"shift must be positive, got {shift}")
    if grid == "diffusers":
        sigmas = [shift_sigma(s, shift) for s in _linspace(1.0, 1.0 / num_train_timesteps, int(steps) + 1)[:-1]]
        if abs(sigmas[0] - 1) < 1e-6:  # as diffusers: keeps log(alpha) finite in the first update
            sigmas[0] -= 1e-6
        timesteps = torch.tensor([s * num_train_timesteps for s in sigmas], dtype=torch.float64).to(torch.int64)
        return FlowSchedule(torch.tensor([*sigmas, 0.0], dtype=torch.float32), timesteps)
    sigma_max = 1.0 if solver == "dpm++" else _float32(1.0 - 1.0 / num_train_timesteps)
    sigmas = [shift_sigma(s, shift) for s in _linspace(sigma_max, 0.0, int(steps) + 1)[:-1]]
    timesteps = torch.tensor([s * num_train_timesteps for s in sigmas], dtype=torch.float64).to(torch.int64)
    return FlowSchedule(torch.tensor([*sigmas, 0.0], dtype=torch.float32), timesteps)


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise InputError(f"unknown sample solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR log(alpha/sigma) with alpha = 1 - sigma (+inf at sigma 0, -inf at 1)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowSolver:
    """Steps a FlowSchedule one model call at a time; subclasses define `_update`."""

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule
        self.sigmas = schedule.sigmas
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x at sigmas[index] and the model's velocity there -> x at sigmas[index + 1]."""
        if self.index >= len(self.schedule):
            raise InputError(f"the schedule has {len(self.schedule)} steps; step() was called once too often")
        out = self._update(velocity, sample, self.index)
        self.index += 1
        return out

    def _update(self, velocity: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError


class EulerSolver(FlowSolver):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v (diffusers FlowMatchEulerDiscreteScheduler)."""

    def _update(self, velocity, sample, i):
        x = sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * velocity.float()
        return x.to(velocity.dtype)


class UniPCSolver(FlowSolver):
    """UniPC multistep (UniP predictor + UniC corrector), B(h) = expm1(-h) ("bh2"), predicting x0,
    with the official settings: solver_order 2, order 1 on the first and last step
    (`lower_order_final`), the corrector on every step but the first."""

    def __init__(self, schedule: FlowSchedule, order: int = 2):
        super().__init__(schedule)
        if order not in (1, 2):
            raise InputError(f"UniPC order must be 1 or 2, got {order}")
        self.order = order
        self.x0s: list[torch.Tensor] = []  # converted model outputs of the last `order` steps
        self.last_sample: torch.Tensor | None = None
        self.last_order = 0

    def _update(self, velocity, sample, i):
        x0 = sample - self.sigmas[i] * velocity  # flow prediction -> x0, on the uncorrected sample
        if i > 0:
            sample = self._correct(x0, sample, i)
        self.x0s = [*self.x0s, x0][-self.order :]
        order = min(self.order, len(self.schedule) - i, i + 1)  # lower_order_final; warm-up
        self.last_sample, self.last_order = sample, order
        return self._predict(sample, i, order)

    def _predict(self, x, i, order):
        s_t, s_0 = self.sigmas[i + 1], self.sigmas[i]
        m0 = self.x0s[-1]
        if s_t == 0:  # lambda_t = +inf: expm1(-h) = -1, sigma_t / sigma_0 = 0 -> x0 exactly (order 1)
            return m0.to(x.dtype)
        a_t = 1 - s_t
        h = _lam(s_t) - _lam(s_0)
        h_phi_1 = torch.expm1(-h)
        x_t = s_t / s_0 * x - a_t * h_phi_1 * m0
        if order == 2:
            rk = (_lam(self.sigmas[i - 1]) - _lam(s_0)) / h
            d1 = (self.x0s[-2] - m0) / rk
            x_t = x_t - a_t * h_phi_1 * (0.5 * d1)  # rhos_p = 0.5 for order 2
        return x_t.to(x.dtype)

    def _correct(self, model_t, this_sample, i):
        """UniC: refine the sample predicted at step i-1 with the model output at step i."""
        x, m0, order = self.last_sample, self.x0s[-1], self.last_order
        s_t, s_0 = self.sigmas[i], self.sigmas[i - 1]
        a_t = 1 - s_t
        h = _lam(s_t) - _lam(s_0)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = h_phi_1  # bh2
        x_t = s_t / s_0 * x - a_t * h_phi_1 * m0
        d1_t = model_t - m0
        if order == 1:
            return (x_t - a_t * b_h * (0.5 * d1_t)).to(this_sample.dtype)
        # order 2: solve [[1, 1], [r, 1]] rho = b for the two correction weights
        r = (_lam(self.sigmas[i - 2]) - _lam(s_0)) / h
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k / b_h
        b2 = (h_phi_k / hh - 0.5) * 2 / b_h
        rho0 = (b1 - b2) / (1 - r)
        rho1 = b1 - rho0
        d1 = (self.x0s[-2] - m0) / r
        return (x_t - a_t * b_h * (rho0 * d1 + rho1 * d1_t)).to(this_sample.dtype)


class DPMSolver(FlowSolver):
    """DPM-Solver++ multistep, order 2, midpoint (official `FlowDPMSolverMultistepScheduler`):
    first order on the first step and on the last (final sigma 0)."""

    def __init__(self, schedule: FlowSchedule):
        super().__init__(schedule)
        self.x0s: list[torch.Tensor] = []

    def _update(self, velocity, sample, i):
        x0 = sample - self.sigmas[i] * velocity
        self.x0s = [*self.x0s, x0][-2:]
        x = sample.float()
        s_t, s_0 = self.sigmas[i + 1], self.sigmas[i]
        a_t = 1 - s_t
        h = _lam(s_t) - _lam(s_0)
        phi = a_t * (torch.exp(-h) - 1.0)
        out = s_t / s_0 * x - phi * x0
        if 0 < i < len(self.schedule) - 1:  # second order (midpoint)
            r0 = (_lam(s_0) - _lam(self.sigmas[i - 1])) / h
            out = out - 0.5 * phi * ((1.0 / r0) * (x0 - self.x0s[0]))
        return out.to(x0.dtype)


def make_solver(solver: str, schedule: FlowSchedule) -> FlowSolver:
    _check_solver(solver)
    return {"unipc": UniPCSolver, "dpm++": DPMSolver, "euler": EulerSolver}[solver](schedule)

