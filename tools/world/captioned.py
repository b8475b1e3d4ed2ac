#!/usr/bin/env python
"""Captioned scenes: short clips of one coloured shape moving across a plain background, with a
caption that says what is in them ("a red circle moving left on a black background").

They train the tiny text-to-video model that `dcvg-wan generate` uses when no checkpoint is
given: a vocabulary small enough to learn on a CPU, where the prompt visibly controls the
result (colour, shape, direction, background). Deterministic from (seed, frames, height, width).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.0, 0.5, 0.05),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
}
BACKGROUNDS = {"black": (0.03, 0.03, 0.03), "gray": (0.45, 0.45, 0.45), "navy": (0.05, 0.07, 0.3)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
HELDOUT_OFFSET = 1_000_000_000  # held-out seeds: a separate random stream


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    words = ["a", "moving", "on", "background", *COLORS, *SHAPES, *MOTIONS]
    return list(dict.fromkeys(words + [b for b in BACKGROUNDS if b not in words]))


def caption(color: str, shape: str, motion: str, background: str) -> str:
    return f"a {color} {shape} moving {motion} on a {background} background"


def scene_of_seed(seed: int) -> tuple[str, str, str, str]:
    """(color, shape, motion, background) of a seed; a shape never matches its background."""
    rng = np.random.default_rng(seed)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(list(MOTIONS)))
    background = str(rng.choice(list(BACKGROUNDS)))
    return color, shape, motion, background


def render(color: str, shape: str, motion: str, background: str, *, frames: int, height: int, width: int,
           seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: the shape crosses about half the frame in the motion's direction."""
    rng = np.random.default_rng(seed + 7)
    m = min(height, width)
    r = rng.uniform(0.14, 0.2) * m
    dx, dy = MOTIONS[motion]
    travel = rng.uniform(0.35, 0.5) * m
    # start so that the path stays inside the frame, centred across the motion
    cx0 = width / 2 - dx * travel / 2 + (rng.uniform(-0.15, 0.15) * width if dx == 0 else 0)
    cy0 = height / 2 - dy * travel / 2 + (rng.uniform(-0.15, 0.15) * height if dy == 0 else 0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    bg, fg = np.array(BACKGROUNDS[background]), np.array(COLORS[color])
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        p = t / max(frames - 1, 1)
        qx, qy = xx - (cx0 + dx * travel * p), yy - (cy0 + dy * travel * p)
        if shape == "circle":
            sdf = np.hypot(qx, qy) - r
        elif shape == "square":
            ex, ey = np.abs(qx) - r * 0.85, np.abs(qy) - r * 0.85
            sdf = np.hypot(np.maximum(ex, 0), np.maximum(ey, 0)) + np.minimum(np.maximum(ex, ey), 0)
        else:  # upward triangle: max of three half-plane distances
            k = math.sqrt(3)
            sdf = np.maximum(np.maximum(qy - r * 0.6, (-qy * 0.5 + qx * k / 2) - r * 0.6), -qy * 0.5 - qx * k / 2 - r * 0.6)
        a = np.clip(0.5 - sdf, 0, 1)[..., None]
        frame = bg * (1 - a) + fg * a
        out[t] = np.clip(np.round(frame * 255), 0, 255).astype(np.uint8)
    return out


def captioned_clip(seed: int, frames: int, height: int, width: int, split: str = "train") -> tuple[np.ndarray, str]:
    """(clip uint8 [T, H, W, 3], caption) for a per-split seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    s = seed + (HELDOUT_OFFSET if split == "heldout" else 0)
    scene = scene_of_seed(s)
    return render(*scene, frames=frames, height=height, width=width, seed=s), caption(*scene)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="256x256", help="WxH")
    parser.add_argument("-o", "--out", default="captioned.mp4")
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    clip, text = captioned_clip(args.seed, args.frames, h, w)
    import av  # noqa: F401  (PyAV writes the mp4 through dcae_v.io)

    from dcae_v.io import write_video

    write_video(args.out, clip, 16)
    print(f"{args.out}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
