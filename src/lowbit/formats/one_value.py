"""One float32 element rounded to its code as a grid codec's ``encode`` does with a block scale of 1.

`lowbit bits` rounds one number, and importing torch for it alone takes 1.3 s; this is the same
rule in Python: the codec's division by the scale 1 is exact, and its float32 comparisons against
float32 midpoints are exact in double. tests/formats/test_one_value.py checks it against the
codecs' ``encode`` for thousands of values per format, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import cache
from itertools import pairwise

from .exmy import ExMy
from .levels import f32
from .spec import FormatSpec

# The families whose codec is a GridCodec with one level table and one block scale (``SCALE_PARTS ==
# ("scales",)``): what `lowbit bits` explains (tests/formats/test_one_value.py checks the list)
ONE_SCALE_FAMILIES = ("int", "codebook", "minifloat", "ternary")


def explains(spec: FormatSpec) -> bool:
    """Whether ``encode_one`` rounds to ``spec``: one level table, one block scale."""
    return spec.family in ONE_SCALE_FAMILIES and spec.values is not None


def encode_one(spec: FormatSpec, x: float) -> int:
    """The code ``spec``'s codec gives the float32 ``x`` (finite) in a block whose scale is 1."""
    if spec.family in ("int", "ternary"):  # round(x / s) half to even, clamped to the narrow range; codes q + Qp
        qp = 2 ** (spec.bits - 1) - 1
        return max(-qp, min(qp, round(x))) + qp
    if spec.family == "codebook":  # nearest of x * (1 / 1) clamped to [-1, 1], ties to the lower level
        mids, order = _codebook(spec)
        return order[bisect_left(mids, max(-1.0, min(1.0, x)))]
    if spec.family == "minifloat":
        return _minifloat(_exmy(spec), x)
    raise ValueError(f"{spec.name}: not a format with one level table and one block scale")


def _midpoints(values: list[float]) -> list[float]:
    """float32 midpoints of neighbours, ``(a + b) / 2`` in float32 (formats.rounding.midpoints)."""
    return [f32(f32(a + b) / 2) for a, b in pairwise(values)]


@cache
def _codebook(spec: FormatSpec) -> tuple[list[float], list[int]]:
    """(midpoints of the sorted levels, code of each sorted slot): formats.codebooks.codebook_table."""
    order = sorted(range(len(spec.values)), key=spec.values.__getitem__)  # stable, as torch.argsort(stable=True)
    return _midpoints([spec.values[c] for c in order]), order


@cache
def _exmy(spec: FormatSpec) -> ExMy:
    p = dict(spec.params)
    return ExMy(p["exp_bits"], p["man_bits"], p["specials"], p.get("subnormals", True))


@cache
def _exmy_mids(fmt: ExMy) -> list[float]:
    return _midpoints(list(fmt.magnitude_table[0]))


def _minifloat(fmt: ExMy, x: float) -> int:
    """ExMy.encode: nearest magnitude, ties to the even code, saturating; +0 for zero, sign bit otherwise."""
    mags, codes = fmt.magnitude_table
    mids, a = _exmy_mids(fmt), abs(x)
    i = bisect_left(mids, a)
    if i < len(mids) and a == mids[i] and codes[i] % 2 == 1:  # on a midpoint: leave the odd code
        i += 1
    code = codes[i]
    return code | (1 << (fmt.exp_bits + fmt.man_bits)) if x < 0 and code > 0 else code


def float32_of(x: float) -> float:
    """``x`` as ``torch.tensor(x, dtype=torch.float32)`` holds it: nearest float32, +-inf past its range."""
    try:
        return f32(x)
    except OverflowError:
        return math.copysign(math.inf, x)
