"""`dcvg-wan` command line.

Thin layer: parses arguments, calls the library, turns typed errors into exit codes
(0 ok, 2 usage, 3 bad input, 4 checkpoint problem, 6 training diverged (adapt), 130 interrupted;
an unexpected bug keeps
Python's traceback and exit code 1). Commands: `generate` (official generate.py flags), `convert`
(between checkpoint layouts), `cost` (tokens and FLOPs per DiT step), `adapt` (AE-Adapt-V).
"""

from __future__ import annotations

import argparse
import os
import sys

from dcae_v.cli import parse_command_line
from dcae_v.errors import CheckpointError as AutoencoderCheckpointError
from dcae_v.errors import InputError as AutoencoderInputError
from dcvg_wan.__about__ import __version__
from dcvg_wan.errors import CheckpointError, InputError

EXIT_INPUT, EXIT_CHECKPOINT = 3, 4
EXIT_DIVERGED = 6  # `adapt`: a non-finite loss or gradient, as dcae-v train


def cmd_cost(args: argparse.Namespace) -> int:
    from dcvg_wan.cost import cost_table, format_table, parse_size

    sizes = [parse_size(s) for s in args.size.split(",")] if args.size else None
    print(format_table(cost_table(args.task, sizes, args.frame_num)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dcvg_wan.generate import run

    run(args)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from ae_adapt.errors import AdaptError, DivergedError
    from dcvg_wan.adapt_command import run

    try:
        run(args)
    except DivergedError as e:  # the last good checkpoint is kept; the message says what to change
        print(f"dcvg-wan: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except AdaptError as e:  # cache/protocol/resume problems are the user's to fix
        raise InputError(str(e)) from e
    return 0


def check_writable_target(path: str) -> None:
    """Before the work: the nearest existing folder on the path must be a writable folder (the
    writers create the missing ones, as diffusers' save_pretrained does). dcae-v's probe creates a
    file there, which also holds for root, where permission bits say nothing."""
    from dcae_v.io import check_output_dir

    parent = os.path.dirname(os.path.abspath(path))
    try:
        check_output_dir(parent)
    except AutoencoderInputError:
        raise InputError(f"cannot write {path}: {parent} is not a writable folder") from None


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from dcvg_wan.checkpoint import convert_checkpoint

    if args.layout != "comfy" and args.output.endswith(".safetensors"):
        raise InputError(f"--layout {args.layout} writes a folder (config.json + weights), not {args.output}; name a "
                         "folder, or use --layout comfy for one .safetensors file")
    check_writable_target(args.output)
    dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        model = convert_checkpoint(args.input, args.output, layout=args.layout, preset=args.preset, dtype=dtype)
    except OSError as e:  # e.g. the disk filled up while writing
        raise InputError(f"cannot write {args.output}: {e.strerror or e}") from e
    names = ", ".join(model.preset_names) or "custom architecture"
    print(f"wrote {args.output} ({args.layout} layout; {names})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcvg-wan", description="Wan-2.1 text/image/first-last-frame-to-video on DC-AE-V (DC-VideoGen) or the Wan VAE.")
    parser.add_argument("--version", action="version", version=f"dcvg-wan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cost = sub.add_parser(
        "cost",
        help="tokens and FLOPs of one DiT step: Wan-VAE vs DC-AE-V latents",
        description="Tokens and matmul FLOPs of one DiT forward for the base model on Wan-VAE latents and its "
        "DC-VideoGen variant on DC-AE-V latents, their ratio, and the paper's measured speedup.",
    )
    cost.add_argument("--task", default="t2v-1.3B", help="model preset, e.g. t2v-1.3B, t2v-14B, i2v-14B, flf2v-14B (default t2v-1.3B)")
    cost.add_argument("--size", help="W*H, comma-separated, or 480p/720p/1080p/2160p (default: all four)")
    cost.add_argument("--frame_num", type=int, default=81, help="frames of the video (default 81)")
    cost.set_defaults(func=cmd_cost)

    from dcvg_wan.generate import add_arguments

    generate = sub.add_parser(
        "generate",
        help="text/image/first-last-frame to video (the official generate.py flags, plus --ae/--dcae_ckpt/--lora/--attention)",
        description="Generate a video with Wan-2.1 (--ae wan-vae) or DC-VideoGen (--ae dcae-v). Without --ckpt_dir "
        "the embedded demo model runs (a toy T2V model on DC-AE-V latents). NVIDIA's DC-Gen generate.py words "
        "(task=t2v prompt=... steps=... seed=... save_path=...) are read as these flags, with a note.",
    )
    add_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    convert = sub.add_parser(
        "convert",
        help="convert a DiT checkpoint between the official, diffusers and ComfyUI layouts",
        description="Read a Wan DiT in any layout (official/diffusers folder, ComfyUI or official single file) "
        "and write it in another: official or diffusers (a folder with config.json) or comfy (one .safetensors).",
    )
    convert.add_argument("input", help="checkpoint folder or file")
    convert.add_argument("output", help="output folder (official, diffusers) or .safetensors file (comfy)")
    convert.add_argument("--layout", required=True, choices=("official", "diffusers", "comfy"))
    convert.add_argument("--preset", default=None, help="architecture to expect (default: from config/shapes)")
    convert.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="cast (default: as stored)")
    convert.set_defaults(func=cmd_convert)

    from dcvg_wan.adapt_command import add_arguments as add_adapt_arguments

    adapt = sub.add_parser(
        "adapt",
        help="AE-Adapt-V: move a Wan-2.1 DiT to DC-AE-V latents (cache, 3 stages, LoRA)",
        description="Build the paired-latent cache from your videos, then align the new patch embedder, the "
        "output head, and LoRA-finetune end to end (ae-adapt, Table 8 presets). Resumable: rerun the command.",
    )
    add_adapt_arguments(adapt)
    adapt.set_defaults(func=cmd_adapt)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:  # NVIDIA's DC-Gen generate.py words (task=t2v prompt=...) as our flags
        from dcvg_wan.dcgen_arguments import translate
        from dcvg_wan.generate import add_arguments

        generate = argparse.ArgumentParser(add_help=False)
        add_arguments(generate)
        try:
            rest, note = translate(argv[1:], generate)
        except InputError as e:
            print(f"dcvg-wan: error: {e}", file=sys.stderr)
            return EXIT_INPUT
        argv = ["generate", *rest]
        if note:
            print(note, flush=True)
    args = parse_command_line(build_parser(), argv)
    try:
        return args.func(args)
    except (InputError, AutoencoderInputError) as e:  # dcae-v raises its own (video files, tiling)
        print(f"dcvg-wan: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except (CheckpointError, AutoencoderCheckpointError) as e:
        print(f"dcvg-wan: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except KeyboardInterrupt:
        print("dcvg-wan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
