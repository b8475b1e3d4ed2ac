"""`ae-adapt` command line (no commands yet: the package is a skeleton)."""

import argparse

from ae_adapt.__about__ import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ae-adapt",
        description="AE-Adapt-V (skeleton: no commands are implemented yet; see the ae-adapt issue).",
    )
    parser.add_argument("--version", action="version", version=f"ae-adapt {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
