"""Floating-point number formats as bit fields: range facts, and exact rounding of one value.

The full-precision reference formats (fp32, tf32, fp16, bf16) and the element formats of the
minifloats (fp8_e4m3fn, fp8_e5m2, fp4_e2m1) are each an ``ExMy`` layout (sign, E exponent
bits with bias ``2^(E-1) - 1``, M mantissa bits; docs/formats.md#minifloats-exmy). Their range
facts are computed here from the layout, not from tables (fp32 has 2^32 codes), and
``round_value`` rounds one number the way a cast does: to nearest, ties to even, in exact
rational arithmetic (a decimal such as 3.1415926535 is rounded once, from its exact value,
never through float64 first). What a cast does past the largest finite value is the
format's: IEEE formats give Inf, E4M3FN (no Inf) gives NaN, FP4 E2M1 (no Inf, no NaN)
saturates, as ml_dtypes' casts do. tf32 is fp32's exponent with fp16's 10 mantissa bits (NVIDIA
A100 Tensor Core GPU Architecture whitepaper, "TF32"; docs/formats.md#reference-floats); a value
is rounded to it as to the others, nearest with ties to even (PTX ``cvt.rna.tf32.f32`` rounds
ties away instead; cuBLAS's conversion is not specified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .exmy import E2M1, E4M3FN, E5M2, ExMy

# overflow rules of a cast (OCP OFP8 v1.0 §5 calls these non-saturating; ml_dtypes does the same)
TO_INF, TO_NAN, SATURATE = "inf", "nan", "saturate"


@dataclass(frozen=True)
class FloatFormat:
    name: str
    layout: ExMy
    dtype: str | None  # the name of the torch dtype that stores it, where torch has one (no torch import here)
    description: str

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def overflow(self) -> str:
        return {"ieee": TO_INF, "fn": TO_NAN, "none": SATURATE}[self.layout.specials]

    @property
    def max_exponent(self) -> int:
        """The unbiased exponent of the largest finite value."""
        top = (1 << self.layout.exp_bits) - 1  # the exponent field of all ones
        return top - self.layout.bias - (self.layout.specials == "ieee")

    @property
    def max_finite(self) -> Fraction:
        m = self.layout.man_bits
        # E4M3FN: the all-ones mantissa of the top exponent is NaN, so the largest mantissa is one lower
        top_mantissa = (1 << m) - 1 - (self.layout.specials == "fn")
        return (1 + Fraction(top_mantissa, 1 << m)) * Fraction(2) ** self.max_exponent

    @property
    def smallest_normal(self) -> Fraction:
        return Fraction(2) ** (1 - self.layout.bias)

    @property
    def smallest_subnormal(self) -> Fraction:
        return Fraction(2) ** (1 - self.layout.bias - self.layout.man_bits)

    @property
    def epsilon(self) -> Fraction:
        """The gap between 1 and the next larger value (torch.finfo's ``eps``)."""
        return Fraction(1, 1 << self.layout.man_bits)


REFERENCE_FLOATS = (
    FloatFormat("fp32", ExMy(8, 23, "ieee"), "float32", "IEEE 754 binary32"),
    FloatFormat("tf32", ExMy(8, 10, "ieee"), None,
                "TensorFloat-32: fp32's range and fp16's 10 mantissa bits (19 bits; tensor cores)"),
    FloatFormat("bf16", ExMy(8, 7, "ieee"), "bfloat16", "bfloat16: fp32's range, 8 bits of precision"),
    FloatFormat("fp16", ExMy(5, 10, "ieee"), "float16", "IEEE 754 binary16"),
)
ELEMENT_FLOATS = (
    FloatFormat("fp8_e4m3fn", E4M3FN, "float8_e4m3fn", "OCP OFP8 E4M3: no Inf, one NaN per sign"),
    FloatFormat("fp8_e5m2", E5M2, "float8_e5m2", "OCP OFP8 E5M2: IEEE-style Inf and NaN"),
    FloatFormat("fp4_e2m1", E2M1, None, "OCP MX FP4 element: no Inf, no NaN"),
)
FLOATS = {f.name: f for f in (*REFERENCE_FLOATS, *ELEMENT_FLOATS)}


@dataclass(frozen=True)
class Rounded:
    """One value as a format stores it: its bit fields and what they mean."""

    sign: int
    exponent: int  # the stored exponent field
    mantissa: int  # the stored mantissa field
    value: float  # what the fields decode to (may be inf or nan)
    overflowed: bool = False  # the value was past the largest finite one

    def code(self, f: FloatFormat) -> int:
        m, e = f.layout.man_bits, f.layout.exp_bits
        return self.sign << (e + m) | self.exponent << m | self.mantissa


def _special(f: FloatFormat, sign: int, what: str) -> Rounded:
    """What a cast gives for a NaN (``what="nan"``), or for an Inf or a finite value past the largest
    one (``"inf"``), by the format's rule (ml_dtypes' casts)."""
    lay, top = f.layout, (1 << f.layout.exp_bits) - 1
    if what == "nan" and f.overflow == SATURATE:  # no NaN code: ml_dtypes' fp4 cast gives -0
        return Rounded(1, 0, 0, -0.0)
    if what == "nan" or f.overflow == TO_NAN:
        quiet = (1 << lay.man_bits) - 1 if lay.specials == "fn" else 1 << (lay.man_bits - 1)
        return Rounded(sign if what == "inf" else 0, top, quiet, math.nan, what == "inf")
    if f.overflow == TO_INF:
        return Rounded(sign, top, 0, -math.inf if sign else math.inf, True)
    return _saturated(f, sign)


def _saturated(f: FloatFormat, sign: int) -> Rounded:
    top = f.max_exponent + f.layout.bias
    mantissa = (1 << f.layout.man_bits) - 1 - (f.layout.specials == "fn")
    value = float(f.max_finite)
    return Rounded(sign, top, mantissa, -value if sign else value, True)


def round_value(x: Fraction | float, f: FloatFormat, *, negative_zero: bool = False) -> Rounded:
    """``x`` cast to ``f``: nearest, ties to even, exact; past the range by the format's rule.

    ``x`` may be a float inf or nan; ``negative_zero`` marks a -0 input (a Fraction has no sign of zero)."""
    if isinstance(x, float) and not math.isfinite(x):
        return _special(f, int(x < 0), "nan" if math.isnan(x) else "inf")
    x = Fraction(x)
    sign = int(x < 0 or (x == 0 and negative_zero))
    a, lay = abs(x), f.layout
    if a == 0:
        return Rounded(sign, 0, 0, -0.0 if sign else 0.0)
    m, emin = lay.man_bits, 1 - lay.bias
    e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a) or one more
    # far outside the range the answer needs no arithmetic on a (whose size is the caller's: 2^e below
    # would be as large as a itself): a >= 2^(e-1) past the top binade overflows, a < 2^e under a quarter
    # of the smallest subnormal rounds to zero
    if e - 1 > f.max_exponent:
        return _special(f, sign, "inf")
    if e < emin - m - 1:
        return Rounded(sign, 0, 0, -0.0 if sign else 0.0)
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, emin)  # below the normal range the quantum stays that of the smallest normal: subnormals
    n = round(a / Fraction(2) ** (e - m))  # Fraction rounds half to even
    if n == 1 << (m + 1):  # rounded up into the next binade
        n, e = n >> 1, e + 1
    if n == 0:
        return Rounded(sign, 0, 0, -0.0 if sign else 0.0)
    value = Fraction(n) * Fraction(2) ** (e - m)
    if value > f.max_finite:
        return _special(f, sign, "inf")
    normal = n >= 1 << m
    exponent = e + lay.bias if normal else 0
    mantissa = n - (1 << m) if normal else n
    return Rounded(sign, exponent, mantissa, float(-value if sign else value))
