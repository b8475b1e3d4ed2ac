"""DC-AE-V encode/decode throughput and peak memory versus video length, side by side with Wan.

    python tools/bench/dcae_v.py                                  # shipped default, 40..400 frames, 128x128
    python tools/bench/dcae_v.py --preset debug --chunk-size 8 --lengths 16,64 --size 32 --no-wan  # smoke

Every (length, mode) is measured in its own fresh subprocess (`--worker SPEC`): peak RSS read
inside a long-lived process is polluted by earlier allocations kept in malloc arenas. The
worker builds the model, warms up on a short clip, resets the kernel high-water mark
(/proc/self/clear_refs) and reports wall time and peak memory *above* what was resident
before the operation (weights and one-shot inputs are excluded; outputs are included).
Only ratios measured in the same run mean anything; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

# This file is named dcae_v.py: keep its folder off sys.path so `import dcae_v` finds the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

MODES = ("encode-oneshot", "encode-tiled", "encode-stream", "decode-oneshot", "decode-tiled", "decode-stream")
MALLOC = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=1048576"
NOISE_MIB = 1.0  # RSS counters are approximate (per-CPU batched): smaller peaks are noise
WAN_NOTE = "Wan baseline: diffusers AutoencoderKLWan() default config (Wan-2.1 VAE), random init (speed only)"


# ---- worker (one measurement per process) ----------------------------------------------------
def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _measure(fn, device: str) -> tuple[float, float]:
    """(seconds, peak MiB above the resident baseline) of one call of fn."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # also resets ru_maxrss
            f.write("5")
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _kib("VmHWM") * 1024
    del out
    return seconds, (peak - base) / 2**20


def _load_ours(spec: dict):
    """The model the spec names; the shipped default falls back to a random tiny preset."""
    from dcae_v import DCAEV

    over = {"chunk_size": spec["chunk_size"]} if spec.get("chunk_size") else {}
    if spec.get("checkpoint"):
        return DCAEV.from_pretrained(spec["checkpoint"], **over), spec["checkpoint"]
    if spec.get("preset"):
        return DCAEV.from_preset(spec["preset"], **over), f"preset {spec['preset']} (random init)"
    try:
        return DCAEV.from_pretrained(**over), "shipped default checkpoint"
    except Exception as e:  # the default may not be trained yet
        model = DCAEV.from_preset("tiny-f32t4c64", **({"chunk_size": 8} | over))
        return model, f"preset tiny-f32t4c64 (random init; the default did not load: {str(e).split(';')[0]})"


