"""How far spatial tiling (blended overlap) is from one shot, and what it costs at 2160x3840.

    python tools/bench/tiling_error.py                      # shipped default, CPU
    python tools/bench/tiling_error.py --checkpoint dc-ae-v-f32t4c32-1.0-bf16.pt --device cuda

For each (frame size, tile size): encode + decode a held-out clip-world clip one shot and with
`tile_size`, and report the difference between the two reconstructions (PSNR of tiled vs one
shot on uint8 frames, max abs difference) and each one's PSNR against the source. Then run a
4-frame 2160x3840 clip through tiled encode + decode and report time and peak RSS (the one-shot
path at that size needs several GB of activations per layer on CPU; on GPU it is the same story).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

# tools/bench/dcae_v.py would shadow the package: keep this folder off sys.path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from dcae_v import DCAEV
from dcae_v.io import to_model_range, to_uint8
from dcae_v.metrics import psnr

ROOT = Path(__file__).resolve().parents[2]


def _clip(frames: int, size: int) -> torch.Tensor:
    spec = importlib.util.spec_from_file_location("clip_world", ROOT / "tools/world/clip_world.py")
    world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world)
    return torch.from_numpy(world.make_clip("photo_panzoom", 1_000_000_007, frames, size, size))  # held-out seed


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="256:128,512:256,512:128", help="frame:tile pairs in pixels")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--no-4k", action="store_true")
    args = ap.parse_args()
    model = DCAEV.from_pretrained(args.checkpoint, device=args.device, dtype=torch.float32)
    fpt = model.config.chunk_size
    print(f"model {model.config.name} chunk {fpt}, device {args.device}, torch {torch.__version__}, {args.frames} frames")
    print("| frame | tile (overlap) | PSNR one-shot vs source | PSNR tiled vs source | PSNR tiled vs one-shot | max abs diff (uint8) |")
    print("|---|---|---|---|---|---|")
    for pair in args.sizes.split(","):
        size, tile = map(int, pair.split(":"))
        src = _clip(args.frames, size)
        x = to_model_range(src).to(args.device)
        one = to_uint8(model.decode(model.encode(x, fpt), fpt))
        tiled = to_uint8(model.decode(model.encode(x, fpt, tile), fpt, tile))
        diff = (one.int() - tiled.int()).abs().max().item()
        print(f"| {size}x{size} | {tile} ({tile // 4}) | {psnr(src, one):.2f} | {psnr(src, tiled):.2f} | "
              f"{psnr(one, tiled):.2f} | {diff} |")
    if not args.no_4k:
        x = torch.rand(1, 3, 4, 2160, 3840, device=args.device) * 2 - 1
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, t0 = _kib("VmRSS"), time.time()
        y = model.reconstruct(x, tile_size=512)  # pads 2160 to 2176 (a multiple of 32), crops back
        print(f"2160x3840 x 4 frames, tile 512: {time.time() - t0:.1f} s, peak RSS above start "
              f"{(_kib('VmHWM') - base) / 1024:.0f} MiB (input + output alone: {2 * x.numel() * 4 / 2**20:.0f} MiB), "
              f"output {tuple(y.shape)}")


if __name__ == "__main__":
    main()
