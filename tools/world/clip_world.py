#!/usr/bin/env python
"""Clip world: a deterministic generator of short RGB video clips.

Small video autoencoders need plenty of varied, reproducible video to train and
evaluate on, and this repository must work offline. Every clip here is computed
from ``(source, seed, frames, height, width)`` alone, with nothing downloaded:

* ``lavfi_*``  -- FFmpeg's built-in lavfi test sources, decoded through PyAV
  (test cards, fractal zooms, cellular automata, gradients, noise, zone plates).
* ``photo_*``  -- a virtual camera panning / zooming / rotating over the photos
  that ship inside the scikit-image wheel, with smooth sub-pixel motion.
* ``synth_*``  -- procedural scenes: moving, rotating, occluding shapes and
  scrolling text-like glyphs over textured or gradient backgrounds.

Every generator returns a uint8 array ``[T, H, W, 3]``.

Split rule (keeps held-out evaluation honest):

* A clip's split is a pure function of its seed: seeds in ``TRAIN_SEEDS``
  (``[0, 1e9)``) are train, seeds in ``HELDOUT_SEEDS`` (``[1e9, 2e9)``) are
  held-out. Procedural sources therefore never reuse a random stream across
  splits.
* Photo sources pick from ``TRAIN_PHOTOS`` for train seeds and from
  ``HELDOUT_PHOTOS`` for held-out seeds; the two tuples are disjoint, so no
  held-out photo is ever seen in training.
* ``sample_clip(seed, ..., split)`` maps a per-split seed (``0 <= seed < 1e9``)
  into that split's range, so ``train`` seed 5 and ``heldout`` seed 5 are
  different clips.

CLI: ``python tools/world/clip_world.py --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

# --------------------------------------------------------------------------
# Seeds and splits
# --------------------------------------------------------------------------

SPLITS = ("train", "heldout")
TRAIN_SEEDS = range(1_000_000_000)
HELDOUT_SEEDS = range(1_000_000_000, 2_000_000_000)
_SPLIT_SEEDS = {"train": TRAIN_SEEDS, "heldout": HELDOUT_SEEDS}

# Photos bundled in the scikit-image wheel (no network needed). ``cat`` is an
# alias of ``chelsea`` and ``logo`` is RGBA, so neither is listed.
TRAIN_PHOTOS = (
    "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "colorwheel", "moon", "brick", "grass", "gravel", "coins", "cell", "clock",
    "page", "text",
)
HELDOUT_PHOTOS = ("astronaut", "coffee", "camera")

DEFAULT_FPS = 16


def split_of_seed(seed: int) -> str:
    """Return the split a clip seed belongs to (the split is fixed by the seed)."""
    for split, seeds in _SPLIT_SEEDS.items():
        if seed in seeds:
            return split
    raise ValueError(f"seed {seed} is outside [0, {HELDOUT_SEEDS.stop})")


def _rng(tag: str, seed: int) -> np.random.Generator:
    """Independent, platform-stable random stream per (source, seed)."""
    return np.random.default_rng([seed, zlib.crc32(tag.encode())])


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 2:
            raise ValueError(f"{name} must be even and >= 16, got {v}")


def _progress(frames: int, ease: float) -> np.ndarray:
    """Time in [0, 1] per frame, blended with smoothstep so speed varies."""
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    return (1.0 - ease) * t + ease * t * t * (3.0 - 2.0 * t)


def _random_color(rng: np.random.Generator, saturated: bool = True) -> np.ndarray:
    """A random RGB colour in [0, 1]; saturated ones read better as objects."""
    h = rng.uniform(0, 1)
    s = rng.uniform(0.55, 1.0) if saturated else rng.uniform(0.0, 0.6)
    v = rng.uniform(0.45, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _palette(rng: np.random.Generator, stops: int = 3) -> np.ndarray:
    """A 256-entry RGB lookup table through random colours (to colour gray sources)."""
    colors = np.stack([_random_color(rng, saturated=i % 2 == 1) for i in range(stops)])
    x = np.linspace(0, stops - 1, 256)
    lut = np.stack([np.interp(x, np.arange(stops), colors[:, c]) for c in range(3)], -1)
    return lut.astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample ``img[h, w, C]`` at float pixel-centre coordinates, edges clamped."""
    h, w = img.shape[:2]
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


# --------------------------------------------------------------------------
# Family 1: lavfi sources decoded through PyAV
# --------------------------------------------------------------------------
# Each builder returns (filtergraph, frames to skip, optional colour LUT for
# gray/mono sources). The seed picks parameters, rates and start offsets.