def _ours(spec: dict, dev: str, dtype) -> tuple[object, dict]:
    """Callable running `spec['mode']` on a T-frame clip, plus facts for the header."""
    import torch

    model, source = _load_ours(spec)
    model = model.eval().to(dev, dtype)
    cfg, mode, T, S = model.config, spec["mode"], spec["frames"], spec["size"]
    c, tc, f = cfg.chunk_size, model.temporal_compression, model.spatial_compression
    info = {"model": cfg.name, "source": source, "params": sum(p.numel() for p in model.parameters()),
            "chunk_size": c, "temporal": cfg.temporal, "spatial_compression": f}
    gen = torch.Generator(dev).manual_seed(0)

    def rand(*shape, normal=False):
        return (torch.randn if normal else torch.rand)(*shape, generator=gen, device=dev)

    def make(frames: int):
        if mode == "encode-stream":  # pieces made on demand: the source video never exists whole
            def pieces():
                for s in range(0, frames, c):
                    yield rand(1, 3, min(c, frames - s), S, S) * 2 - 1

            return lambda: list(model.encode_stream(pieces()))  # keeps only the small latents
        if mode.startswith("encode"):
            x = rand(1, 3, frames, S, S) * 2 - 1
            return lambda: model.encode(x, frames_per_tile=c if mode == "encode-tiled" else None)
        z = rand(1, cfg.latent_channels, frames // tc, S // f, S // f, normal=True)
        if mode == "decode-stream":  # drop each piece, as writing it to a file would
            return lambda: sum(piece.shape[2] for piece in model.decode_stream(z.split(c // tc, dim=2)))
        return lambda: model.decode(z, frames_per_tile=c if mode == "decode-tiled" else None)

    if T:
        make(min(T, 2 * c))()  # warm-up: two chunks exercise the streaming cache
    return make(T), info | {"frames_processed": T}


def _wan(spec: dict, dev: str, dtype) -> tuple[object, dict]:
    """Wan needs 1 + 4k frames: encode T+1 frames / decode 1+T/4 latent frames (-> T+1 frames)."""
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().eval().to(dev, dtype)
    T, S, gen = spec["frames"], spec["size"], torch.Generator(dev).manual_seed(0)

    def make(frames: int):
        if spec["mode"] == "wan-encode":
            x = (torch.rand(1, 3, frames + 1, S, S, generator=gen, device=dev) * 2 - 1).to(dtype)
            return lambda: vae.encode(x).latent_dist.mode()
        z = torch.randn(1, vae.config.z_dim, 1 + frames // 4, S // 8, S // 8, generator=gen, device=dev).to(dtype)
        return lambda: vae.decode(z).sample

    make(4)()
    return make(T), {"model": "AutoencoderKLWan", "params": sum(p.numel() for p in vae.parameters()),
                     "frames_processed": T + 1}


def worker(spec: dict) -> dict:
    import torch

    dev, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    row = {k: spec[k] for k in ("mode", "frames", "size", "device", "dtype")}
    with torch.inference_mode():
        if spec["mode"] == "info":
            return row | _ours(spec | {"frames": 0}, dev, dtype)[1] | {
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        fn, info = (_wan if spec["mode"].startswith("wan") else _ours)(spec, dev, dtype)
        runs = [_measure(fn, dev) for _ in range(spec["repeat"])]
    seconds, peak = min(r[0] for r in runs), max(r[1] for r in runs)
    return row | info | {"seconds": seconds, "fps": info["frames_processed"] / seconds, "peak_mib": peak}


# ---- driver ------------------------------------------------------------------------------------
def run_worker(spec: dict) -> dict:
    """One measurement in a fresh process. glibc keeps freed blocks under 32 MiB in its heap, so
    the warm-up would hide the measured call's peak; with every allocation >= 64 KiB mmapped
    (ours and Wan alike), RSS follows the live tensors. Costs some page faults in the timing."""
    env = os.environ | {"GLIBC_TUNABLES": ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), MALLOC)))}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"mode": spec["mode"], "frames": spec["frames"], "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wan_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt_row(row: dict, wan: dict | None) -> str:
    head = f"{row['frames']:>6} | {row['mode']:<14} | "
    if "error" in row:
        return head + f"ERROR {row['error']}"
    line = head + f"{row['fps']:>9.2f} | {row['peak_mib']:>9.1f}"
    if wan is not None and "fps" in wan:
        noisy = min(row["peak_mib"], wan["peak_mib"]) < NOISE_MIB
        mem = "   n/a" if noisy else f"{row['peak_mib'] / wan['peak_mib']:>6.2f}x"
        line += f" | {wan['fps']:>8.2f} | {row['fps'] / wan['fps']:>6.2f}x | {mem}"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="NVIDIA .pt, .safetensors or save_pretrained directory")
    src.add_argument("--preset", help="random-init preset, e.g. tiny-f32t4c64, f32t4c32, debug")
    p.add_argument("--chunk-size", type=int, help="override the chunk size (frames), e.g. 8")
    p.add_argument("--lengths", default="40,80,200,400", help="comma-separated frame counts (multiples of 4)")
    p.add_argument("--size", type=int, default=128, help="frame height = width in pixels (multiple of 32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeat", type=int, default=1, help="measurements per worker (fastest time, highest peak)")
    p.add_argument("--no-wan", action="store_true", help="skip the diffusers AutoencoderKLWan baseline")
    p.add_argument("--json", help="write all rows (and the header facts) to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    lengths = sorted(int(n) for n in args.lengths.split(","))
    if any(n <= 0 or n % 4 for n in lengths):
        p.error("--lengths must be positive multiples of 4")
    base = {"checkpoint": args.checkpoint, "preset": args.preset, "chunk_size": args.chunk_size, "size": args.size,
            "device": args.device, "dtype": args.dtype, "repeat": args.repeat}
    info = run_worker(base | {"mode": "info", "frames": 0})
    if "error" in info:
        print(f"cannot build the model: {info['error']}", file=sys.stderr)
        return 1
    if args.size % info["spatial_compression"]:
        p.error(f"--size must be a multiple of {info['spatial_compression']} for {info['model']}")
    use_wan = not args.no_wan and _wan_available()
    print(f"# DC-AE-V benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# device {args.device} ({info['threads']} threads), torch {info['torch']}, dtype {args.dtype}, "
          f"{args.size}x{args.size} frames, repeat {args.repeat}")
    print(f"# model {info['model']} from {info['source']}: {info['params'] / 1e6:.2f} M params, "
          f"{info['temporal']} chunks of {info['chunk_size']} frames (tiled/stream tile = one chunk)")
    print("# " + (WAN_NOTE + "; Wan rates count T+1 frames" if use_wan else "Wan baseline: skipped "
                  + ("(--no-wan)" if args.no_wan else "(diffusers not installed)")))
    print("# peak MiB = RSS high-water mark above what was resident before the call (weights and inputs "
          f"excluded, outputs included); one process per row, GLIBC_TUNABLES={MALLOC}")
    cols = "length | mode           | frames/s  | peak MiB "
    print(cols + (" | wan f/s  | speed   | memory" if use_wan else ""))
    print("-" * (len(cols) + (35 if use_wan else 0)))
    rows: list[dict] = []
    for n in lengths:
        wan = {}
        if use_wan:
            for d in ("encode", "decode"):
                wan[d] = run_worker(base | {"mode": f"wan-{d}", "frames": n})
                rows.append(wan[d])
                print(_fmt_row(wan[d], None), flush=True)
        for mode in MODES:
            row = run_worker(base | {"mode": mode, "frames": n})
            rows.append(row)
            print(_fmt_row(row, wan.get(mode.split("-")[0])), flush=True)

    def peak(mode: str, n: int) -> float | None:
        return next((r.get("peak_mib") for r in rows if r["mode"] == mode and r["frames"] == n), None)

    lo, hi = lengths[0], lengths[-1]
    verdict = None
    for mode in ("encode-stream", "decode-stream"):
        a, b = peak(mode, lo), peak(mode, hi)
        if a is None or b is None:
            print(f"{mode}: no result")
            continue
        if a < NOISE_MIB:
            print(f"{mode} peak @ {hi} / @ {lo} frames: {b:.1f} / {a:.1f} MiB: INCONCLUSIVE (below the "
                  f"{NOISE_MIB:g} MiB noise floor; use a larger --size)")
            continue
        if mode == "decode-stream":
            verdict = b / a <= 1.1
        tag = ("PASS" if verdict else "FAIL") + " (target <= 1.10)" if mode == "decode-stream" else "(info)"
        if lo < info["chunk_size"]:
            tag += f"; {lo} frames is under one chunk ({info['chunk_size']}): the stream holds the whole clip"
        print(f"{mode} peak @ {hi} / @ {lo} frames: {b:.1f} / {a:.1f} MiB = {b / a:.2f}  {tag}")
    if use_wan:
        print("speed = our frames/s / Wan frames/s (>1: faster); memory = our peak / Wan peak (<1: less)")
    if args.json:
        meta = info | {"date": datetime.datetime.now().isoformat(timespec="seconds"), "lengths": lengths,
                       "wan": WAN_NOTE if use_wan else None, "decode_stream_pass": verdict}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
