"""The `lowbit` command: subcommands only parse arguments and call the library."""

from __future__ import annotations

import argparse
import sys

from .commands import compare_cmd, eval_cmd, formats_cmd, quantize_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Quantize language-model weights to low-bit formats and measure the cost."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (compare_cmd, quantize_cmd, eval_cmd, formats_cmd):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as e:
        # User errors (LowbitError subclasses ValueError): one line, exit status 2, no traceback.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
