"""Atomic writes with ordinary permissions, so that an interrupt never leaves a half-written output
under its final name and teammates on a shared cluster can read what a run wrote.

`staged(path)` yields a hidden temp path beside `path`; when the block ends without an error the
temp is given the mode a plain `open()` would (0666 minus the umask: safetensors and `mkstemp`
make 0600 files) and renamed over `path`; on an error (Ctrl-C included) it is removed.
`staged_dir(path)` does the same for a folder (e.g. a peft adapter). Temps that a killed writer
left behind are removed by the next write of the same output."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_like_open(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give `path` the mode `open()` (or `mkdir()`) would have given it under the current umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _remove_stale(target: Path) -> None:
    """Temps of `target` left by a killed writer (one writer per output: rank 0 of a run)."""
    for stale in [*target.parent.glob(f".{target.name}.*.tmp"), *target.parent.glob(f".{target.name}.old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        chmod_like_open(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `path`; on success it takes `path`'s place (an older
    `path` is moved aside first and then deleted), on an error it is deleted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        chmod_like_open(tmp, directory=True)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(state: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` through `staged`: atomic, with ordinary permissions."""
    from safetensors.torch import save_file

    with staged(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with staged(path) as tmp:
        tmp.write_text(text)
    return Path(path)
