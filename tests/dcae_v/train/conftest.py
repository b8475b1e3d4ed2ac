"""Tiny training data: a few 12-24 frame 40x40 clips (lossless FFV1) and still PNGs, made once per session."""

from __future__ import annotations

import av
import numpy as np
import pytest

from dcae_v.train import TrainConfig
from dcae_v.train.config import from_dict


def write_media(path, frames: np.ndarray, codec: str = "ffv1", pix_fmt: str = "bgr0") -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=16)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = pix_fmt
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode(None))


def moving_clip(t: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    fx, fy, vx = rng.uniform(5, 12, 3)
    base = np.stack([128 + 100 * np.sin(xx / fx + tt / vx), 128 + 90 * np.cos(yy / fy - tt / 4), 60 + 3 * (xx + yy)], -1)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_media")
    for i, t in enumerate((24, 16, 20, 12)):
        write_media(d / f"clip{i}.mkv", moving_clip(t, 40, 40 + 8 * i, seed=i))
    for i in range(2):
        write_media(d / f"img{i}.png", moving_clip(1, 36, 44, seed=10 + i), "png", "rgb24")
    return d


def tiny_config(out_dir, source, **sections) -> TrainConfig:
    """The debug preset with 8-frame chunks, 8-frame 32x32 clips, batch 2, no EMA warm-up tricks."""
    base = {
        "model": {"preset": "debug", "chunk_size": 8},
        "data": {"source": str(source), "frames": 8, "size": 32},
        "optim": {"batch_size": 2, "max_steps": 3, "warmup_steps": 2, "lr": 1e-3},
        "checkpoint": {"every": 0, "export": False},
        "run": {"out_dir": str(out_dir), "progress": False, "log_every": 1},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(base)
