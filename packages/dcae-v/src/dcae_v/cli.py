"""`dcae-v`: compress, reconstruct and evaluate videos with DC-AE-V.

Thin layer: parses arguments, calls `dcae_v.jobs`, turns typed errors into exit codes
(0 ok, 2 usage, 3 bad input, 4 checkpoint problem, 5 out of memory, 130 interrupted,
143 terminated (`train`: SIGTERM, after saving), 141 output pipe closed; an unexpected bug keeps Python's traceback and exit code 1).
Output paths are checked before a model is loaded, so a typo never costs the compute.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from dcae_v.__about__ import __version__
from dcae_v.errors import CheckpointError, InputError

DEMO_CLIP = Path(__file__).parent / "assets" / "demo.mp4"
EXIT_INPUT, EXIT_CHECKPOINT, EXIT_OOM, EXIT_INTERRUPT = 3, 4, 5, 130
EXIT_DIVERGED = 6  # `train`: NaN/Inf loss
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `dcae-v info | head`


def _model_options(p: argparse.ArgumentParser, tiles: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="NVIDIA dc-ae-v-*.pt, a .safetensors file or a save_pretrained directory "
                   "(default: the small checkpoint shipped with dcae-v)")
    g.add_argument("--preset", help="architecture the checkpoint must have, e.g. f32t4c32 (default: read from it)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    if tiles:
        g.add_argument("--frames-per-tile", type=int, help="frames per temporal tile, a multiple of the chunk size "
                       "(equal to one shot up to float rounding; default: whole chunks, >= 40 frames)")
        g.add_argument("--tile-size", type=int, help="spatial tile size in pixels (blended overlap) for large frames")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcae-v", description="DC-AE-V deep-compression video autoencoder.")
    parser.add_argument("--version", action="version", version=f"dcae-v {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reconstruct", help="encode + decode a video or image, write it, print PSNR/SSIM")
    p.add_argument("input", nargs="?", help=f"video or image (default: the bundled demo clip {DEMO_CLIP.name})")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4; .mkv with --lossless)")
    p.add_argument("--lossless", action="store_true", help="bit-exact RGB (FFV1 in .mkv) instead of h264 crf 18")
    p.add_argument("--max-frames", type=int, help="only the first N frames")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _model_options(p)

    p = sub.add_parser("encode", help="video -> latent .safetensors")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="latent file (.safetensors)")
    p.add_argument("--max-frames", type=int)
    _model_options(p)

    p = sub.add_parser("decode", help="latent .safetensors -> video")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--lossless", action="store_true")
    p.add_argument("--fps", type=float, help="frame rate (default: the source's, stored in the latent file)")
    _model_options(p)

    p = sub.add_parser("eval", help="paper protocol on a folder of videos (80 x 256 x 256 clips), table + JSON")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=80,
                   help="first N frames of each clip; shorter clips are skipped (default: 80, the paper's)")
    p.add_argument("--size", type=int, default=256,
                   help="shorter side resized to this, then centre-cropped square, in pixels (default: 256)")
    p.add_argument("--max-clips", type=int, help="only the first N videos, in name order (default: all)")
    p.add_argument("--json", dest="json_path", default="-", help="write the JSON here (default: stdout after the table)")
    p.add_argument("--lpips-backbone", help="torchvision AlexNet weights (alexnet-owt-7be5be79.pth)")
    p.add_argument("--lpips-heads", help="LPIPS linear heads (lpips weights/v0.1/alex.pth)")
    p.add_argument("--i3d", help="I3D TorchScript detector for FVD (i3d_torchscript.pt)")
    _model_options(p)

    p = sub.add_parser("train", help="train a DC-AE-V (config file + section.field=value overrides; torchrun for multi-GPU)")
    p.add_argument("--config", help="JSON (or YAML with PyYAML) file with sections model, data, optim, loss, gan, ema, "
                   "checkpoint, run")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. optim.lr=1e-4 data.frames=16")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|CHECKPOINT",
                   help="continue from the newest checkpoint in run.out_dir (`--resume` or `--resume latest`), or "
                   "from a given step_N.pt (newer checkpoints of the folder are set aside as step_N.pt.superseded); "
                   "Ctrl-C or SIGTERM saves one at the current step, then exits 130 / 143")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON (usable as --config) and exit, without validating it")

    p = sub.add_parser("info", help="describe a checkpoint (layout, preset, parameters, dtype)")
    p.add_argument("checkpoint", nargs="?", help="default: the shipped checkpoint")
    return parser


def _device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def _load(args):
    from dcae_v.checkpoint import load_dcaev

    device, dtype = _device_and_dtype(args)
    model = load_dcaev(args.checkpoint, preset=args.preset, device=device, dtype=dtype)
    source = args.checkpoint or "embedded default"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    c = model.config
    name = f"{args.preset} = {c.name}" if args.preset and args.preset != c.name else c.name
    print(f"model: {name} ({source}), {c.temporal} chunk {c.chunk_size}, {params:.1f}M params, "
          f"{device} {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    return model


def _tiles(args) -> dict:
    return {"frames_per_tile": args.frames_per_tile, "tile_size": args.tile_size}


def _check_video_output(args) -> None:
    """Suffix, --lossless and a writable directory, before the model is loaded (opens nothing)."""
    from dcae_v.io import VideoWriter

    VideoWriter(args.output, 1.0, lossless=args.lossless)


def _size_note(args, r) -> str:
    """yuv420p needs even sizes: an odd-sized result is padded by one row/column in the file."""
    if args.lossless or not (r.width % 2 or r.height % 2):
        return ""
    return f" (stored padded to {r.width + r.width % 2}x{r.height + r.height % 2}: yuv420p needs even sizes)"


def cmd_reconstruct(args) -> int:
    from dcae_v.jobs import reconstruct_file

    src = args.input
    if src is None:
        src = DEMO_CLIP
        print(f"no input given: reconstructing the bundled demo clip {DEMO_CLIP}", file=sys.stderr)
    _check_video_output(args)
    model = _load(args)
    r = reconstruct_file(model, src, args.output, lossless=args.lossless, max_frames=args.max_frames, progress=None, **_tiles(args))
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        print(f"wrote {r.output}: {r.frames} frames {r.width}x{r.height}{_size_note(args, r)} @ {r.fps:g} fps "
              f"in {r.seconds:.1f} s")
        ssim = "n/a (frames under 11 px)" if r.ssim != r.ssim else f"{r.ssim:.4f}"
        print(f"PSNR {r.psnr:.2f} dB  SSIM {ssim}")
    return 0


def cmd_encode(args) -> int:
    from dcae_v.jobs import check_latent_output, encode_file

    check_latent_output(args.output)
    r = encode_file(_load(args), args.input, args.output, max_frames=args.max_frames, progress=None, **_tiles(args))
    print(f"wrote {r.output}: latent of {r.frames} frames {r.width}x{r.height} in {r.seconds:.1f} s")
    return 0


def cmd_decode(args) -> int:
    from dcae_v.jobs import decode_file

    _check_video_output(args)
    r = decode_file(_load(args), args.input, args.output, lossless=args.lossless, fps=args.fps, progress=None, **_tiles(args))
    print(f"wrote {r.output}: {r.frames} frames {r.width}x{r.height}{_size_note(args, r)} @ {r.fps:g} fps "
          f"in {r.seconds:.1f} s")
    return 0


def cmd_eval(args) -> int:
    from dcae_v.io import check_output_path, write_reason
    from dcae_v.jobs import evaluate_dir, format_table
    from dcae_v.metrics import FVD, LPIPS

    if args.json_path != "-":
        check_output_path(args.json_path)  # before the (long) evaluation
    if bool(args.lpips_backbone) != bool(args.lpips_heads):
        raise InputError("LPIPS needs both --lpips-backbone and --lpips-heads")
    lpips = LPIPS.from_weights(args.lpips_backbone, args.lpips_heads) if args.lpips_backbone else None
    fvd = FVD.from_weights(args.i3d) if args.i3d else None
    if lpips is None and fvd is None:
        print("LPIPS and FVD are off: they need local weights (--lpips-backbone/--lpips-heads, --i3d)", file=sys.stderr)
    model = _load(args)
    result = evaluate_dir(model, args.directory, frames=args.frames, size=args.size, lpips=lpips, fvd=fvd,
                          max_clips=args.max_clips, progress=None, **_tiles(args))
    print(format_table(result))
    text = json.dumps(result, indent=2)
    if args.json_path == "-":
        print(text)
    else:
        try:
            Path(args.json_path).write_text(text + "\n")
        except OSError as e:
            raise InputError(f"cannot write {args.json_path!r}: {write_reason(e)}; the table above is all there is") from e
        print(f"wrote {args.json_path}")
    return 0


def cmd_info(args) -> int:
    from dcae_v.checkpoint import describe_checkpoint

    print(json.dumps(describe_checkpoint(args.checkpoint), indent=2))
    return 0


def cmd_train(args) -> int:
    import logging
    import os

    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        # `--resume optim.max_steps=9`: argparse gave --resume the override that followed it
        args.overrides.insert(0, args.resume)
        args.resume = "latest"

    from dcae_v.io import check_output_dir, write_reason
    from dcae_v.train import (
        TrainingDiverged,
        TrainingInterrupted,
        TrainingOOM,
        load_config,
        train,
    )
    from dcae_v.train.checkpoints import list_checkpoints

    if args.print_config:  # the resolved values, unvalidated: a starting point to edit, not a run
        cfg = load_config(args.config, args.overrides, check=False)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    cfg = load_config(args.config, args.overrides)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main_process:
        print(cfg, file=sys.stderr)
        if load_config(args.config, args.overrides, check=False).data.frames is None:
            print(f"(data.frames not set: one chunk of the model, {cfg.data.frames} frames)", file=sys.stderr)
    out_dir = Path(cfg.run.out_dir)
    check_output_dir(out_dir, "run.out_dir")
    existing = list_checkpoints(out_dir / "checkpoints")
    if existing and not args.resume:
        raise InputError(
            f"run.out_dir {out_dir} already holds checkpoints of a run (newest: {existing[-1].name}); pass --resume "
            f"to continue it, or choose another run.out_dir"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = train(cfg, resume=args.resume)
    except OSError as e:
        if e.filename is None or not _inside(e.filename, out_dir):
            raise
        raise InputError(f"cannot write {e.filename!r} in run.out_dir: {write_reason(e)}") from e
    except TrainingOOM as e:
        print(f"dcae-v: out of memory: {e}", file=sys.stderr)
        return EXIT_OOM
    except TrainingDiverged as e:
        print(f"dcae-v: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        if main_process:
            print(f"dcae-v: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 for SIGINT (Ctrl-C), 143 for SIGTERM, as a shell reports them
    if main_process:
        print(f"trained to step {result.step}; checkpoint {result.checkpoint}; "
              f"exports: {', '.join(map(str, result.exports)) or 'none'}")
    return 0


def _inside(path, directory: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(directory))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings are advice to the user: one line, no source location."""
    return f"dcae-v: warning: {message}\n"


