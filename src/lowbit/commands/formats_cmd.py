"""`lowbit formats [NAME]`: the format table, or one format's code table."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from ..formats import formats, get_format
from ..quantize import quantize

# Bits per weight are measured from the bytes stored for a tensor of this shape:
# 64 rows of 4096 hold whole blocks of every format, so no partial-block overhead.
_PROBE_SHAPE = (64, 4096)


def add_parser(sub) -> None:
    p = sub.add_parser("formats", help="list formats, or print one format's code table")
    p.add_argument("name", nargs="?", help="a format name, e.g. nf4")
    p.set_defaults(run=run)


def run(args) -> int:
    # rich falls back to 80 columns when stdout is not a terminal; the table needs more
    console = Console() if Console().is_terminal else Console(width=140)
    if args.name is None:
        console.print(format_table())
    else:
        spec = get_format(args.name)
        console.print(f"{spec.name} (id {spec.id}): {spec.description}")
        console.print(code_table(spec.name))
    return 0


def measured_bits_per_weight(name: str) -> float:
    return quantize(torch.zeros(_PROBE_SHAPE), name).bits_per_weight


def format_table() -> Table:
    table = Table(title="lowbit formats (bits per weight measured from stored bytes, default block)")
    for col, justify in [("format", "left"), ("id", "right"), ("bits/elem", "right"), ("block", "right"),
                         ("bits/weight", "right"), ("description", "left")]:
        table.add_column(col, justify=justify)
    for name in formats():
        spec = get_format(name)
        table.add_row(name, str(spec.id), str(spec.bits), str(spec.default_block_size),
                      f"{measured_bits_per_weight(name):.5g}", spec.description)
    return table


def code_table(name: str) -> Table:
    spec = get_format(name)
    table = Table()
    table.add_column("code", justify="right")
    table.add_column("binary", justify="right")
    table.add_column("value", justify="right")
    if spec.values is None:
        table.caption = "block format: element codes are integers scaled by the block's stored scales"
        return table
    for code, value in enumerate(spec.values):
        table.add_row(str(code), format(code, f"0{spec.bits}b"), f"{value:.9g}")
    return table
