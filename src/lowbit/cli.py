"""The `lowbit` command: subcommands only parse arguments and call the library."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager

from . import __version__
from .commands import (
    bits_cmd,
    cache_cmd,
    compare_cmd,
    errors_cmd,
    eval_cmd,
    export_cmd,
    formats_cmd,
    generate_cmd,
    import_cmd,
    memory_cmd,
    outliers_cmd,
    plot_cmd,
    qat_cmd,
    quantize_cmd,
    report_cmd,
    sensitivity_cmd,
)
from .errors import LowbitError


class Terminated(BaseException):
    """SIGTERM (job schedulers, ``timeout``, ``kill``), raised where Python next runs. A
    BaseException like KeyboardInterrupt, so every ``except BaseException`` cleanup (temp
    files, temp directories) runs on the way out and no ``except Exception`` swallows it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Quantize language-model weights to low-bit formats and measure the cost."
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (compare_cmd, quantize_cmd, qat_cmd, eval_cmd, generate_cmd, export_cmd, import_cmd,
                    sensitivity_cmd, outliers_cmd, errors_cmd, formats_cmd, bits_cmd, plot_cmd, report_cmd,
                    memory_cmd, cache_cmd):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_raises():
            return args.run(args) or 0
    except (LowbitError, OSError) as e:
        # User errors (bad input, a file that cannot be read or written, a full disk): one line, exit 2.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lowbit {args.command}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended
    except Exception as e:  # anything else is a bug in lowbit (or below it), never the user's input
        if os.environ.get("LOWBIT_DEBUG") == "1":
            raise
        where = _write_traceback(args.command)
        message = " ".join(str(e).split())[:200]
        print(f"lowbit {args.command}: internal error (a bug in lowbit, not your input): {type(e).__name__}"
              f"{': ' + message if message else ''}; traceback in {where} (LOWBIT_DEBUG=1 shows it here)",
              file=sys.stderr)
        return 3


def _write_traceback(command: str) -> str:
    """The current exception's traceback in a new file under the temp directory; its path, or a
    note when even that cannot be written."""
    text = f"lowbit {__version__} {command}: {' '.join(sys.argv)}\n{traceback.format_exc()}"
    try:
        fd, path = tempfile.mkstemp(prefix=f"lowbit-{command}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        return "nowhere (the temp directory is not writable)"
    return path


@contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises ``Terminated`` (the default action would kill the
    process at once, leaving temp files behind); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
