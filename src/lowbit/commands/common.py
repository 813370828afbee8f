"""Arguments and steps that several subcommands share."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from .. import limits as L
from ..cachedir import cache_root
from ..errors import InputError
from ..files.atomic import check_output_file
from ..models.converted import CacheWarning
from ..progress import note

# torch, the model loader and the protocol (which imports torch) are imported inside the functions that
# use them: `lowbit plot`, `report` and `cache` import this module and must start without torch (issue 25)
if TYPE_CHECKING:
    import torch


def console() -> Console:
    # rich falls back to 80 columns when stdout is not a terminal; the tables need more,
    # unless COLUMNS says how wide the reader is
    return Console() if Console().is_terminal or os.environ.get("COLUMNS") else Console(width=140)


def add_model_arg(p) -> None:
    p.add_argument("--model", metavar="M",
                   help="embedded SmolLM2-135M (default), 'minilm', a local HF directory, a .gguf file, or a hub id")
    add_verify_arg(p)


def add_verify_arg(p) -> None:
    p.add_argument("--verify", action="store_true",
                   help="read the model's files (and a converted GGUF file's cache) again for their sha256; "
                        "otherwise a file whose size, times and inode are as when it was last hashed keeps its "
                        "recorded hash")


def add_protocol_args(p) -> None:
    from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS

    p.add_argument("--text", metavar="FILE", help="UTF-8 text to score on, a regular file of at most "
                   f"{L.MAX_TEXT_BYTES >> 30} GiB (default: Python's pydoc topics)")
    p.add_argument("--window", type=L.WINDOW.arg("--window"), default=DEFAULT_WINDOW,
                   help=f"tokens per window (default {DEFAULT_WINDOW}; {L.WINDOW.text()})")
    p.add_argument("--windows", type=L.WINDOWS.arg("--windows"),
                   help=f"windows scored, from the start of the text (default {DEFAULT_WINDOWS}, or as many as the "
                        f"text holds if fewer; more than it holds is an error; {L.WINDOWS.text()})")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def add_calibrate_arg(p) -> None:
    p.add_argument("--calibrate", type=L.CALIBRATE.arg("--calibrate"), metavar="N",
                   help="calibration windows of --window tokens for activation-weighted searches (@amse, @ahqq; "
                        "default 16: tokens 8,192-16,383 of the default text), GPTQ and AWQ (default 64), taken from "
                        f"the text right after the scored windows, never overlapping them ({L.CALIBRATE.text()})")


def check_calibrate_arg(args, plans) -> None:
    if args.calibrate is not None:  # a command whose parser did not read it with L.CALIBRATE.arg
        L.CALIBRATE.check(args.calibrate, "--calibrate")
    if args.calibrate is not None and not any(p.needs_calibration for p in plans):
        raise InputError("--calibrate is for activation-weighted searches, GPTQ and AWQ, and no format asks for one: "
                         "add @amse or @ahqq to a format, e.g. nf4@amse, or +gptq or +awq")


def add_selection_args(p) -> None:
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="quantize only the nn.Linear layers whose name (or a dotted tail of it) matches this "
                        "fnmatch pattern, e.g. 'mlp.*' (repeatable; default: every layer)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave layers matching PATTERN unquantized (repeatable; default: lm_head; giving "
                        "--exclude replaces that default)")


def add_keep_dtype_arg(p) -> None:
    p.add_argument("--keep-dtype", choices=("fp16", "bf16", "fp32"),
                   help="dtype of the tensors left unquantized (embeddings, norms, biases); default: what a "
                        "local checkpoint's config.json declares; fp32 for GGUF files and hub ids")


def parse_plans(labels: list[str], args, *, block_size: int | None = None, double_quant: bool = False,
                method: str | None = None):
    """``FORMAT[/BLOCK][+dq][@SEARCH]`` labels -> uniform QuantPlans, each once (a repeated label runs once), every
    one selecting the layers ``--include``/``--exclude`` name. ``block_size``/``double_quant``/``method`` are the
    long-form flags."""
    from ..methods.registry import ordered
    from ..planning.config import QuantConfig
    from ..planning.plan import DEFAULT_EXCLUDE, QuantPlan

    include, exclude = tuple(args.include or ()), DEFAULT_EXCLUDE if args.exclude is None else tuple(args.exclude)
    configs = {}
    for label in labels:
        config = QuantConfig.parse(label)
        if block_size is not None and config.block_size not in (None, block_size):
            raise InputError(f"{label!r} names block {config.block_size} but --block-size is {block_size}")
        if block_size is not None or double_quant:
            config = replace(config, block_size=block_size if block_size is not None else config.block_size,
                             double_quant=config.double_quant or double_quant)
        if method:
            config = replace(config, methods=ordered((*config.methods, f"+{method}")))
        configs.setdefault(config.label, config)
    return [QuantPlan.uniform(c, include, exclude) for c in configs.values()]


def check_protocol_args(args) -> None:
    """Fail before any model is loaded: bad numbers, a bad text, an unwritable JSON path."""
    from ..eval.protocol import read_text

    L.WINDOW.check(args.window, "--window")  # again for the commands whose parsers read them as plain ints
    if args.windows is not None:
        L.WINDOWS.check(args.windows, "--windows")
    read_text(args.text)  # missing, a directory, not UTF-8, empty: all fail here, in well under a second
    cache_root()  # a LOWBIT_CACHE that is a file
    if getattr(args, "json", None):
        check_writable_file(args.json)


def check_writable_file(path: str) -> None:
    check_output_file(path)  # a regular file or nothing, outside the cache, in a writable directory


def load(spec: str | None, con: Console, loader=None, *, verify: bool = False):
    """``load_model(spec, verify=verify)`` (or ``loader(spec)``, which hashes as it does) behind a spinner.
    transformers' GGUF loader draws a tqdm bar that no setting turns off; stderr is held for the load, and a
    failure still raises its error."""
    from transformers.utils import logging as hf_logging

    from ..models import load_model

    what = f"loading {spec or 'the embedded SmolLM2-135M-Instruct'}"
    note(what)  # the spinner below shows only on a terminal
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings would break the one-line-error contract
    caught: list = []
    try:
        with con.status(what, spinner="dots"), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always", CacheWarning)
            caught = held
            return load_model(spec, verify=verify) if loader is None else loader(spec)
    finally:
        hf_logging.set_verbosity(verbosity)
        for w in caught:  # ours (a cache rebuilt or not written) are worth a line; the held stderr's are not
            if issubclass(w.category, CacheWarning):
                sys.stderr.write(f"lowbit: warning: {' '.join(str(w.message).split())}\n")


def source_dtype(source: str | None) -> torch.dtype:
    """The dtype a local HF checkpoint (``ModelInfo.source``) declares in its config.json;
    float32 for anything else (GGUF files are dequantized to float32 on load, and hub ids are
    not looked up). An embedded name ("minilm") resolves to its directory first."""
    import torch

    from ..models.loader import resolve

    try:
        how, target = resolve(source)
    except ValueError:
        return torch.float32
    config = Path(target) / "config.json"
    if how != "directory" or not config.is_file():
        return torch.float32
    try:
        declared = json.loads(config.read_text())
    except (OSError, ValueError):
        return torch.float32
    name = declared.get("dtype") or declared.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)
