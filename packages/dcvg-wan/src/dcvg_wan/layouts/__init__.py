"""State-dict adapters between the official Wan layout (the model's own names) and the layouts
users have on disk: pure key mappings, no I/O, each tested by round trip."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dcvg_wan.errors import CheckpointError
from dcvg_wan.layouts import comfy, diffusers, official

LAYOUTS = {m.NAME: m for m in (official, diffusers, comfy)}


def detect_layout(keys: Iterable[str]) -> str:
    """"comfy" (prefixed official names), "diffusers" or "official", from key names alone."""
    keys = list(keys)
    if any(k.startswith("vace_blocks.") or ".vace_blocks." in k for k in keys):
        raise CheckpointError("this is a Wan VACE checkpoint (vace_blocks.*); VACE is not supported")
    if comfy.matches(keys):
        return comfy.NAME
    is_diffusers, is_official = diffusers.matches(keys), official.matches(keys)
    if is_diffusers and is_official:
        raise CheckpointError(f"the checkpoint mixes official and diffusers key names (e.g. {_sample(keys)})")
    if is_diffusers or is_official:
        return diffusers.NAME if is_diffusers else official.NAME
    raise CheckpointError(
        f"unknown checkpoint layout: no key names a Wan DiT layout (looked for official {official.MARKERS} or "
        f"'.self_attn.', diffusers {diffusers.MARKERS}, ComfyUI prefix {comfy.PREFIX!r}); "
        f"{len(keys)} keys, e.g. {_sample(keys)}"
    )


def _sample(keys: list[str], n: int = 5) -> list[str]:
    return sorted(keys)[:n]


def _module(layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def to_official(sd: Mapping, layout: str) -> dict:
    """Rename a state dict from `layout` to official names (values untouched)."""
    return _module(layout).to_official(sd)


def from_official(sd: Mapping, layout: str) -> dict:
    """Rename an official-layout state dict to `layout` (values untouched)."""
    return _module(layout).from_official(sd)


__all__ = ["LAYOUTS", "detect_layout", "from_official", "to_official"]
