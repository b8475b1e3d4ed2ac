"""`dcvg-wan` command line (no commands yet: the package is a skeleton)."""

import argparse

from dcvg_wan.__about__ import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcvg-wan",
        description="Wan-2.1 on DC-AE-V (skeleton: `generate`, `convert`, `adapt` and `cost` are not implemented yet).",
    )
    parser.add_argument("--version", action="version", version=f"dcvg-wan {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
