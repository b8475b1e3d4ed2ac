#!/usr/bin/env python
"""Do the embedded demo models (t2v-tiny, i2v-tiny) follow their prompts? A numeric check, no human needed.

For every scene the captioned world can describe (8 colours x 3 shapes x 4 directions x 3
backgrounds = 288 prompts, or a seeded sample), generate a video with `dcvg-wan`'s pipeline and
measure, on the decoded frames:

* background: the colour of the frame border is closest to the captioned background;
* colour: the pixels that differ most from the background are closest to the captioned colour;
* direction: the centroid of those pixels moves (first 4 vs last 4 frames) mostly along the
  captioned direction.

`--wording paraphrase` asks in other words (seeded: synonyms, other word orders, "from the left"),
read through the CLI's demo-prompt reader (dcvg_wan.demo_prompt) unless `--raw` passes them as typed.

`--task i2v` runs i2v-tiny: the image is the first frame of a held-out scene of the prompt's
colour, shape and background (a single frame: it shows no motion), so the direction comes from the
text alone; it also reports how close the first generated frame is to the image (PSNR).

Chance levels: background 1/3, colour 1/8, direction 1/4. The same measures on real scenes
(rendered by the captioned world) passed through the DC-AE-V give the ceiling the generator can
reach with this autoencoder. Prints a table and writes JSON.

    python tools/eval_wan_default.py --prompts 96 --json runs/wan_default/eval.json
    python tools/eval_wan_default.py --task i2v --prompts 96 --json runs/wan_default/eval_i2v.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "world"))
import captioned


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(err, 1e-10)))


def nearest(color: np.ndarray, table: dict[str, tuple[float, float, float]]) -> str:
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k]) - color) ** 2)))


def measure(frames: np.ndarray) -> dict[str, str]:
    """frames uint8 [T, H, W, 3] -> the background, colour and direction they show."""
    x = frames.astype(np.float64) / 255
    border = np.concatenate([x[:, :4].reshape(-1, 3), x[:, -4:].reshape(-1, 3), x[:, :, :4].reshape(-1, 3),
                             x[:, :, -4:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg, axis=-1)  # [T, H, W]
    mask = dist > max(0.15, 0.5 * np.quantile(dist, 0.999))  # the pixels that stand out from the background
    color = x[mask].mean(axis=0) if mask.any() else bg
    ys, xs = np.mgrid[0 : x.shape[1], 0 : x.shape[2]]

    def centroid(sl):
        m = mask[sl].sum(axis=0).astype(np.float64)
        return (np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum()) if m.sum() else np.zeros(2)

    k = max(1, x.shape[0] // 4)
    dx, dy = centroid(slice(-k, None)) - centroid(slice(0, k))
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return {"background": nearest(bg, captioned.BACKGROUNDS), "color": nearest(color, captioned.COLORS),
            "direction": direction}


SHAPE_WORDS = {"circle": ("circle", "ball", "disc", "dot"), "square": ("square", "box", "block", "cube"),
               "triangle": ("triangle", "pyramid")}
MOVE_WORDS = ("moves", "drifts", "slides", "travels", "is moving", "glides", "goes")
DIRECTION_PHRASES = {"left": ("left", "to the left", "leftwards", "from the right"),
                     "right": ("right", "to the right", "rightward", "from the left"),
                     "up": ("up", "upward", "towards the top", "from the bottom"),
                     "down": ("down", "downwards", "towards the bottom", "from the top")}
BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey"), "navy": ("navy",)}


def paraphrase(color: str, shape: str, motion: str, background: str, rng: random.Random) -> str:
    """The scene said in other words than the captions', in one of four sentence shapes."""
    thing = f"{rng.choice(('a', 'the', 'one'))} {color} {rng.choice(SHAPE_WORDS[shape])}"
    move = f"{rng.choice(MOVE_WORDS)} {rng.choice(DIRECTION_PHRASES[motion])}"
    bg = f"{rng.choice(BACKGROUND_WORDS[background])} {rng.choice(('background', 'backdrop'))}"
    return rng.choice((f"{thing} {move} on a {bg}", f"On a {bg}, {thing} {move}.",
                       f"{thing.capitalize()} that {move} over a plain {bg}", f"{bg}: {thing} {move}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=96, help="how many of the 288 scenes (seeded sample); 0 = all")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--wording", choices=("caption", "paraphrase"), default="caption",
                   help="ask with the training captions or in other words")
    p.add_argument("--raw", action="store_true", help="paraphrases as typed, not read by the demo-prompt reader")
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v", help="i2v: i2v-tiny from held-out first frames")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dcae_v import DCAEV
    from dcae_v.io import to_model_range, to_uint8
    from dcvg_wan.demo_prompt import demo_prompt
    from dcvg_wan.generate import EMBEDDED_I2V, embedded_default
    from dcvg_wan.latent_spaces import DCAEVSpace
    from dcvg_wan.model import WanModel
    from dcvg_wan.pipelines import I2VPipeline, T2VPipeline
    from dcvg_wan.text_encoder import TextEncoder

    i2v = args.task == "i2v"
    name = EMBEDDED_I2V if i2v else "t2v-tiny"
    if i2v:  # as `dcvg-wan generate --image` loads it
        paths, defaults = embedded_default(EMBEDDED_I2V)
        pipe = I2VPipeline.from_pretrained(None, paths=paths, ae="dcae-v", dtype=torch.float32,
                                           default_negative_prompt=defaults["negative_prompt"])
    else:
        paths, defaults = embedded_default()
        dit = WanModel.from_pretrained(paths.dit, dtype=torch.float32)
        text = TextEncoder.from_pretrained(paths.text_encoder, tokenizer_dir=paths.tokenizer,
                                           text_len=dit.config.text_len)
        pipe = T2VPipeline(dit, DCAEVSpace(DCAEV.from_pretrained(paths.dcae).float().eval(), dit.config.patch), text,
                           default_negative_prompt=defaults["negative_prompt"])
    width, height = (int(v) for v in defaults["size"].split("*"))
    scenes = list(itertools.product(captioned.COLORS, captioned.SHAPES, captioned.MOTIONS, captioned.BACKGROUNDS))
    if args.prompts:
        scenes = random.Random(args.seed).sample(scenes, min(args.prompts, len(scenes)))
    hits = {"background": 0, "color": 0, "direction": 0, "all": 0}
    ceiling = dict.fromkeys(hits, 0)
    ae = pipe.space.model
    rows, psnrs, start = [], [], time.time()
    for i, (color, shape, motion, background) in enumerate(scenes):
        prompt = typed = captioned.caption(color, shape, motion, background)
        if args.wording == "paraphrase":
            typed = paraphrase(color, shape, motion, background, random.Random(args.seed * 100_003 + i))
            prompt = typed if args.raw else demo_prompt(typed, paths.tokenizer).text
        real = captioned.render(color, shape, motion, background, frames=defaults["frame_num"], height=height,
                                width=width, seed=captioned.HELDOUT_OFFSET + args.seed + i)
        sampling = {"size": defaults["size"], "frame_num": defaults["frame_num"], "steps": args.steps or defaults["steps"],
                    "shift": defaults["shift"], "guide_scale": defaults["guide_scale"], "seed": args.seed + i,
                    "log": lambda _m: None}
        image = to_model_range(real[:1])[:, :, 0] if i2v else None
        out = pipe(prompt, image, **sampling) if i2v else pipe(prompt, **sampling)
        video = to_uint8(out.video[None]).numpy()
        got = measure(video)
        want = {"background": background, "color": color, "direction": motion}
        ok = {k: got[k] == want[k] for k in want}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
        with torch.no_grad():
            recon = ae.reconstruct(to_model_range(real))
        real_got = measure(to_uint8(recon).numpy())
        if i2v:  # the first frame vs the image, and the autoencoder's own first frame vs the image
            psnrs.append((psnr(video[0], real[0]), psnr(to_uint8(recon).numpy()[0], real[0])))
        real_ok = {k: real_got[k] == want[k] for k in want}
        for k, v in real_ok.items():
            ceiling[k] += v
        ceiling["all"] += all(real_ok.values())
        rows.append({"typed": typed, "prompt": prompt, "measured": got, "ok": ok, "real_through_ae": real_got})
    n = len(scenes)
    acc = {k: v / n for k, v in hits.items()}
    ceil = {k: v / n for k, v in ceiling.items()}
    chance = {"background": 1 / 3, "color": 1 / 8, "direction": 1 / 4, "all": 1 / 96}
    wording = args.wording + (" (raw)" if args.raw and args.wording == "paraphrase" else "")
    print(f"{name} prompt following, {n} prompts ({wording}), {time.time() - start:.0f} s")
    print(f"| attribute | {name} | real scenes through DC-AE-V | chance |\n|---|---|---|---|")
    for k in ("background", "color", "direction", "all"):
        print(f"| {k} | {acc[k]:.2f} | {ceil[k]:.2f} | {chance[k]:.2f} |")
    first = {}
    if i2v:
        first = {"first_frame_psnr_db": float(np.mean([p[0] for p in psnrs])),
                 "first_frame_psnr_db_real_through_ae": float(np.mean([p[1] for p in psnrs]))}
        print(f"first generated frame vs the image: mean PSNR {first['first_frame_psnr_db']:.2f} dB (the real scene's "
              f"first frame through DC-AE-V: {first['first_frame_psnr_db_real_through_ae']:.2f} dB)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"accuracy": acc, "ceiling": ceil, "chance": chance, "n": n, **first,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
