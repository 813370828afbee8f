"""`lowbit bits VALUE`: how one number is stored in each format, field by field, and what it loses."""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import InputError
from ..formats.floats import FLOATS
from ..limits import EXACT_EXPONENT, MAX_VALUE_CHARS
from ..report.bits import DEFAULT_BITS_FORMATS, bits_table, parse_value, store
from .common import console


def add_parser(sub) -> None:
    p = sub.add_parser("bits")
    p.add_argument("value", metavar="VALUE",
                   help=f"a decimal (3.1415926535, -1e-3), a ratio (1/3), nan or inf; at most {MAX_VALUE_CHARS:,} "
                        f"characters. Past 10^+-{EXACT_EXPONENT} (1e10000000) a value is beyond every format's range "
                        "and is shown as the formats round it: Inf, NaN or saturation; a signed zero")
    # VALUE may be negative: argparse takes only -5 and -0.5 for numbers, and -1e-3, -1/3 and -inf for
    # options; this parser has no option that looks like a number, so every "-digit..." is the value
    p._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)
    p.add_argument("--formats", default=",".join(DEFAULT_BITS_FORMATS),
                   help="comma-separated formats (default: %(default)s); any of fp32, tf32, bf16, fp16, the fp8 "
                        "and fp4_e2m1 elements, and formats with one level table (nf4, int4, bnb_fp4, ...)")
    p.add_argument("--scale", default="1", metavar="S",
                   help="the block scale a low-bit element is relative to (VALUE / S is rounded, then times S); "
                        "default 1. The reference floats fp32, tf32, bf16, fp16 take none")
    p.set_defaults(run=run)


def run(args) -> int:
    value = parse_value(args.value)
    scale = parse_value(args.scale)
    # a block scale is stored as a float32: a normal, positive one
    fp32 = FLOATS["fp32"]
    if not isinstance(scale, Fraction) or not fp32.smallest_normal <= scale <= fp32.max_finite:
        raise InputError(f"--scale must be a positive number a float32 block scale can hold (1.2e-38 to 3.4e38), "
                         f"got {args.scale!r}")
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    if not names:
        raise InputError("--formats names no format")
    negative_zero = args.value.strip().startswith("-")
    rows = [store(value, name, scale=scale, negative_zero=negative_zero) for name in names]
    con = console()
    con.print(bits_table(args.value.strip(), value, rows, scale))
    for r in rows:
        if r.note:
            con.print(f"{r.format}: {r.note}")
    return 0
