"""Train the small DC-AE-V that ships inside the dcae-v package (the offline default).

Data: the project's clip world (tools/world/clip_world.py, train split only), generated on
the fly into a pool that is partly refreshed as training goes. Loss: L1 + MSE on pixels, with
still images mixed in as 4-frame still clips (as the paper trains on images and videos).
This is the simple reconstruction trainer; the full GAN/LPIPS trainer is `dcae_v.train`.

    python tools/train_default.py --minutes 75            # writes the shipped checkpoint
    python tools/train_default.py --steps 20 --out /tmp/x  # smoke run

Checkpoints with the optimizer go to --workdir every --save-every steps (atomically), and
--resume continues from the latest one.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcae_v import DCAEV
from dcae_v.checkpoint import _atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "packages/dcae-v/src/dcae_v/assets/dcae-v-tiny-default"


def load_clip_world():
    spec = importlib.util.spec_from_file_location("clip_world", ROOT / "tools/world/clip_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ClipPool:
    """Clips held in memory; random crops, flips and time reversal; part refreshed regularly."""

    def __init__(self, world, size: int, frames: int, height: int, width: int, seed: int):
        self.world, self.frames, self.height, self.width = world, frames, height, width
        self.next_seed = seed
        self.clips = [self._new() for _ in range(size)]
        self.rng = np.random.default_rng(seed)

    def _new(self) -> np.ndarray:
        _, clip = self.world.sample_clip(self.next_seed, self.frames, self.height, self.width, split="train")
        self.next_seed += 1
        return clip

    def refresh(self, count: int) -> None:
        for _ in range(count):
            self.clips[int(self.rng.integers(len(self.clips)))] = self._new()

    def batch(self, n: int, t: int, crop: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            clip = self.clips[int(self.rng.integers(len(self.clips)))]
            t0 = int(self.rng.integers(clip.shape[0] - t + 1))
            y0 = int(self.rng.integers(clip.shape[1] - crop + 1))
            x0 = int(self.rng.integers(clip.shape[2] - crop + 1))
            piece = clip[t0 : t0 + t, y0 : y0 + crop, x0 : x0 + crop]
            if self.rng.random() < 0.5:
                piece = piece[:, :, ::-1]
            if self.rng.random() < 0.25:
                piece = piece[::-1]
            out.append(torch.from_numpy(np.ascontiguousarray(piece)))
        x = torch.stack(out).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        return x


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-f32t4c64")
    ap.add_argument("--chunk-size", type=int, default=8, help="frames per chunk (trained and shipped)")
    ap.add_argument("--frames", type=int, default=16, help="frames per training clip (2 chunks)")
    ap.add_argument("--size", type=int, default=128, help="training crop size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--image-every", type=int, default=8, help="every n-th step is a batch of still images")
    ap.add_argument("--steps", type=int, default=100_000, help="upper bound; --minutes usually stops first")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--pool", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=str(ROOT / "runs/train_default"))
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    print(vars(args), flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = DCAEV.from_preset(args.preset, chunk_size=args.chunk_size).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    workdir = Path(args.workdir)
    state_path = workdir / "state.pt"
    step, elapsed_before = 0, 0.0
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        step, elapsed_before = state["step"], state["elapsed"]
        print(f"resumed at step {step}", flush=True)

    world = load_clip_world()
    pool = ClipPool(world, args.pool, frames=24, height=args.size + 32, width=args.size + 32, seed=args.seed * 100_000 + step)
    total = args.steps  # with --minutes, re-estimated from the measured step rate
    start, log = time.time(), []
    while step < args.steps:
        elapsed = elapsed_before + time.time() - start
        if args.minutes is not None and elapsed > args.minutes * 60:
            break
        if args.minutes is not None and step >= 50:
            total = min(args.steps, max(step + 1, int(step * args.minutes * 60 / elapsed)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        if args.image_every and step % args.image_every == args.image_every - 1:
            x = pool.batch(args.batch * 4, 1, args.size).expand(-1, -1, 4, -1, -1)
        else:
            x = pool.batch(args.batch, args.frames, args.size)
        y = model.decoder(model.encoder(x))
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        log.append(F.mse_loss(y.detach(), x).item())
        if step % 50 == 0:
            psnr = 10 * math.log10(4 / (sum(log) / len(log)))
            print(f"step {step} loss {loss.item():.4f} psnr~{psnr:.2f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{elapsed / 60:.1f} min", flush=True)
            log.clear()
        if step % 100 == 0:
            pool.refresh(max(1, args.pool // 16))
        if step % args.save_every == 0:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": step, "elapsed": elapsed_before + time.time() - start}
            _atomic(state_path, lambda tmp, state=state: torch.save(state, tmp))

    # scaling factor ~ 1 / RMS(latent), as NVIDIA's factors are
    with torch.no_grad():
        z = torch.cat([ema.encoder(pool.batch(args.batch, args.frames, args.size)) for _ in range(8)])
        scale = float(1 / z.square().mean().sqrt())
    final = DCAEV(ema.config.replace(scaling_factor=float(f"{scale:.4g}")))  # 4 significant digits
    final.load_state_dict(ema.state_dict())
    final.save_pretrained(args.out, dtype=torch.float16)
    print(f"saved {args.out} after {step} steps ({(elapsed_before + time.time() - start) / 60:.1f} min); "
          f"scaling_factor {scale:.4f}", flush=True)


if __name__ == "__main__":
    main()
