"""ComfyUI / single-file layout: official names under the prefix `model.diffusion_model.`."""

from __future__ import annotations

from collections.abc import Mapping

NAME = "comfy"
PREFIX = "model.diffusion_model."


def matches(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def to_official(sd: Mapping) -> dict:
    """Strip the prefix; keys without it pass through (the loader reports them as unexpected)."""
    return {k.removeprefix(PREFIX): v for k, v in sd.items()}


def from_official(sd: Mapping) -> dict:
    return {PREFIX + k: v for k, v in sd.items()}
