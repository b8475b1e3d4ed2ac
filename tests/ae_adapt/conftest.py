"""Shared fixtures: the tiny clip world (ae_adapt_world.py) and a base DiT pre-trained on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import ae_adapt_world as world


@pytest.fixture(scope="session")
def base_dit():
    """Pre-trained (100 steps) base ExampleDiT; tests deep-copy it before changing it."""
    return world.pretrained_base(100)


@pytest.fixture(scope="session")
def pairs():
    """32 clips as {"base": f2c4 latent, "new": f8c8 latent, "context"}."""
    return world.samples(32)


@pytest.fixture(scope="session")
def twin_pairs():
    """Same clips with the f4c16 'twin' new latent (same token grid as the base)."""
    return world.samples(32, new=world.twin_encode)


@pytest.fixture(scope="session")
def clip_world():
    return world
