"""Full-state training checkpoints: one file per save, written atomically, the last N kept.

A checkpoint is `torch.save`d to a temp file next to its final name and renamed only when
complete (`dcae_v.checkpoint.staged_file`), so a crash or kill during a write leaves at most a
hidden `.step_*.tmp` file, never a truncated `step_*.pt`; such leftovers are deleted when a run
starts or resumes in the folder. Loading tries the newest file first and falls back to older ones
if a file is unreadable (e.g. damaged on disk).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from dcae_v.checkpoint import staged_file
from dcae_v.errors import CheckpointError

log = logging.getLogger("dcae_v.train")
_NAME = re.compile(r"^step_(\d{8})\.pt$")
# temp names of `staged_file` (".<final name>.<mkstemp suffix>.tmp") for the files a run writes
_TEMP = re.compile(r"^\.(step_\d{8}\.pt|dcae-v-.+\.pt|model\.safetensors|config\.json)\.[A-Za-z0-9_]+\.tmp$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files of interrupted writes are ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temps(*directories: Path) -> list[Path]:
    """Delete temp files left by a save that was killed mid-write (only names this trainer makes)."""
    removed = []
    for directory in directories:
        if directory.is_dir():
            for p in directory.iterdir():
                if _TEMP.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    if removed:
        log.info("removed %d leftover temp file(s) of interrupted saves: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def save_state(directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write step_<step>.pt atomically, then delete all but the newest `keep_last` checkpoints."""
    target = checkpoint_path(directory, step)
    with staged_file(target) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return target


def checkpoint_step(path: Path) -> int:
    """The step in a step_N.pt name (-1 for another name)."""
    m = _NAME.match(path.name)
    return int(m[1]) if m else -1


def load_checkpoint(path: Path) -> tuple[dict[str, Any], Path]:
    """(state, path) of one chosen checkpoint (`dcae-v train --resume step_N.pt`)."""
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated or foreign file: torch raises many types
        raise CheckpointError(f"--resume {path}: cannot load it ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"step", "model", "config"} <= set(state):
        raise CheckpointError(f"--resume {path}: not a `dcae-v train` checkpoint (a step_N.pt of run.out_dir/checkpoints)")
    return state, path


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """(state, path) of the newest readable checkpoint, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # noqa: BLE001 -- truncated or foreign file: torch raises many types
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, str(e).splitlines()[0])
    if list_checkpoints(directory):
        raise CheckpointError(f"no readable checkpoint in {directory}; every step_*.pt failed to load")
    return None
