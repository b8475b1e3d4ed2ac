"""Latency of one DiT step on Wan-VAE latents versus DC-AE-V latents for the same video.

    python tools/bench/dit_step.py                       # CPU: t2v-1.3B width, 2 blocks, 256x256, 17 frames
    python tools/bench/dit_step.py --device cuda         # GPU: full t2v-1.3B, bf16, 832x480, 81 frames
    python tools/bench/dit_step.py --device cuda --task t2v-14B --size 1280*720 --repeat 3

Both models are random (speed only) and share their blocks, as DC-VideoGen does: only the patch
embedder and head differ (Wan: patch 1x2x2 on 16 channels; DC: patch 1x1x1 on 32). One step is
one forward at batch 1 (classifier-free guidance runs two). Base and DC runs alternate, so a
change of machine load hits both; the fastest of `--repeat` runs is kept. Next to the measured
latency ratio it prints the FLOP ratio of `dcvg_wan.cost` for the same (reduced) models. Only
ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

from dcvg_wan import PRESETS, WanModel
from dcvg_wan.cost import (
    LATENT_SPACES,
    base_task,
    dcvg_config,
    forward_flops,
    latent_grid,
    parse_size,
)

DEFAULTS = {  # device -> (size, frame_num, layers or None for all, dtype, repeat)
    "cpu": ("256*256", 17, 2, "float32", 3),
    "cuda": ("832*480", 81, None, "bfloat16", 5),
}


def build(task: str, layers: int | None, device: str, dtype: torch.dtype):
    """(base model, DC model sharing the base's blocks and embedders, their configs)."""
    base_cfg = PRESETS[base_task(task)]
    if layers:
        base_cfg = base_cfg.replace(num_layers=layers)
    dc_cfg = dcvg_config(base_cfg)
    torch.manual_seed(0)
    with torch.device(device):
        base = WanModel(base_cfg).set_dtype(dtype).eval()
        dc = WanModel(dc_cfg.replace(num_layers=1)).set_dtype(dtype).eval()  # blocks replaced below
    for name in ("text_embedding", "time_embedding", "time_projection", "blocks") + (
        ("img_emb",) if base_cfg.image_dim else ()
    ):
        setattr(dc, name, getattr(base, name))
    return base, dc, base_cfg, dc_cfg


def make_step(model: WanModel, cfg, ae: str, size, frame_num: int, device: str, dtype: torch.dtype):
    """A zero-argument callable running one forward on random inputs, and the latent grid."""
    grid = latent_grid(ae, *size, frame_num, cfg.patch)
    gen = torch.Generator(device).manual_seed(1)
    c = LATENT_SPACES[ae].channels
    x = torch.randn(1, c, *grid, generator=gen, device=device)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, device=device).to(dtype)
    t = torch.tensor([999], device=device)
    kwargs = {}
    if cfg.image_dim is not None:
        kwargs["clip_fea"] = torch.randn(1, 257, cfg.image_dim, generator=gen, device=device).to(dtype)
        kwargs["y"] = torch.randn(1, cfg.in_dim - c, *grid, generator=gen, device=device)

    def step():
        with torch.inference_mode():
            return model(x, t, context, **kwargs)

    return step, grid


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="t2v-1.3B", help="model preset (default t2v-1.3B)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", help="video W*H (default 256*256 on CPU, 832*480 on CUDA)")
    p.add_argument("--frame_num", type=int, help="video frames (default 17 on CPU, 81 on CUDA)")
    p.add_argument("--layers", type=int, help="DiT blocks (default 2 on CPU, all on CUDA)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights (default float32 CPU, bfloat16 CUDA)")
    p.add_argument("--repeat", type=int, help="timed runs per model after one warm-up (fastest kept)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"))
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    d_size, d_frames, d_layers, d_dtype, d_repeat = DEFAULTS[args.device]
    size = parse_size(args.size or d_size)
    frame_num = args.frame_num or d_frames
    layers = args.layers if args.layers is not None else d_layers
    dtype = getattr(torch, args.dtype or d_dtype)
    repeat = args.repeat or d_repeat

    base, dc, base_cfg, dc_cfg = build(args.task, layers, args.device, dtype)
    for m in (base, dc):
        m.set_attention_backend(args.attention)
    runs = {}
    for name, model, cfg, ae in (("base", base, base_cfg, "wan-vae"), ("dc", dc, dc_cfg, "dcae-v")):
        step, grid = make_step(model, cfg, ae, size, frame_num, args.device, dtype)
        flops = sum(forward_flops(cfg, grid).values())
        runs[name] = {"step": step, "grid": grid, "ae": ae, "cfg": cfg, "flops": flops, "times": []}
        timed(step, args.device)  # warm-up
    for _ in range(repeat):  # alternate so that load changes hit both
        for r in runs.values():
            r["times"].append(timed(r["step"], args.device))

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# DiT step benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {dev}, torch {torch.__version__}, {args.dtype or d_dtype}, attention {args.attention}, "
          f"fastest of {repeat} after 1 warm-up")
    print(f"# {args.task} width (dim {base_cfg.dim}, ffn {base_cfg.ffn_dim}, {base_cfg.num_heads} heads), "
          f"{base_cfg.num_layers} blocks{' (reduced)' if layers else ''}; video {size[0]}x{size[1]}, {frame_num} frames; "
          "random weights, batch 1, one forward")
    print("latents             | latent TxHxW | tokens  | ms/step   | TFLOP   | TFLOP/s")
    print("-" * 80)
    for r in runs.values():
        r["ms"] = 1e3 * min(r["times"])
        grid, ae = r["grid"], LATENT_SPACES[r["ae"]].name
        tokens = grid[0] * grid[1] * grid[2] // r["cfg"].patch_volume
        r["tokens"] = tokens
        print(f"{ae:<19} | {'x'.join(map(str, grid)):>12} | {tokens:>7,} | {r['ms']:>9.1f} | "
              f"{r['flops'] / 1e12:>7.3f} | {r['flops'] / r['ms'] / 1e9:>7.2f}")
    b, c = runs["base"], runs["dc"]
    print(f"speedup (Wan-VAE ms / DC-AE-V ms): {b['ms'] / c['ms']:.2f}x   FLOP ratio (cost model): "
          f"{b['flops'] / c['flops']:.2f}x   token ratio: {b['tokens'] / c['tokens']:.2f}x")
    if args.json:
        keep = ("grid", "ae", "flops", "times", "ms", "tokens")
        out = {"device": dev, "task": args.task, "layers": base_cfg.num_layers, "size": size, "frame_num": frame_num,
               "dtype": args.dtype or d_dtype, "runs": {k: {f: r[f] for f in keep} for k, r in runs.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
