"""The `lowbit` command: subcommands only parse arguments and call the library."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager

from . import __version__
from .errors import LowbitError
from .limits import OneLineParser


class Terminated(BaseException):
    """SIGTERM (job schedulers, ``timeout``, ``kill``), raised where Python next runs. A
    BaseException like KeyboardInterrupt, so every ``except BaseException`` cleanup (temp
    files, temp directories) runs on the way out and no ``except Exception`` swallows it."""


# Every subcommand: (name, module under lowbit.commands, one-line help for `lowbit --help`), in the
# order `lowbit --help` lists them. Only the chosen command's module is imported: most of them
# import torch (about 1.3 s), which `lowbit --version`, `formats`, `memory` or `report` never need.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("compare", "compare_cmd", "quantize a model to several formats and measure the loss of each"),
    ("quantize", "quantize_cmd", "quantize a model's linear layers and save it"),
    ("qat", "qat_cmd", "quantization-aware training (LSQ): train the weights and their steps, then save"),
    ("eval", "eval_cmd", "score a saved quantized model against the original"),
    ("generate", "generate_cmd", "generate text with a quantized model, printing tokens as they come"),
    ("export", "export_cmd", "write a saved quantized model as a GGUF file (llama.cpp) or a bitsandbytes 4-bit "
                             "checkpoint (transformers)"),
    ("import", "import_cmd", "read a GGUF file or a bitsandbytes 4-bit checkpoint into a lowbit model directory, "
                             "its quantized bytes unchanged"),
    ("sensitivity", "sensitivity_cmd", "measure what quantizing each layer alone costs in KL, per format"),
    ("outliers", "outliers_cmd", "find the input features of each layer with |x| >= a threshold (LLM.int8()'s "
                                 "outliers) and the systematic ones"),
    ("errors", "errors_cmd", "per-layer weight SQNR (dB) of several formats, without running the model"),
    ("formats", "formats_cmd", "list formats, or explain one label: its block layout and element levels"),
    ("bits", "bits_cmd", "show how one number is stored in each format: sign, exponent and mantissa fields (or "
                         "code and level), the stored value and its error"),
    ("plot", "plot_cmd", "draw a figure: a layer's weights and levels, KL against bits, SQNR per layer, a plan's "
                         "formats, outliers per layer"),
    ("report", "report_cmd", "write the self-contained HTML report of saved `lowbit compare --json` results"),
    ("memory", "memory_cmd", "weight memory at each format, and which accelerators hold it"),
    ("cache", "cache_cmd", "list the cached references and converted models, or clear them"),
)


class _Subcommands:
    """What a command module's ``add_parser(sub)`` is given: ``sub.add_parser(name, ...)`` with the
    one-line help of ``COMMANDS`` (one place for it, listed without importing the modules)."""

    def __init__(self, sub, helps: dict[str, str]):
        self._sub, self._helps = sub, helps

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._sub.add_parser(name, **{**kwargs, "help": self._helps[name]})


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (lowbit's own options,
    -h and --version, take no value), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``lowbit``: every subcommand listed with its help, and ``command``'s own
    arguments (only its module is imported; None: no module, enough for --help and --version)."""
    parser = OneLineParser(  # usage errors in one line, like every other error
        prog="lowbit", description="Quantize language-model weights to low-bit formats and measure the cost."
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {name: help for name, _, help in COMMANDS}
    for name, module, help in COMMANDS:
        if name == command:
            importlib.import_module(f".commands.{module}", __package__).add_parser(_Subcommands(sub, helps))
        else:  # listed only: argparse never reaches it on this command line
            sub.add_parser(name, help=help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
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
