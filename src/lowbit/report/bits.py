"""How one number is stored in each format (`lowbit bits`), and the range facts of the float formats.

A float format's row shows its sign, exponent and mantissa fields as bits, what they decode
to, the stored value and its error; a codebook or integer format's row shows the code and
the level it picks. The rounding of floats is ``lowbit.formats.floats.round_value`` (exact);
a grid format's is its codec's ``encode`` in float32, as the quantizer runs it, done without torch
by ``lowbit.formats.one_value`` (checked against the codecs in tests/formats/test_one_value.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_DOWN, ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from fractions import Fraction

from rich.table import Table
from rich.text import Text

from ..errors import InputError
from ..formats.floats import FLOATS, REFERENCE_FLOATS, SATURATE, TO_INF, FloatFormat, round_value
from ..formats.one_value import encode_one, explains, float32_of
from ..formats.registry import get_format
from ..limits import EXACT_EXPONENT, MAX_VALUE_CHARS

DEFAULT_BITS_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1", "nf4")


@dataclass(frozen=True)
class Stored:
    """One value in one format: the fields as text, the stored value and a note."""

    format: str
    sign: str
    exponent: str
    mantissa: str
    code: str
    decoded: str  # what the fields mean, e.g. "+1.5703125 x 2^1" or "level[15] x 1"
    value: float
    note: str = ""
    stored: bool = True  # False: the format has no code for the value (NaN or Inf in a codebook)


# a decimal with an exponent: sign, integer digits, fraction digits, exponent (what Fraction reads, less "_")
_EXPONENT_FORM = re.compile(r"[+-]?([0-9]*)(?:\.([0-9]*))?[eE]([+-]?[0-9]+)")


@dataclass(frozen=True)
class Beyond:
    """A decimal whose leading digit is past 10^±EXACT_EXPONENT (``1e10000000``, ``9e-99999999999``): beyond
    every format's range at every --scale, so it is rounded as ``proxy`` (10^±EXACT_EXPONENT, same sign) is,
    by overflow or underflow, and never built as a rational (10^10000000 took minutes). ``digits`` x
    10^``exponent`` is its exact magnitude, for the errors."""

    negative: bool
    digits: int  # the significant digits, no trailing zeros
    exponent: int

    @property
    def huge(self) -> bool:
        return self.exponent > 0

    @property
    def proxy(self) -> Fraction:
        p = Fraction(10) ** (EXACT_EXPONENT if self.huge else -EXACT_EXPONENT)
        return -p if self.negative else p

    def errors(self, stored: float) -> tuple[str, str]:
        """(absolute, relative) error of a finite ``stored`` against this value, to 3 significant digits.

        ``stored`` (a float64 within 10^±400) is so far from the value that it moves the error only below the
        value's own digits, or the value only below ``stored``'s: it decides nothing but a tie of the rounding."""
        mantissa = Decimal(self.digits).scaleb(1 - len(str(self.digits)))  # in [1, 10)
        power = self.exponent + len(str(self.digits)) - 1
        if stored == 0:  # |x - 0| = |x|, all of it
            return _sci3(mantissa, power, 0), "1"
        toward = (stored < 0) == self.negative  # stored on the value's side of 0: the error is less than the larger
        if self.huge:  # |x| - stored, or |x| + |stored|; relative 1 - (or +) a 10^-600 share
            return _sci3(mantissa, power, -1 if toward else 1), "1"
        big = Decimal(abs(stored))  # exact; |stored| - |x|, or + |x|
        b_mantissa, b_power = big.scaleb(-big.adjusted()), big.adjusted()
        ratio = Context(prec=40).divide(b_mantissa, mantissa)  # |stored| / |x|, relative error to 3 digits
        r_power = b_power - power + ratio.adjusted()
        return _sci3(b_mantissa, b_power, -1 if toward else 1), _sci3(ratio.scaleb(-ratio.adjusted()), r_power, 0)


def parse_value(text: str) -> Fraction | float | Beyond:
    """A decimal (``3.1415926535``, ``-1e-3``), a ratio (``1/3``), or nan / inf: exact where finite.

    At most MAX_VALUE_CHARS characters; a decimal whose exponent puts it past 10^±EXACT_EXPONENT is a ``Beyond``
    (docs/limits.md): the time taken is bounded whatever the text says."""
    stripped = text.strip()
    if len(stripped) > MAX_VALUE_CHARS:
        raise InputError(f"a number of {len(stripped):,} characters: lowbit bits reads at most {MAX_VALUE_CHARS:,} "
                         "(a float64's exact decimal has at most 767 significant digits)")
    key = stripped.lower().lstrip("+")
    if key in ("nan", "-nan"):
        return math.nan
    if key in ("inf", "infinity", "-inf", "-infinity"):
        return -math.inf if key.startswith("-") else math.inf
    m = _EXPONENT_FORM.fullmatch(stripped)
    if m and (m[1] or m[2]):
        beyond = _beyond(stripped.startswith("-"), m[1], m[2] or "", int(m[3]))
        if beyond is not None:
            return beyond
    try:
        return Fraction(stripped)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot read {text!r} as a number: give a decimal such as 3.1415926535, -1e-3 or 1/3, "
                         "or nan, inf, -inf") from None


def _beyond(negative: bool, whole: str, fraction: str, exponent: int) -> Beyond | None:
    """The decimal ``whole.fraction`` x 10^exponent as a Beyond when its leading digit is past
    10^±EXACT_EXPONENT; None when it is within (or zero), to be read exactly."""
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return None
    power = exponent + len(whole) - 1 - ((len(whole) + len(fraction)) - len(digits))  # of the leading digit
    if abs(power) <= EXACT_EXPONENT:
        return None
    significant = digits.rstrip("0")
    return Beyond(negative, int(significant), power - len(significant) + 1)


def _sci3(mantissa: Decimal, power: int, nudge: int) -> str:
    """``mantissa`` (in [1, 10)) x 10^``power`` to 3 significant digits, as ``_sci`` writes it (``1.23e+456``), for
    any ``power``. ``nudge``: the exact value is that less (-1) or more (+1) by an amount below every digit of
    ``mantissa``, which matters only when the mantissa is a tie of the rounding."""
    rounding = {0: ROUND_HALF_EVEN, -1: ROUND_HALF_DOWN, 1: ROUND_HALF_UP}[nudge]
    # a mantissa with no digit past the third is exact; less than it by a hair rounds back to it
    rounded = mantissa.quantize(Decimal("0.01"), rounding=rounding)
    if rounded >= 10:
        rounded, power = rounded.scaleb(-1), power + 1
    if abs(power) < 300:  # within float64's range: as _sci writes such a number
        return f"{float(rounded.scaleb(power)):.3g}"
    return f"{float(rounded):.3g}e{power:+d}"


def store(value: Fraction | float | Beyond, name: str, *, scale: Fraction = Fraction(1),
          negative_zero: bool = False) -> Stored:
    """``value`` as ``name`` stores it. ``scale``: the block scale a low-bit element is relative to
    (the value is divided by it, rounded, and multiplied back); the reference floats take none."""
    if isinstance(value, Beyond):  # rounds as any value past every range does
        value = value.proxy
    if name in FLOATS:
        f = FLOATS[name]
        reference = f in REFERENCE_FLOATS
        s = Fraction(1) if reference else scale
        x = value if isinstance(value, float) else value / s
        return _float_row(f, x, s, negative_zero)
    spec = get_format(name)
    if not explains(spec):
        raise InputError(f"lowbit bits explains the float formats ({', '.join(FLOATS)}) and formats with one level "
                         f"table and one block scale (nf4, int4, bnb_fp4, ...); {name} is not one of them")
    return _grid_row(spec, value, scale)


def _float_row(f: FloatFormat, x: Fraction | float, scale: Fraction, negative_zero: bool) -> Stored:
    r = round_value(x, f, negative_zero=negative_zero)
    e_bits, m_bits, bias = f.layout.exp_bits, f.layout.man_bits, f.layout.bias
    exponent = format(r.exponent, f"0{e_bits}b") if e_bits else "-"
    mantissa = format(r.mantissa, f"0{m_bits}b") if m_bits else "-"
    sign = "-" if r.sign else "+"
    if math.isnan(r.value) or math.isinf(r.value):
        decoded = "NaN" if math.isnan(r.value) else f"{sign}Inf"
        exponent += " (all ones)"
    elif r.exponent == 0:  # subnormal (or zero): 0.m x 2^(1 - bias)
        decoded = f"{sign}{Fraction(r.mantissa, 1 << m_bits) if m_bits else 0} x 2^{1 - bias} (subnormal)"
        decoded = decoded if r.mantissa else f"{sign}0"
        exponent += f" = 0 (subnormal: 2^{1 - bias})" if r.mantissa else ""
    else:
        decoded = f"{sign}{_exact(1 + Fraction(r.mantissa, 1 << m_bits))} x 2^{r.exponent - bias}"
        exponent += f" = {r.exponent} (2^{r.exponent - bias})"
    value = r.value * float(scale) if math.isfinite(r.value) else r.value
    if scale != 1:
        decoded += f" x scale {float(scale):g}"
    note = _overflow_note(f, scale) if r.overflowed else ""
    if isinstance(x, float) and math.isnan(x) and f.overflow == SATURATE:
        note = "no NaN code: a cast gives -0 (ml_dtypes)"
    return Stored(f.name, str(r.sign), exponent, mantissa, f"0x{r.code(f):0{(f.bits + 3) // 4}x}", decoded, value,
                  note)


def _overflow_note(f: FloatFormat, scale: Fraction) -> str:
    top = f"{float(f.max_finite):g}" + (f" x scale {float(scale):g}" if scale != 1 else "")
    if f.overflow == TO_INF:
        return f"past its largest finite value {top}: a cast gives Inf"
    if f.overflow == SATURATE:
        return f"no Inf or NaN codes: saturates at {top}"
    return (f"no Inf: a non-saturating cast gives NaN (ml_dtypes, OCP OFP8); a saturating one gives {top} "
            "(torch's cast, lowbit's block quantizer)")


def _grid_row(spec, value: Fraction | float, scale: Fraction) -> Stored:
    if isinstance(value, float):  # nan or inf
        return Stored(spec.name, "", "", "", "-", "-", math.nan,
                      f"{spec.name} has no code for {value}: the quantizer refuses non-finite weights", stored=False)
    # the element is value / scale in float32, as the quantizer divides a block by its scale
    # (clamped to float32's range first: past it every format is at its top level anyway)
    ratio = value / scale
    top = max(abs(v) for v in spec.values if math.isfinite(v))
    big = FLOATS["fp32"].max_finite
    c = encode_one(spec, float32_of(float(max(-big, min(big, ratio)))))
    level = spec.values[c]
    stored = _to_float(Fraction(level) * scale)
    note = f"past the largest level {top:g} x scale: clamped" if abs(ratio) > top else ""
    return Stored(spec.name, "", "", "", f"{c:0{spec.bits}b} = {c}", f"level[{c}] = {level:.9g} x scale "
                  f"{float(scale):g}", stored, note)


def _exact(x: Fraction, limit: int = 12) -> str:
    """A dyadic fraction as its exact decimal (1 + m / 2^M always has one), cut after ``limit`` digits."""
    whole, rest = divmod(x.numerator, x.denominator)
    digits = []
    while rest and len(digits) < limit:
        rest *= 10
        d, rest = divmod(rest, x.denominator)
        digits.append(str(d))
    return f"{whole}.{''.join(digits)}{'...' if rest else ''}" if digits else f"{whole}"


def error_text(stored: float, value: Fraction | float | Beyond) -> tuple[str, str]:
    """(absolute, relative) error of ``stored`` against the exact ``value``."""
    if isinstance(value, Beyond):
        return value.errors(stored) if math.isfinite(stored) else ("-", "-")
    if isinstance(value, float) or not math.isfinite(stored):
        same = isinstance(value, float) and (stored == value or (math.isnan(stored) and math.isnan(value)))
        return ("0", "0") if same else ("-", "-")
    err = abs(Fraction(stored) - value)
    rel = _sci(err / abs(value)) if value else ("0" if not err else "-")
    return _sci(err), rel


def _sci(x: Fraction) -> str:
    """A nonnegative Fraction to 3 significant digits, exact in its exponent where float64 would
    underflow to 0 or overflow (an error of 1e-400)."""
    f = _to_float(x)
    if not x or (f != 0 and math.isfinite(f)):
        return f"{f:.3g}"
    exponent = len(str(x.numerator)) - len(str(x.denominator))  # within one of floor(log10 x)
    mantissa = x / Fraction(10) ** exponent
    while mantissa >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    while mantissa < 1:
        mantissa, exponent = mantissa * 10, exponent - 1
    return f"{float(mantissa):.3g}e{exponent:+d}"


def _to_float(x: Fraction) -> float:
    """``float(x)``, or a signed inf past float64's range (an input such as 1e400)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def bits_table(text: str, value: Fraction | float | Beyond, rows: list[Stored], scale: Fraction) -> Table:
    shown = f"{text} (= {_to_float(value):.17g})" if "/" in text and not isinstance(value, float) else text
    table = Table(title=f"{shown} in each format", caption=Text(
        "stored: what the fields decode to; errors against the exact input. Floats round to nearest, ties to even."
        + (f" Low-bit elements are relative to a block scale of {float(scale):g} (--scale)." if scale != 1 else
           " Low-bit elements are shown with a block scale of 1 (--scale sets one).")), caption_justify="left")
    for col, justify in [("format", "left"), ("sign", "center"), ("exponent", "left"), ("mantissa", "left"),
                         ("code", "left"), ("decoded", "left"), ("stored", "right"), ("abs error", "right"),
                         ("rel error", "right")]:
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        abs_err, rel_err = error_text(r.value, value) if r.stored else ("-", "-")
        table.add_row(r.format, r.sign, r.exponent, r.mantissa, r.code, Text(r.decoded), f"{r.value:.9g}",
                      abs_err, rel_err)
    return table



def float_facts_table(formats: tuple[FloatFormat, ...] = REFERENCE_FLOATS, title: str | None = None) -> Table:
    """Bits, range, smallest normal and subnormal, and machine epsilon of each float format."""
    table = Table(title=title or "full-precision reference formats (what the low-bit formats are measured against)")
    for col in ("format", "bits", "sign/exp/mantissa", "largest finite", "smallest normal", "smallest subnormal",
                "epsilon", "past the range"):
        table.add_column(col, justify="left" if col in ("format", "sign/exp/mantissa", "past the range") else "right")
    for f in formats:
        table.add_row(f.name, str(f.bits), f"1/{f.layout.exp_bits}/{f.layout.man_bits}", f"{float(f.max_finite):.6g}",
                      f"{float(f.smallest_normal):.6g}", f"{float(f.smallest_subnormal):.6g}",
                      f"{float(f.epsilon):.6g}", {"inf": "Inf", "nan": "NaN", "saturate": "saturates"}[f.overflow])
    return table
