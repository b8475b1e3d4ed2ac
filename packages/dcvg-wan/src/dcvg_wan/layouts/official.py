"""The official Wan2.1 layout (wan/modules/model.py key names): the model's own, so identity."""

from __future__ import annotations

from collections.abc import Mapping

NAME = "official"
MARKERS = ("head.modulation", "head.head.weight", "time_embedding.0.weight", "time_projection.1.weight")


def matches(keys: list[str]) -> bool:
    return any(k in MARKERS or ".self_attn." in k for k in keys)


def to_official(sd: Mapping) -> dict:
    return dict(sd)


def from_official(sd: Mapping) -> dict:
    return dict(sd)
