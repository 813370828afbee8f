"""Level tables computed without torch: NormalFloat, bitsandbytes fp4, the MXINT8 element.

`lowbit formats` and `lowbit bits` show these levels, and importing torch alone takes 1.3 s, so
they are computed here in float32 arithmetic emulated in Python (``f32``: one rounding of a
double to the nearest float32, ties to even, as a C cast does). The codecs read the same tables
(``formats.catalog`` registers them); tests/formats/test_levels.py checks every table bit for
bit against the torch computation it replaced.
"""

from __future__ import annotations

import struct
from statistics import NormalDist


def f32(x: float) -> float:
    """``x`` rounded to float32 (nearest, ties to even), as a float; overflow raises OverflowError."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# QLoRA / bitsandbytes create_normal_map offset: the quantile that maps to the largest
# code, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.9677083 (arXiv 2305.14314;
# docs/formats.md#normalfloat-and-bitsandbytes-fp4).
NF_DELTA = 0.9677083


def linspace32(start: float, end: float, steps: int) -> list[float]:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, to the bit.

    torch (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp) takes a float32 step
    ``(end - start) / (steps - 1)`` and computes the first half as ``start + step * i`` and the
    rest as ``end - step * (steps - 1 - i)``, each with one rounding (its vectorized build fuses
    the multiply-add). In double both are exact here (float32 operands, i < 2^24 at most 53
    bits), so rounding the double once to float32 is that one rounding."""
    start, end = f32(start), f32(end)
    step = f32(f32(end - start) / (steps - 1))
    half = steps // 2
    return [f32(start + step * i) if i < half else f32(end - step * (steps - 1 - i)) for i in range(steps)]


def normal_float_values(bits: int) -> tuple[float, ...]:
    """NFk levels, sorted, as float32: bitsandbytes' create_normal_map (NF4 bit for bit), k = 2..8.

    The quantiles of float32 probabilities, each rounded to float32 (scipy's ndtri in double, as
    bitsandbytes calls it; ``statistics.NormalDist`` gives the same float32 for every level), then
    divided by the largest in float32."""
    ppf = NormalDist().inv_cdf
    half = 2 ** (bits - 1)
    pos = [f32(ppf(p)) for p in linspace32(NF_DELTA, 0.5, half + 1)[:-1]]
    neg = [f32(-ppf(p)) for p in linspace32(NF_DELTA, 0.5, half)[:-1]]
    v = sorted([*pos, 0.0, *neg])
    return tuple(f32(x / v[-1]) for x in v)


# bitsandbytes get_4bit_type("fp4"): codes 0..7 are magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12,
# bit 3 is the sign (docs/formats.md#normalfloat-and-bitsandbytes-fp4).
# Not OCP E2M1: no subnormal 0.5, max 1 after the /12.
# Code 8 is +0.0 in bnb's table (its CPU C kernel decodes it as -0.0, its torch path as +0.0).
_BNB_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
BNB_FP4_VALUES = tuple(f32(m / 12) for m in _BNB_FP4_MAGNITUDES) + tuple(f32(0.0 - m / 12) for m in _BNB_FP4_MAGNITUDES)

# MXINT8 element (OCP MX v1.0 §5.3.2): 8-bit two's complement k, value k / 2^6, in code order
MXINT8_FRAC_BITS = 6
MXINT8_VALUES = tuple((k if k < 128 else k - 256) / 2**MXINT8_FRAC_BITS for k in range(256))
