"""Shared fixtures: the tiny `debug` preset with 8-frame chunks (2 latent frames)."""

import pytest
import torch

from dcae_v import DCAEV


def debug_model(seed: int = 0, **overrides) -> DCAEV:
    torch.manual_seed(seed)
    return DCAEV.from_preset("debug", **({"chunk_size": 8} | overrides)).eval()


@pytest.fixture(scope="module")
def model() -> DCAEV:
    return debug_model()


@pytest.fixture(scope="session")
def make_model():
    """Factory for fresh debug models: make_model(seed=1, temporal="causal")."""
    return debug_model
