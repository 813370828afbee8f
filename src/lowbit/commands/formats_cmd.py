"""`lowbit formats [LABEL]`: the format table, or what one label stores and how it decodes.

Everything printed for a label is read from the format's facts (``FormatSpec``, its
``Anatomy``, ``formats.facts``), without torch (1.3 s to import): bits per weight and the layout
rows are the bytes a codec stores for the probe tensor (``lowbit.formats.probe``), and a GGUF format's
levels are what its decoder makes of a block whose codes are all q, with scales 1 and minimums 0.
tests/commands/test_formats_cmd.py checks each against a tensor quantized by the codecs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..errors import InputError
from ..formats import formats, get_format
from ..formats.facts import Probe, bits_per_weight, probe
from ..formats.floats import FLOATS, REFERENCE_FLOATS
from ..formats.spec import (
    CODES,
    DOUBLE_QUANT,
    DOUBLE_QUANT_FIELDS,
    DQ_BLOCK,
    DQ_SUFFIX,
    SCALE,
    SECOND_LEVEL,
    TENSOR_SCALE,
    Field,
    FormatSpec,
    anatomy,
    no_double_quant_message,
)
from ..planning.config import QuantConfig
from ..report.bits import float_facts_table
from .common import check_writable_file, console


def add_parser(sub) -> None:
    p = sub.add_parser("formats")
    p.add_argument("label", nargs="?", metavar="FORMAT[/BLOCK][+dq]",
                   help="a format label, e.g. nf4, q4_0 or nf4/128+dq")
    p.add_argument("--plot", metavar="F.png",
                   help="also draw the label's element levels (.png, .svg or .pdf; NormalFloat with the normal "
                        "density its levels are quantiles of)")
    p.set_defaults(run=run)


def run(args) -> int:
    con = console()
    reference = FLOATS.get((args.label or "").strip().lower())
    if reference in REFERENCE_FLOATS and reference.name not in formats():  # fp32, tf32: no level table
        if args.plot is not None:
            raise InputError(f"{reference.name} has 2^{reference.bits} levels, too many to draw; --plot draws a "
                             "low-bit format's levels, e.g. `lowbit formats nf4 --plot nf4.png`")
        con.print(float_facts_table((reference,), title=f"{reference.name}: {reference.description}"))
        return 0
    config = None if args.label is None else QuantConfig.parse(args.label)
    if args.plot is not None:  # every problem with --plot before anything is printed
        if config is None:
            raise InputError("--plot draws one format's levels: name it, e.g. `lowbit formats nf4 --plot nf4.png`")
        from ..report import plots  # matplotlib only inside its drawing functions
        from ..report.figure import check_suffix, save_figure

        check_suffix(args.plot)
        check_writable_file(args.plot)  # before the table is printed, not after
        spec = get_format(config.format)
        values = levels(spec)
        if not values and spec.family == "learned":
            raise InputError(f"{spec.name}'s levels are learned per tensor: `lowbit plot levels --formats "
                             f"{spec.name}` draws those of a model's layer")
        if not values:
            raise InputError(f"{spec.name} has no table of levels to draw ({spec.description})")
    con.print(Group(format_table(), float_facts_table()) if config is None else explain(config))
    if args.plot is not None:
        fig = plots.format_levels({config.label: values}, gaussian=spec.family == "codebook"
                                  and spec.name.startswith("nf"))
        save_figure(fig, args.plot)
        con.print(f"wrote {args.plot}")
    return 0


def format_table() -> Table:
    table = Table(title="lowbit formats (bits per weight measured from stored bytes, default block)",
                  caption=Text(f"a label is FORMAT[/BLOCK][{DQ_SUFFIX}][+awq][+had][+gptq][+cb][@SEARCH], e.g. "
                               f"nf4/128{DQ_SUFFIX}, int4_asym@hqq, nf4/32+dq+gptq@amse; `lowbit formats LABEL` "
                               "shows its block layout and element levels; LLM.int8(): int8_outlier[/THRESHOLD]"))
    for col, justify in [("format", "left"), ("id", "right"), ("bits/elem", "right"), ("block", "right"),
                         (DQ_SUFFIX, "left"), ("bits/weight", "right"), ("description", "left")]:
        table.add_column(col, justify=justify)
    for name in formats():
        spec = get_format(name)
        block = f"{spec.default_block_size}{' fixed' if spec.fixed_block_size else ''}"
        table.add_row(name, str(spec.id), str(spec.bits), block, "yes" if spec.double_quant else "",
                      f"{bits_per_weight(name):.5g}", Text(spec.description))
    return table


@dataclass(frozen=True)
class Row:
    """One stored field of a label: where its bits go."""

    field: str
    role: str
    size: str
    bits_per_weight: float
    holds: str


def stored_fields(spec: FormatSpec, double_quant: bool) -> list[Field]:
    """The parts a codec stores, in its order: per-tensor constants (computed before blocking), the codes,
    the per-block scales, the fp32 scales replaced by their second level under double quantization."""
    fields = anatomy(spec).fields
    order = [f for f in fields if f.role == TENSOR_SCALE] + [f for f in fields if f.role != TENSOR_SCALE]
    if not double_quant:
        return order
    at = next(i for i, f in enumerate(order) if f.name == "scales")
    return [*order[:at], *DOUBLE_QUANT_FIELDS, *order[at + 1:]]


_ENTRY_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}


def layout(q: Probe) -> list[Row]:
    """The stored fields of ``q``, in stored order; their bits per weight sum to ``q.bits_per_weight``."""
    a, block = anatomy(q.format), q.block_size
    if a.gguf_block:
        if a.block_bytes != q.format.block_bytes:  # the field table must describe the bytes stored (formats.table)
            raise RuntimeError(f"{q.format.name}: fields hold {a.block_bytes} bytes, blocks store "
                               f"{q.format.block_bytes}")
        rows, at = [], 0
        for f in a.fields:
            size = f"bytes {at}-{at + f.nbytes - 1} ({f.nbytes} B)"
            rows.append(Row(f.name, f.role, size, 8 * f.nbytes / block, f.holds))
            at += f.nbytes
        return rows
    n_blocks = math.ceil(q.numel / block)
    units = {"element": q.numel, "block": n_blocks, "tensor": 1, f"{DQ_BLOCK} blocks": math.ceil(n_blocks / DQ_BLOCK)}
    rows = []
    for f in stored_fields(q.format, q.double_quant):
        if f.role == CODES:  # packed across the tensor
            bits = q.format.bits * block
            size = f"{q.format.bits} bits x {block} = " + (f"{bits // 8} B" if bits % 8 == 0 else f"{bits} bits")
            size += " per block"
            nbytes = math.ceil(q.format.bits * q.numel / 8)
        else:
            size = f"{f.dtype} ({_ENTRY_BYTES[f.dtype]} B) per {f.per}"
            nbytes = int(f.entries) * units[f.per] * _ENTRY_BYTES[f.dtype]
        rows.append(Row(f.name, f.role, size, 8 * nbytes / q.numel, f.holds))
    return rows


def bits_by_role(rows: list[Row]) -> dict[str, float]:
    """Bits per weight of codes, scales, second-level scales and per-tensor scales (those stored)."""
    totals = {role: 0.0 for role in (CODES, SCALE, SECOND_LEVEL, TENSOR_SCALE)}
    for r in rows:
        totals[r.role] += r.bits_per_weight
    return {role: bits for role, bits in totals.items() if any(r.role == role for r in rows)}


def levels(spec: FormatSpec) -> list[float]:
    """What each element code means before scaling, in code order.

    Formats with a value table give it; a GGUF block format's levels are what its decoder makes of
    one block whose every code is q, with scales 1 and minimums 0 (ggml-quants.c dequantize_row_*:
    q8_0's code byte is an int8, the symmetric types subtract half the code range, q4_1, q5_1 and
    q4_k add the minimum 0, q6_k subtracts 32); tests/commands/test_formats_cmd.py decodes such
    blocks with the codecs and compares."""
    if spec.values is not None:
        return list(spec.values)
    if not anatomy(spec).gguf_block:  # a learned codebook's levels belong to each tensor; a cast's are every float
        return []
    codes = range(2**spec.bits)
    kind = dict(spec.params).get("kind")
    if kind == "q8":
        return [float(q - 256 if q > 127 else q) for q in codes]
    offset = 2 ** (spec.bits - 1) if kind == "sym" or spec.name == "q6_k" else 0
    return [float(q - offset) for q in codes]


def level_table(spec: FormatSpec) -> Table:
    scaled = "level (scales 1, minimums 0)" if spec.values is None else "level"
    table = Table()
    for col in ("code", "binary", scaled):
        table.add_column(col, justify="right")
    values = levels(spec)
    for code, level in enumerate(values):
        table.add_row(str(code), format(code, f"0{spec.bits}b"), f"{level:.9g}")
    if not values:
        table.caption = "the levels are learned per tensor and stored with it (part tensor_codebook)"
    elif len(values) < 2**spec.bits:  # narrow-range ints, ternary
        first, last = len(values), 2**spec.bits - 1
        table.caption = f"code {last} is never stored" if first == last else f"codes {first}-{last} are never stored"
    return table


def layout_table(q: Probe) -> Table:
    a = anatomy(q.format)
    what = f"one block of {a.block_bytes} bytes per {q.block_size} weights" if a.gguf_block else "stored parts"
    table = Table(title=f"where the bits go: {what}")
    for col, justify in [("field", "left"), ("role", "left"), ("size", "left"), ("bits/weight", "right"),
                         ("holds", "left")]:
        table.add_column(col, justify=justify)
    for r in layout(q):
        table.add_row(r.field, r.role, r.size, f"{r.bits_per_weight:.4g}", Text(r.holds))
    return table


def explain(config: QuantConfig) -> Group:
    """What ``config``'s label stores and how it decodes: header, layout table, level table."""
    spec = get_format(config.format)
    a = anatomy(spec)
    q = probe(config)
    outlier = config.outlier_threshold is not None
    if outlier:
        block = f"one row ({q.block_size} weights here): one scale per output row (LLM.int8()'s vector-wise weights)"
    elif spec.fixed_block_size:
        block = f"{q.block_size} weights, fixed ({a.fixed_by})"
    else:
        block = f"{q.block_size} weights (default {spec.default_block_size}; FORMAT/BLOCK sets it)"
    if config.double_quant:
        dq = f"yes: {DOUBLE_QUANT}"
    elif outlier:
        dq = "not available: LLM.int8()'s row scales are fp32"
    elif spec.double_quant:
        dq = f"no ({DQ_SUFFIX} turns it on: {DOUBLE_QUANT})"
    else:
        dq = f"not available: {no_double_quant_message(spec)}"
    rows = layout(q)
    split = " + ".join(f"{role} {bits:.4g}" for role, bits in bits_by_role(rows).items())
    shape = " x ".join(str(d) for d in q.shape)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    # Text: the data's brackets (level[q]) are not rich markup
    head.add_row(config.label, Text(f"{spec.description} (format id {spec.id})"))
    head.add_row("block", Text(block))
    head.add_row("scales", Text(a.scales))
    head.add_row("double quant", Text(dq))
    head.add_row("bits/weight", Text(f"{q.bits_per_weight:.6g} = {split}, measured on a {shape} tensor"))
    head.add_row("decode", Text(a.rule))
    if outlier:
        head.add_row("activations", Text(
            f"at run time, int8 with one absmax per token; the input columns with |x| >= "
            f"{config.outlier_threshold:g} in any token of a call go through a float product with the dequantized "
            "weight columns instead (LLM.int8(), arXiv 2208.07339; README: LLM.int8())"))
    if spec.family == "cast":  # 65,536 levels: the range facts say more than a table of them
        return Group(head, layout_table(q), float_facts_table((FLOATS[spec.name],), title=f"{spec.name}'s range"))
    # the rule as a line of its own: a table title would wrap to the narrow level table's width
    return Group(head, layout_table(q), Text(f"element levels: {a.rule}"), level_table(spec))
