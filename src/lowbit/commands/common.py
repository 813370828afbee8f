"""Arguments and steps that several subcommands share."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from rich.console import Console

from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS


def console() -> Console:
    # rich falls back to 80 columns when stdout is not a terminal; the tables need more
    return Console() if Console().is_terminal else Console(width=140)


def add_model_arg(p) -> None:
    p.add_argument("--model", metavar="M",
                   help="embedded SmolLM2-135M (default), 'minilm', a local HF directory, a .gguf file, or a hub id")


def add_protocol_args(p) -> None:
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to score on (default: Python's pydoc topics)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"windows scored, from the start of the text (default {DEFAULT_WINDOWS})")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def check_protocol_args(args) -> None:
    """Fail before any model is loaded: bad numbers, a missing text, an unwritable JSON path."""
    if args.window < 2 or args.windows < 1:
        raise ValueError(f"need --window >= 2 and --windows >= 1, got {args.window} and {args.windows}")
    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"text file does not exist: {args.text}")
    if args.json:
        check_writable_file(args.json)


def check_writable_file(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"is a directory, not a file: {p}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to directory: {parent}")


def load(spec: str | None, con: Console):
    """``load_model(spec)`` behind a spinner. transformers' GGUF loader draws a tqdm bar that
    no setting turns off; stderr is held for the load, and a failure still raises its error."""
    from transformers.utils import logging as hf_logging

    from ..models import load_model

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings would break the one-line-error contract
    try:
        with con.status(f"loading {spec or 'the embedded SmolLM2-135M-Instruct'}", spinner="dots"), \
                contextlib.redirect_stderr(io.StringIO()):
            return load_model(spec)
    finally:
        hf_logging.set_verbosity(verbosity)
