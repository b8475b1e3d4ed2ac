"""A diffusers `scheduler/scheduler_config.json` read into what our solvers take.

NVIDIA's DC-Gen folders (`dc-ai/DC-Gen-Wan2.1-T2V-14B`, `-I2V-14B`) ship one, and their pipeline
samples with `UniPCMultistepScheduler.from_pretrained(ckpt, subfolder="scheduler")`; its
`flow_shift` is the one number our UniPC needs from it, and UniPC then samples on diffusers'
sigma grid (linspace(1, 1/1000) rather than the official linspace(0.999, 0); the algorithm is the
same). The solver itself (flow sigmas, order 2, bh2, x0-prediction, lower order at the end, final
sigma 0) is fixed here, as in the official Wan code; any field of the file that asks for something else is reported in a note, not silently
ignored. Fields missing from the file take diffusers' defaults, as `from_pretrained` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dcvg_wan.errors import CheckpointError

# field: (what our UniPC does, diffusers' default when the file omits the field)
_FIXED = {
    "use_flow_sigmas": (True, False),
    "prediction_type": ("flow_prediction", "epsilon"),
    "solver_order": (2, 2),
    "solver_type": ("bh2", "bh2"),
    "predict_x0": (True, True),
    "lower_order_final": (True, True),
    "final_sigmas_type": ("zero", "zero"),
    "num_train_timesteps": (1000, 1000),
    "disable_corrector": ([], []),
    "thresholding": (False, False),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "use_dynamic_shifting": (False, False),
    "shift_terminal": (None, None),
}
_CLASSES = ("UniPCMultistepScheduler", "FlowUniPCMultistepScheduler")
DIFFUSERS_FLOW_SHIFT = 1.0  # UniPCMultistepScheduler's default when the file has no flow_shift


@dataclass(frozen=True)
class SchedulerSettings:
    """The sampling settings a scheduler config gives: the flow shift, our solver, and notes."""

    shift: float
    solver: str = "unipc"
    grid: str = "diffusers"  # UniPC samples on diffusers' sigma grid, as the folder's pipeline does
    notes: tuple[str, ...] = ()
    source: str = ""


def read_scheduler_config(path: str | os.PathLike) -> SchedulerSettings:
    """A `scheduler_config.json` (or the `scheduler/` folder holding it) -> SchedulerSettings."""
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the scheduler config {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    notes = []
    name = data.get("_class_name")
    if name not in _CLASSES:
        notes.append(f"{path} names {name!r}; sampling uses the flow UniPC solver ({_CLASSES[0]} with flow sigmas)")
    for field, (ours, default) in _FIXED.items():
        value = data.get(field, default)
        if value != ours:
            notes.append(f"{path}: {field}={value!r} is not followed; the solver uses {field}={ours!r}")
    shift = data.get("flow_shift", DIFFUSERS_FLOW_SHIFT)
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not shift > 0:
        raise CheckpointError(f"{path}: flow_shift must be a positive number, got {shift!r}")
    return SchedulerSettings(shift=float(shift), notes=tuple(notes), source=str(path))
