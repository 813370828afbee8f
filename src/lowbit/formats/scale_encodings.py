"""Block-scale encodings stored in one byte: E8M0 (OCP MX) and E4M3 (NVFP4).

E8M0 (OCP MX v1.0 §5.4.1): an unsigned power of two ``2^(code - 127)``, codes 0..254
(2^-127 .. 2^127), 0xFF is NaN, no zero and no sign. ml_dtypes calls it ``float8_e8m0fnu``.
E4M3 here is OCP OFP8 E4M3 (``float8_e4m3fn``) used for positive scales only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exmy import E4M3FN

if TYPE_CHECKING:
    import torch

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2 |x|)`` as int32 for finite nonzero float32 (subnormals included).

    torch.frexp gives x = m * 2^e with 0.5 <= |m| < 1, so floor(log2 |x|) = e - 1. Unlike
    a float32 ``floor(log2f(x))`` it never rounds up just below a power of two.
    """
    import torch

    _, e = torch.frexp(x.to(torch.float32))
    return e.to(torch.int32) - 1


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """int exponents -> uint8 E8M0 codes, clamped into the representable -127..127."""
    import torch

    return (exponent.to(torch.int32).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(code: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 ``2^(code - 127)`` exactly (code 0 is the subnormal 2^-127)."""
    import torch

    c = code.to(torch.int32)
    bits = torch.where(c == 0, torch.tensor(0x00400000, dtype=torch.int32), c << 23)  # 2^-127: mantissa bit 22
    bits = torch.where(c == E8M0_NAN, torch.tensor(0x7FC00000, dtype=torch.int32), bits)
    return bits.view(torch.float32)


def e8m0_reciprocal(code: torch.Tensor) -> torch.Tensor:
    """float32 ``2^(127 - code)`` = 1 / e8m0_decode(code), exact for codes 0..254."""
    import torch

    return e8m0_decode((254 - code.to(torch.int32)).to(torch.uint8))


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 -> uint8 E4M3 bits, round half to even, saturating at 448 (never NaN).

    For finite inputs within +-448 this equals ``x.to(torch.float8_e4m3fn).view(torch.uint8)``.
    """
    import torch

    return E4M3FN.encode(x.to(torch.float32))


def e4m3_decode(code: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 bits -> float32 (0x7F / 0xFF are NaN)."""
    return E4M3FN.decode(code)
