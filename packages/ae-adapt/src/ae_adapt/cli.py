"""`ae-adapt`: inspect presets and caches, convert adapters. Training runs through a model
binding (e.g. `dcvg-wan adapt`) or the library (`ae_adapt.run_all`), since it needs a model.

Exit codes as dcae-v's and dcvg-wan's: 0 ok, 2 usage (argparse), 3 bad input, 141 output pipe
closed (`ae-adapt presets | head`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from ae_adapt.__about__ import __version__
from ae_adapt.errors import AdaptError, OutputError

EXIT_INPUT = 3  # 2 is argparse's usage error, as in dcae-v and dcvg-wan
EXIT_BROKEN_PIPE = 141


def _presets(args: argparse.Namespace) -> int:
    from ae_adapt.stages import PRESETS, get_preset

    names = [args.name] if args.name else list(PRESETS)
    print(json.dumps({n: dataclasses.asdict(get_preset(n)) for n in names}, indent=2))
    return 0


def _cache_info(args: argparse.Namespace) -> int:
    from ae_adapt.cache import LatentCache

    cache = LatentCache(args.cache_dir)
    print(json.dumps({**cache.fingerprint(), "text_len": cache.index["text_len"]}, indent=2))
    return 0


def check_output_file(path: str) -> None:
    """Refuse an output file that cannot be written before converting anything: the directory
    must exist and accept a new file (probed, so it also holds for root), the target must not be
    a directory."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path!r}: it is a directory; give a file name such as {os.path.join(path, 'lora.safetensors')!r}")
    head = os.path.dirname(path) or "."
    if not os.path.exists(head):
        raise OutputError(f"cannot write {path!r}: the directory {head!r} does not exist")
    if not os.path.isdir(head):
        raise OutputError(f"cannot write {path!r}: {head!r} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ae-adapt-write-check.", dir=head)
    except OSError as e:
        raise OutputError(
            f"cannot write {path!r}: no new file can be created in {head!r} ({e.strerror or e}); choose a writable directory"
        ) from None
    os.close(fd)
    os.remove(tmp)


def _export_lora(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from ae_adapt.files import save_safetensors
    from ae_adapt.lora_io import adapter_layer_names, convert_peft_adapter, wrapper_prefix

    check_output_file(args.out)
    if not str(args.out).endswith(".safetensors"):
        raise OutputError(f"-o {args.out}: the export is a safetensors file (what ComfyUI and kohya load): "
                          "name it .safetensors")
    strip = args.strip_prefix
    if strip is None:  # not given: drop a wrapper's prefix that the plain model's keys lack
        strip = wrapper_prefix(adapter_layer_names(args.adapter_dir))
        if strip:
            print(
                f"note: every LoRA layer name starts with {strip!r}, a wrapper module's name (dcvg-wan adapt: "
                f"the Wan model is held as .dit): stripped it so that the keys match the plain model; "
                f'pass --strip-prefix "" to keep it',
                file=sys.stderr,
            )
    state = convert_peft_adapter(args.adapter_dir, args.format, strip_prefix=strip)
    try:
        save_safetensors(state, args.out)  # atomic, with ordinary permissions
    except (OSError, SafetensorError) as e:
        raise OutputError(f"cannot write {args.out!r}: {e}") from e
    print(f"wrote {len(state) // 3} LoRA layers ({args.format} keys) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ae-adapt", description="AE-Adapt-V: move a DiT to a new latent space.")
    parser.add_argument("--version", action="version", version=f"ae-adapt {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("presets", help="print the stage hyper-parameters (Table 8) of one or all presets")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_presets)
    p = sub.add_parser("cache-info", help="print what a latent cache holds and which autoencoders made it")
    p.add_argument("cache_dir")
    p.set_defaults(func=_cache_info)
    p = sub.add_parser("export-lora", help="convert a saved peft adapter to ComfyUI/kohya LoRA keys")
    p.add_argument("adapter_dir")
    p.add_argument("-o", "--out", required=True, help="output .safetensors")
    p.add_argument("--format", choices=("kohya", "comfy"), default="comfy")
    p.add_argument(
        "--strip-prefix",
        default=None,
        help='wrapper prefix to drop from layer names (Wan: "dit."); default: detected (one leading module name '
        'shared by every layer, not a block list), with a note; "" keeps the names as they are',
    )
    p.set_defaults(func=_export_lora)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported with the usage of the subcommand that got it."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
        commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's final flush
        return code
    except (AdaptError, ValueError) as err:
        print(f"ae-adapt: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:  # the reader closed the pipe: nothing left to say, and no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (e.g. captured)
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    raise SystemExit(main())
