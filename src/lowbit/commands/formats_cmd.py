"""`lowbit formats [LABEL]`: the format table, or what one label stores and how it decodes.

Everything printed for a label is read from the format's facts (``FormatSpec``, its
``Anatomy``) and from a tensor actually quantized to it: bits per weight are the bytes
stored, the layout rows are the stored parts, and a GGUF format's levels are what its own
decoder makes of a block whose codes are all q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..errors import InputError
from ..formats import formats, get_format
from ..formats.floats import FLOATS, REFERENCE_FLOATS
from ..formats.spec import (
    CODES,
    DOUBLE_QUANT,
    DOUBLE_QUANT_FIELDS,
    DQ_SUFFIX,
    SCALE,
    SECOND_LEVEL,
    TENSOR_SCALE,
    FormatSpec,
    anatomy,
    no_double_quant_message,
)
from ..nn.probe import measured_bits_per_weight, probe
from ..nn.surgery import QuantConfig
from ..report.bits import float_facts_table
from ..tensor import QuantizedTensor
from .common import check_writable_file, console


def add_parser(sub) -> None:
    p = sub.add_parser("formats", help="list formats, or explain one label: its block layout and element levels")
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

        plots.check_suffix(args.plot)
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
        plots.save_figure(fig, args.plot)
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
                      f"{measured_bits_per_weight(name):.5g}", Text(spec.description))
    return table


@dataclass(frozen=True)
class Row:
    """One stored field of a label: where its bits go."""

    field: str
    role: str
    size: str
    bits_per_weight: float
    holds: str


def layout(q: QuantizedTensor) -> list[Row]:
    """The stored fields of ``q``, in stored order; their bits per weight sum to ``q.bits_per_weight``."""
    a, block = anatomy(q.format), q.block_size
    if a.gguf_block:
        (data,) = q.parts.values()
        if data.shape[1] != a.block_bytes:  # the field table must describe the bytes actually stored
            raise RuntimeError(f"{q.format.name}: fields hold {a.block_bytes} bytes, blocks store {data.shape[1]}")
        rows, at = [], 0
        for f in a.fields:
            size = f"bytes {at}-{at + f.nbytes - 1} ({f.nbytes} B)"
            rows.append(Row(f.name, f.role, size, 8 * f.nbytes / block, f.holds))
            at += f.nbytes
        return rows
    described = {f.name: f for f in (*a.fields, *DOUBLE_QUANT_FIELDS)}
    rows = []
    for name, t in q.parts.items():
        f = described[name]
        if f.role == CODES:
            bits = q.format.bits * block
            size = f"{q.format.bits} bits x {block} = " + (f"{bits // 8} B" if bits % 8 == 0 else f"{bits} bits")
            size += " per block"
        else:
            size = f"{str(t.dtype).removeprefix('torch.')} ({t.element_size()} B) per {f.per}"
        rows.append(Row(name, f.role, size, 8 * t.numel() * t.element_size() / q.numel, f.holds))
    return rows


def bits_by_role(rows: list[Row]) -> dict[str, float]:
    """Bits per weight of codes, scales, second-level scales and per-tensor scales (those stored)."""
    totals = {role: 0.0 for role in (CODES, SCALE, SECOND_LEVEL, TENSOR_SCALE)}
    for r in rows:
        totals[r.role] += r.bits_per_weight
    return {role: bits for role, bits in totals.items() if any(r.role == role for r in rows)}


def levels(spec: FormatSpec) -> list[float]:
    """What each element code means before scaling, in code order.

    Formats with a value table give it; a GGUF block format's levels are decoded by its own
    codec from one block whose every code is q, with scales 1 and minimums 0."""
    if spec.values is not None:
        return list(spec.values)
    a = anatomy(spec)
    if not a.gguf_block:  # a learned codebook's levels belong to each tensor; a cast's are every 16-bit float
        return []
    out = []
    for code in range(2**spec.bits):
        raw = bytearray(b"".join(f.probe_bytes(code) for f in a.fields))
        data = torch.frombuffer(raw, dtype=torch.uint8).view(1, -1)
        shape = torch.Size([spec.default_block_size])
        w = QuantizedTensor(spec, shape, torch.float32, spec.default_block_size, {"data": data}).dequantize()
        if not bool((w == w[0]).all()):
            raise RuntimeError(f"{spec.name}: the level probe for code {code} decodes unevenly")
        out.append(float(w[0]))
    return out


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


def layout_table(q: QuantizedTensor) -> Table:
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