COMMANDS = {"reconstruct": cmd_reconstruct, "encode": cmd_encode, "decode": cmd_decode, "eval": cmd_eval,
            "train": cmd_train, "info": cmd_info}


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that an unknown option is reported by the subcommand that
    got it (its usage line, not the top-level one) with the closest option it has."""
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    target = commands.get(getattr(args, "command", None), parser)
    options = [o for action in target._actions for o in action.option_strings]
    close = difflib.get_close_matches(unknown[0].split("=", 1)[0], options, n=1)
    target.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    for name in ("frames_per_tile", "tile_size", "max_frames", "max_clips", "frames", "size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            print(f"dcae-v: error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # `dcae-v info | head`: the reader left; stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush into the pipe
        except (OSError, ValueError):  # stdout is not a real file (e.g. captured)
            pass
        return EXIT_BROKEN_PIPE
    except InputError as e:
        print(f"dcae-v: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except CheckpointError as e:
        print(f"dcae-v: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except torch.OutOfMemoryError:
        print("dcae-v: out of memory: use --frames-per-tile (a chunk) and/or --tile-size (e.g. 512) to bound memory",
              file=sys.stderr)
        return EXIT_OOM
    except KeyboardInterrupt:
        print("dcae-v: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    raise SystemExit(main())