def _hex(rng: np.random.Generator) -> str:
    r, g, b = _to_uint8(_random_color(rng))
    return f"0x{r:02x}{g:02x}{b:02x}"


def _cell_size(rng: np.random.Generator, height: int, width: int) -> int:
    """Integer cell size for pixel-art automata that keeps the grid >= 8 cells."""
    ok = [c for c in (1, 2, 4) if height % c == 0 and width % c == 0 and min(height, width) // c >= 8]
    return int(rng.choice(ok))


def _g_testsrc(name):
    def build(rng, T, H, W):
        rate = int(rng.choice([8, 12, 16, 25, 30]))
        return f"{name}=size={W}x{H}:rate={rate}", int(rng.integers(0, 20 * rate)), None
    return build


def _g_testcard(rng, T, H, W):
    card = str(rng.choice(["smptebars", "smptehdbars", "pal75bars", "pal100bars",
                           "rgbtestsrc", "yuvtestsrc", "colorspectrum"]))
    # static cards made to move: wrap-around scroll from a random start, maybe a hue spin
    sx, sy = rng.uniform(0.003, 0.015, 2) * rng.choice([-1, 1], 2) * (rng.uniform(size=2) < 0.7)
    x0, y0 = rng.uniform(0, 1, 2)
    hue = rng.uniform(-60, 60) if rng.uniform() < 0.5 else 0.0
    g = (f"{card}=size={W}x{H}:rate=16,scroll=h={sx:.5f}:v={sy:.5f}:hpos={x0:.4f}:vpos={y0:.4f}"
         f",hue=h={hue:.3f}*t")
    return g, 0, None


_MANDEL_POINTS = [(-0.743643887037151, 0.131825904205330), (-0.7453, 0.1127),
                  (-1.25066, 0.02012), (-0.235125, 0.827215), (0.2817179219, 0.5771052841),
                  (-0.1592, -1.0317), (-1.7497591451, 0.0), (0.001643721971153, -0.822467633298876)]


def _g_mandelbrot(rng, T, H, W):
    x, y = _MANDEL_POINTS[rng.integers(len(_MANDEL_POINTS))]
    scale = 10 ** rng.uniform(-2.5, 0.3)
    zoom = rng.uniform(0.005, 0.03)  # log zoom per frame; negative = zoom out
    zoom *= 1 if rng.uniform() < 0.75 else -1
    inner = rng.choice(["black", "period", "convergence", "mincol"])
    outer = rng.choice(["iteration_count", "normalized_iteration_count"])
    g = (f"mandelbrot=size={W}x{H}:rate=16:maxiter=1024:start_x={x!r}:start_y={y!r}"
         f":start_scale={scale:.6g}:end_scale={scale * math.exp(-zoom * 1000):.6g}:end_pts=1000"
         f":inner={inner}:outer={outer}")
    return g, 0, None


def _g_life(rng, T, H, W):
    c = _cell_size(rng, H, W)
    rule = rng.choice(["B3/S23", "B36/S23", "B3678/S34678", "B368/S245", "B3/S12345"])
    g = (f"life=size={W // c}x{H // c}:rate=16:seed={rng.integers(2**31)}:rule={rule}"
         f":ratio={rng.uniform(0.15, 0.6):.3f}:mold={rng.integers(0, 40)}"
         f":life_color={_hex(rng)}:death_color={_hex(rng)}:mold_color={_hex(rng)}"
         f",scale={W}:{H}:flags=neighbor")
    return g, int(rng.integers(0, 30)), None


def _g_cellauto(rng, T, H, W):
    c = _cell_size(rng, H, W)
    rule = int(rng.choice([18, 22, 30, 45, 54, 60, 73, 90, 105, 110, 126, 150]))
    g = (f"cellauto=size={W // c}x{H // c}:rate=16:rule={rule}:seed={rng.integers(2**31)}"
         f":random_fill_ratio={rng.uniform(0.2, 0.8):.3f}:start_full=1"
         f",scale={W}:{H}:flags=neighbor")
    return g, int(rng.integers(0, 50)), _palette(rng, 2)


def _g_sierpinski(rng, T, H, W):
    g = (f"sierpinski=size={W}x{H}:rate=16:seed={rng.integers(2**31)}"
         f":jump={rng.integers(1, 4)}:type={rng.choice(['carpet', 'triangle'])}")
    return g, int(rng.integers(0, 100)), None


def _g_gradients(rng, T, H, W):
    n = int(rng.integers(2, 9))
    colors = "".join(f":c{i}={_hex(rng)}" for i in range(n))
    g = (f"gradients=size={W}x{H}:rate=16:seed={rng.integers(2**31)}:nb_colors={n}{colors}"
         f":speed={rng.uniform(0.005, 0.04):.4f}"
         f":type={rng.choice(['linear', 'radial', 'circular', 'spiral', 'square'])}")
    return g, int(rng.integers(0, 200)), None


def _g_perlin(rng, T, H, W):
    scale = rng.uniform(0.3, 2.0) * 64 / min(H, W)  # features relative to frame size
    g = (f"perlin=size={W}x{H}:rate=16:random_mode=seed:random_seed={rng.integers(2**31)}"
         f":octaves={rng.integers(1, 6)}:persistence={rng.uniform(0.3, 0.7):.3f}"
         f":xscale={scale:.4f}:yscale={scale * rng.uniform(0.7, 1.4):.4f}"
         f":tscale={rng.uniform(0.3, 2.0):.3f}")
    # perlin's values cluster around mid-gray: stretch them before colouring
    lut = _palette(rng, 3)[np.clip((np.arange(256) - 128) * 2.5 + 128, 0, 255).astype(int)]
    return g, int(rng.integers(0, 100)), lut


def _g_zoneplate(rng, T, H, W):
    k = rng.uniform(20, 200, 2) * 64 / min(H, W)  # keep ring density similar at any size
    g = (f"zoneplate=size={W}x{H}:rate=16:kx2={k[0]:.0f}:ky2={k[1]:.0f}"
         f":kt={rng.integers(-8, 9)}:kt2={rng.integers(0, 4)}"
         f":xo={rng.integers(-W // 2, W // 2)}:yo={rng.integers(-H // 2, H // 2)}"
         f":ku={rng.integers(0, 60)}:kv={rng.integers(0, 60)}")
    return g, int(rng.integers(0, 100)), None


_LAVFI = {
    "testsrc2": _g_testsrc("testsrc2"),
    "testsrc": _g_testsrc("testsrc"),
    "testcard": _g_testcard,
    "mandelbrot": _g_mandelbrot,
    "life": _g_life,
    "cellauto": _g_cellauto,
    "sierpinski": _g_sierpinski,
    "gradients": _g_gradients,
    "perlin": _g_perlin,
    "zoneplate": _g_zoneplate,
}


def lavfi_graph(kind: str, seed: int, frames: int, height: int, width: int) -> str:
    """The exact lavfi filtergraph a ``lavfi_<kind>`` clip decodes (for debugging)."""
    graph, skip, _ = _LAVFI[kind](_rng("lavfi_" + kind, seed), frames, height, width)
    return f"{graph},trim=start_frame={skip}:end_frame={skip + frames}"


def lavfi_clip(kind: str, seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """FFmpeg test sources: exact, hard synthetic content (aliasing, chaos, text, bars).

    The ``trim`` filter both skips a seed-chosen number of start frames and ends
    the stream (sources like ``mandelbrot`` have no ``duration`` option).
    """
    _check_size(frames, height, width)
    split_of_seed(seed)
    _, _, lut = _LAVFI[kind](_rng("lavfi_" + kind, seed), frames, height, width)
    out = []
    with av.open(lavfi_graph(kind, seed, frames, height, width), format="lavfi") as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24"))
            if len(out) == frames:
                break
    clip = np.stack(out)
    if clip.shape != (frames, height, width, 3):
        raise RuntimeError(f"lavfi_{kind} gave {clip.shape}, wanted {(frames, height, width, 3)}")
    if lut is not None:  # gray/mono source: colour it through a seeded palette
        clip = _to_uint8(lut[clip[..., 0]])
    return clip


# --------------------------------------------------------------------------
# Family 2: a virtual camera over scikit-image photos
# --------------------------------------------------------------------------


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as float32 RGB in [0, 1] (gray -> 3 channels)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3].astype(np.float32) / 255.0
    img.setflags(write=False)
    return img


def _camera_path(motion: str, rng: np.random.Generator, T: int, H: int, W: int, h0: int, w0: int):
    """Per-frame camera (cx, cy, scale, angle) in photo pixels, always inside the photo.

    ``scale`` is photo pixels per output pixel, so a shrinking scale zooms in.
    """
    u = _progress(T, rng.uniform(0, 1))
    # rotation: only "rotate" tilts, a few tenths of a degree per frame (<= 8 deg total)
    if motion == "rotate":
        total = min(rng.uniform(0.1, 0.3) * (T - 1), 8.0) * rng.choice([-1, 1])
        angle = np.deg2rad(rng.uniform(-3, 3) + total * u)
    else:
        angle = np.zeros(T)
    # zoom: per-frame rate, total factor capped at 2.5
    if motion in ("zoom", "panzoom"):
        z = min((1 + rng.uniform(0.003, 0.012)) ** (T - 1), 2.5)
        rel = z ** -u if rng.uniform() < 0.5 else z ** (u - 1)  # zoom in / zoom out
    else:
        rel = np.ones(T)
    # widest view: a random share of the largest view that fits at the worst tilt
    c, s = math.cos(np.abs(angle).max()), math.sin(np.abs(angle).max())
    s_fit = min(w0 / (W * c + H * s), h0 / (W * s + H * c))
    s_max = s_fit * rng.uniform(0.35, 0.8)
    scale = s_max * rel / rel.max()
    # keep the widest, most tilted view's box inside the photo
    ex, ey = s_max * (W * c + H * s) / 2, s_max * (W * s + H * c) / 2
    lo, hi = np.array([ex, ey]), np.array([w0 - ex, h0 - ey])
    # pan: speed in output pixels per frame, converted to photo pixels
    speed = {"pan": (0.002, 0.012), "panzoom": (0.002, 0.01),
             "rotate": (0.0, 0.004), "zoom": (0.0, 0.002)}[motion]
    dist = rng.uniform(*speed) * min(H, W) * scale.mean() * (T - 1)
    phi = rng.uniform(0, 2 * math.pi)
    d = np.array([math.cos(phi), math.sin(phi)])
    room = np.where(d > 0, (hi - lo) / np.maximum(d, 1e-9), (hi - lo) / np.maximum(-d, 1e-9))
    vec = d * min(dist, room.min())
    start = rng.uniform(lo - np.minimum(vec, 0), hi - np.maximum(vec, 0))
    bend = rng.uniform(-0.15, 0.15) * np.array([-vec[1], vec[0]])  # gentle curve
    centre = start + u[:, None] * vec + np.sin(np.pi * u)[:, None] * bend
    centre = np.clip(centre, lo, hi)
    return centre[:, 0], centre[:, 1], scale, angle


def _render_camera(img: np.ndarray, cx, cy, scale, angle, H: int, W: int) -> np.ndarray:
    """Render camera frames with bilinear sampling, as float32 [T, H, W, 3].

    The photo is first downscaled with anti-aliasing so that the widest view
    samples it at <= 1 photo pixel per output pixel: bilinear then only ever
    magnifies, which gives smooth sub-pixel motion without aliasing.
    """
    import skimage.transform

    cx, cy, scale = np.asarray(cx, float), np.asarray(cy, float), np.asarray(scale, float)
    if scale.max() > 1.0:
        h0, w0 = img.shape[:2]
        img = skimage.transform.rescale(img, 1.0 / scale.max(), anti_aliasing=True,
                                        channel_axis=-1, order=1).astype(np.float32)
        kx, ky = img.shape[1] / w0, img.shape[0] / h0
        cx, cy, scale = cx * kx, cy * ky, scale * math.sqrt(kx * ky)
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    u, v = u + 0.5 - W / 2, v + 0.5 - H / 2
    out = np.empty((len(cx), H, W, 3), np.float32)
    for t in range(len(cx)):
        ca, sa = math.cos(angle[t]) * scale[t], math.sin(angle[t]) * scale[t]
        x = cx[t] + ca * u - sa * v - 0.5  # continuous coords -> pixel-centre index
        y = cy[t] + sa * u + ca * v - 0.5
        out[t] = _bilinear(img, x, y)
    return out


def photo_clip(motion: str, seed: int, frames: int, height: int, width: int,
               photo: str | None = None) -> np.ndarray:
    """Camera motion over a real photo: natural textures with smooth, known motion.

    ``motion`` is one of pan, zoom (in or out), panzoom, rotate (slight tilt
    + drift). The photo comes from the pool of the seed's split.
    """
    _check_size(frames, height, width)
    rng = _rng("photo_" + motion, seed)
    pool = HELDOUT_PHOTOS if split_of_seed(seed) == "heldout" else TRAIN_PHOTOS
    name = pool[rng.integers(len(pool))]  # always drawn, so ``photo=`` keeps the same path
    name = photo if photo is not None else name
    img = load_photo(name)
    path = _camera_path(motion, rng, frames, height, width, *img.shape[:2])
    return _to_uint8(_render_camera(img, *path, height, width))


def photo_of(source: str, seed: int) -> str | None:
    """Which photo a ``photo_*`` clip uses (None for other sources)."""
    if not source.startswith("photo_"):
        return None
    pool = HELDOUT_PHOTOS if split_of_seed(seed) == "heldout" else TRAIN_PHOTOS
    return pool[_rng(source, seed).integers(len(pool))]


# --------------------------------------------------------------------------
# Family 3: synthetic scenes
# --------------------------------------------------------------------------


def _fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into [lo, hi]: a continuous 'bounce off the walls'."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y < span, y, 2 * span - y)


class _Shape:
    """A moving, rotating, anti-aliased shape; draws itself over a frame."""

    def __init__(self, rng: np.random.Generator, T: int, H: int, W: int):
        m = min(H, W)
        self.kind = str(rng.choice(["circle", "rect", "stripes", "ring"]))
        self.size = rng.uniform(0.08, 0.25) * m
        self.aspect = rng.uniform(0.4, 1.0)
        self.color = _random_color(rng)
        self.color2 = _random_color(rng)
        self.period = rng.uniform(0.2, 0.5) * self.size
        self.alpha = 1.0 if rng.uniform() < 0.75 else rng.uniform(0.5, 0.85)
        t = np.arange(T, dtype=np.float64)
        speed = rng.uniform(0.004, 0.025) * m
        phi = rng.uniform(0, 2 * math.pi)
        wobble = rng.uniform(0.0, 0.15) * m
        freq, phase = rng.uniform(0.03, 0.2, 2), rng.uniform(0, 2 * math.pi, 2)
        # constant drift + sinusoidal wobble = velocity that keeps changing
        x = rng.uniform(0, W) + speed * math.cos(phi) * t + wobble * np.sin(freq[0] * t + phase[0])
        y = rng.uniform(0, H) + speed * math.sin(phi) * t + wobble * np.sin(freq[1] * t + phase[1])
        pad = 0.5 * self.size
        self.x, self.y = _fold(x, -pad, W + pad), _fold(y, -pad, H + pad)
        self.angle = rng.uniform(0, 2 * math.pi) + np.deg2rad(rng.uniform(-3, 3)) * t

    def draw(self, frame: np.ndarray, t: int, yy: np.ndarray, xx: np.ndarray) -> None:
        dx, dy = xx - self.x[t], yy - self.y[t]
        ca, sa = math.cos(self.angle[t]), math.sin(self.angle[t])
        qx, qy = ca * dx + sa * dy, -sa * dx + ca * dy  # shape-local coordinates
        r = self.size
        if self.kind in ("circle", "ring"):
            sdf = np.hypot(qx, qy / self.aspect) - r
            if self.kind == "ring":
                sdf = np.abs(sdf + 0.2 * r) - 0.2 * r
        else:  # rectangle signed distance
            ex, ey = np.abs(qx) - r, np.abs(qy) - r * self.aspect
            sdf = np.hypot(np.maximum(ex, 0), np.maximum(ey, 0)) + np.minimum(np.maximum(ex, ey), 0)
        a = np.clip(0.5 - sdf, 0.0, 1.0) * self.alpha  # 1-pixel anti-aliased edge
        color = self.color
        if self.kind == "stripes":  # anti-aliased stripes in the shape's frame
            edge = (np.abs(np.mod(qx / self.period, 1.0) - 0.5) - 0.25) * self.period
            m = np.clip(0.5 - edge, 0.0, 1.0)[..., None]
            color = self.color * m + self.color2 * (1 - m)
        frame *= 1 - a[..., None]
        frame += a[..., None] * color


def _background(rng: np.random.Generator, T: int, H: int, W: int) -> Callable[[int], np.ndarray]:
    """A slowly drifting background: colour gradient or smooth coloured noise texture."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    if rng.uniform() < 0.4:
        c0, c1 = _random_color(rng, False), _random_color(rng, True)
        phi0, dphi = rng.uniform(0, 2 * math.pi), rng.uniform(-0.02, 0.02)

        def gradient(t: int) -> np.ndarray:
            p = phi0 + dphi * t
            g = ((xx - W / 2) * math.cos(p) + (yy - H / 2) * math.sin(p)) / max(H, W) + 0.5
            g = np.clip(g, 0, 1)[..., None].astype(np.float32)
            return c0 * (1 - g) + c1 * g

        return gradient
    # value noise: two octaves of a random grid, bicubically upsampled, coloured
    import skimage.transform

    moving = rng.uniform() < 0.7  # most textures drift slowly, some stay put
    drift = rng.uniform(-0.004, 0.004, 2) * min(H, W) * moving
    th, tw = H + int(abs(drift[1]) * T) + 4, W + int(abs(drift[0]) * T) + 4
    tex = np.zeros((th, tw), np.float64)
    for cell, weight in ((rng.uniform(6, 20) * min(H, W) / 64, 1.0), (rng.uniform(2, 5), 0.35)):
        grid = rng.uniform(size=(int(th / cell) + 2, int(tw / cell) + 2))
        tex += weight * skimage.transform.resize(grid, (th, tw), order=3, mode="reflect")
    tex = (tex - tex.min()) / max(np.ptp(tex), 1e-6)
    tex = _palette(rng, 3)[np.clip(tex * 255, 0, 255).astype(np.int64)]
    x0 = 2.0 + (0 if drift[0] >= 0 else abs(drift[0]) * T)
    y0 = 2.0 + (0 if drift[1] >= 0 else abs(drift[1]) * T)

    def texture(t: int) -> np.ndarray:
        return _bilinear(tex, xx + x0 + drift[0] * t, yy + y0 + drift[1] * t)

    return texture


def _glyph_alphabet(rng: np.random.Generator, n: int = 32) -> np.ndarray:
    """Random 5x7 'letters' built from strokes, so text looks like text, not noise."""
    strokes = [np.s_[0, :], np.s_[3, :], np.s_[6, :], np.s_[:4, 0], np.s_[3:, 0],
               np.s_[:4, 4], np.s_[3:, 4], np.s_[:, 2], np.s_[1:3, 1:4]]
    glyphs = np.zeros((n, 7, 5), np.float32)
    for g in glyphs:
        for k in rng.choice(len(strokes), size=rng.integers(2, 5), replace=False):
            g[strokes[k]] = 1.0
    return glyphs


def _text_layer(rng: np.random.Generator, T: int, H: int, W: int, bg_luma: float):
    """Lines of glyphs scrolling like a ticker or credits, with an optional box behind.

    Text is light on dark backgrounds and dark on light ones, so it stays legible.
    """
    px = max(1, int(round(rng.uniform(0.015, 0.03) * min(H, W))))  # pixels per glyph dot
    glyphs = _glyph_alphabet(rng)
    n_lines = int(rng.integers(1, 4))
    line_len = int(2 * W / (6 * px)) + 4
    rows = []
    for _ in range(n_lines):
        idx = rng.integers(0, len(glyphs) + 6, size=line_len)  # indices past the end = space
        cells = [np.pad(glyphs[i] if i < len(glyphs) else np.zeros((7, 5)), ((1, 2), (0, 1)))
                 for i in idx]
        rows.append(np.concatenate(cells, axis=1))
    mask = np.kron(np.concatenate(rows, axis=0), np.ones((px, px), np.float32))[..., None]
    mh, mw = mask.shape[:2]
    vertical = rng.uniform() < 0.3
    speed = rng.uniform(0.003, 0.012) * min(H, W) * rng.choice([-1, 1])
    top = rng.uniform(0, max(H - mh, 0))
    left = rng.uniform(0, max(W - mw, 0))
    light, dark = 1 - 0.25 * (1 - _random_color(rng)), 0.3 * _random_color(rng, False)
    color, box = (light, dark) if bg_luma < 0.5 else (dark, light)
    box_alpha = rng.uniform(0.5, 0.9) if rng.uniform() < 0.5 else 0.0
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)

    def draw(frame: np.ndarray, t: int) -> None:
        if vertical:  # credits: wrap vertically, fixed horizontal place
            x, y = xx - left, np.mod(yy - top - speed * t, mh + H) - 0.5
        else:  # ticker: wrap horizontally along the line
            x, y = np.mod(xx - speed * t, mw) - 0.5, yy - top - 0.5
        inside = (y > -1) & (y < mh) & (x > -1) & (x < mw)
        a = _bilinear(mask, x, y)[..., 0] * inside
        b = box_alpha * np.clip(1 - np.maximum(-y, y - mh + 1), 0, 1) * (x > -1) * (x < mw)
        frame *= 1 - b[..., None]
        frame += b[..., None] * box
        frame *= 1 - a[..., None]
        frame += a[..., None] * color

    return draw


def synth_clip(kind: str, seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """Procedural scenes with exactly known motion: occlusion, rotation, fine text.

    ``kind`` is ``shapes`` (2-7 shapes) or ``text`` (scrolling glyph lines
    with 1-3 shapes that may pass in front). Both may flicker globally.
    """
    _check_size(frames, height, width)
    split_of_seed(seed)
    rng = _rng("synth_" + kind, seed)
    T, H, W = frames, height, width
    bg = _background(rng, T, H, W)
    n = int(rng.integers(2, 8)) if kind == "shapes" else int(rng.integers(1, 4))
    shapes = [_Shape(rng, T, H, W) for _ in range(n)]
    text = _text_layer(rng, T, H, W, float(bg(0).mean())) if kind == "text" else None
    text_depth = int(rng.integers(0, n + 1))  # shapes before this index go behind the text
    flicker = np.ones(T)
    if rng.uniform() < 0.3:
        amp, freq, ph = rng.uniform(0.03, 0.1), rng.uniform(0.02, 0.15), rng.uniform(0, 2 * math.pi)
        flicker += amp * np.sin(2 * math.pi * freq * np.arange(T) + ph)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    out = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        frame = np.array(bg(t), np.float32)
        for i, shape in enumerate(shapes):
            if text is not None and i == text_depth:
                text(frame, t)
            shape.draw(frame, t, yy, xx)
        if text is not None and text_depth == n:
            text(frame, t)
        out[t] = _to_uint8(frame * flicker[t])
    return out


# --------------------------------------------------------------------------
# Registry, sampling, datasets
# --------------------------------------------------------------------------

SOURCES: dict[str, Callable[[int, int, int, int], np.ndarray]] = {
    **{f"lavfi_{k}": functools.partial(lavfi_clip, k) for k in _LAVFI},
    **{f"photo_{m}": functools.partial(photo_clip, m) for m in ("pan", "zoom", "panzoom", "rotate")},
    **{f"synth_{k}": functools.partial(synth_clip, k) for k in ("shapes", "text")},
}

# sample_clip draws a family first, then a source uniformly within it
FAMILY_WEIGHTS = {"lavfi": 0.3, "photo": 0.45, "synth": 0.25}

# sources whose motion is smooth (sub-pixel, continuous); the rest may jump
SMOOTH_SOURCES = tuple(s for s in SOURCES if s.startswith(("photo_", "synth_"))) + ("lavfi_gradients",)


def make_clip(source: str, seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """Generate clip ``source`` for ``seed``: uint8 [frames, height, width, 3]."""
    if source not in SOURCES:
        raise KeyError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    return SOURCES[source](seed, frames, height, width)


def sample_spec(seed: int, split: str = "train") -> tuple[str, int]:
    """Map a per-split seed to (source name, global clip seed), deterministically."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    seeds = _SPLIT_SEEDS[split]
    if not 0 <= seed < len(seeds):
        raise ValueError(f"seed must be in [0, {len(seeds)}), got {seed}")
    clip_seed = seeds.start + seed
    rng = _rng("sample", clip_seed)
    families = list(FAMILY_WEIGHTS)
    fam = families[rng.choice(len(families), p=list(FAMILY_WEIGHTS.values()))]
    names = [s for s in SOURCES if s.startswith(fam + "_")]
    return names[rng.integers(len(names))], clip_seed


def sample_clip(seed: int, frames: int, height: int, width: int,
                split: str = "train") -> tuple[str, np.ndarray]:
    """Pick a source from the seed and generate it within ``split``'s seed range."""
    name, clip_seed = sample_spec(seed, split)
    return name, make_clip(name, clip_seed, frames, height, width)


def write_mp4(path: str | Path, clip: np.ndarray, fps: int = DEFAULT_FPS, crf: int = 18) -> None:
    """Encode a uint8 [T, H, W, 3] clip as H.264 (libx264, yuv420p) mp4."""
    T, H, W, _ = clip.shape
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": str(crf), "preset": "medium"}
        for f in clip:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_dataset(out_dir: str | Path, n_clips: int, frames: int, height: int, width: int,
                  split: str = "train", seed: int = 0, fps: int = DEFAULT_FPS) -> dict:
    """Write ``n_clips`` mp4s ``<split>_<index>_<source>.mp4`` plus ``manifest.json``.

    Clip ``i`` is ``sample_clip(seed + i, ..., split)`` and its file name
    carries ``seed + i``, so a dataset can be extended later with ``seed=``
    previous seed + previous ``n_clips`` without name clashes. Each manifest
    entry records the global ``clip_seed`` so ``make_clip(source, clip_seed,
    frames, height, width)`` regenerates the exact frames (before encoding).
    """
    _check_size(frames, height, width)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n_clips):
        name, clip_seed = sample_spec(seed + i, split)
        clip = make_clip(name, clip_seed, frames, height, width)
        file = f"{split}_{seed + i:05d}_{name}.mp4"
        write_mp4(out_dir / file, clip, fps=fps)
        clips.append({"file": file, "index": i, "source": name, "split": split,
                      "seed": seed + i, "clip_seed": clip_seed, "photo": photo_of(name, clip_seed)})
    manifest = {
        "generator": "tools/world/clip_world.py", "split": split, "n_clips": n_clips,
        "frames": frames, "height": height, "width": width, "fps": fps,
        "codec": "libx264", "pix_fmt": "yuv420p", "crf": 18, "first_seed": seed,
        "clips": clips,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --------------------------------------------------------------------------
# Demo clip
# --------------------------------------------------------------------------


def make_demo_clip() -> np.ndarray:
    """An 80-frame 256x256 held-out clip for the package's bundled demo video.

    A slow eased pan+zoom from the full ``astronaut`` photo towards her face,
    with a translucent striped card and a ring drifting across. Uses only
    held-out material (``astronaut`` is in HELDOUT_PHOTOS and the shapes come
    from a held-out seed), so showing it never leaks training data.
    """
    T, H, W = 80, 256, 256
    img = load_photo("astronaut")
    u = _progress(T, 1.0)
    cx, cy = 256 + u * (225 - 256), 256 + u * (165 - 256)
    scale = 1.9 * (1.0 / 1.9) ** u  # 1.9 -> 1.0 photo px per output px: zoom in
    frames = _render_camera(img, cx, cy, scale, np.zeros(T), H, W)
    rng = _rng("demo", HELDOUT_SEEDS.start + 2024)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    card, ring = _Shape(rng, T, H, W), _Shape(rng, T, H, W)
    card.kind, card.size, card.aspect, card.alpha = "stripes", 34.0, 0.6, 0.8
    card.x, card.y = np.linspace(-30, W + 30, T), 200 + 12 * np.sin(np.linspace(0, 3, T))
    card.angle = np.linspace(0, 1.2, T)
    ring.kind, ring.size, ring.aspect, ring.alpha = "ring", 22.0, 1.0, 1.0
    ring.x, ring.y = 200 - np.linspace(0, 150, T), np.linspace(40, 90, T)
    for t in range(T):
        card.draw(frames[t], t, yy, xx)
        ring.draw(frames[t], t, yy, xx)
    return _to_uint8(frames)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 128x128 (HxW), got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Deterministic synthetic video clips (lavfi sources, camera motion over "
                    "scikit-image photos, synthetic scenes) for training/evaluating autoencoders.")
    p.add_argument("--out", help="output directory for <split>_<index>_<source>.mp4 + manifest.json")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--clips", type=int, default=64, help="number of clips (default 64)")
    p.add_argument("--frames", type=int, default=40, help="frames per clip (default 40)")
    p.add_argument("--size", type=_parse_size, default=(128, 128), help="HxW, even, >= 16 (default 128x128)")
    p.add_argument("--seed", type=int, default=0, help="first per-split seed; clip i uses seed+i")
    p.add_argument("--fps", type=int, default=DEFAULT_FPS)
    p.add_argument("--list", action="store_true", help="print the source names and exit")
    p.add_argument("--demo", metavar="OUT.mp4", help="write the 80-frame 256x256 held-out demo clip")
    a = p.parse_args(argv)
    if a.list:
        for name in SOURCES:
            print(name)
        return 0
    if a.demo:
        write_mp4(a.demo, make_demo_clip(), fps=a.fps)
        print(a.demo)
        return 0
    if not a.out:
        p.error("--out is required (or use --list / --demo)")
    h, w = a.size
    m = write_dataset(a.out, a.clips, a.frames, h, w, split=a.split, seed=a.seed, fps=a.fps)
    print(f"wrote {len(m['clips'])} clips to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
