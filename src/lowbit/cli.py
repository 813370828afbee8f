"""The `lowbit` command: subcommands only parse arguments and call the library."""

from __future__ import annotations

import argparse
import sys

from .commands import formats_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Quantize language-model weights to low-bit formats and measure the cost."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    formats_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as e:
        # User errors: one line, exit status 2, no traceback.
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
