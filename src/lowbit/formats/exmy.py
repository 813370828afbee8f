"""Generic minifloat ExMy: value tables in code order and saturating round-half-to-even.

A code is ``sign << (E+M) | exp << M | mant`` (docs/formats.md#minifloats-exmy). ``bias = 2^(E-1) - 1``
(for E = 0, which has no exponent field, the bias is 0, so E0M3 is ``0.mmm * 2``);
exponent field 0 is subnormal ``0.m * 2^(1-bias)``, otherwise ``1.m * 2^(e-bias)``.

Special values (``specials``), as in ml_dtypes' naming:

* ``"none"``: every code is finite (OCP MX FP4/FP6 elements, E3M0, E1M2, E0M3);
* ``"fn"``: no Inf, only ``S.1..1.1..1`` is NaN (OCP OFP8 E4M3, ``float8_e4m3fn``);
* ``"ieee"``: exponent all ones is Inf (mantissa 0) or NaN (OCP OFP8 E5M2, ``float8_e5m2``).

``subnormals=False`` makes exponent field 0 encode zero only (whatever the mantissa).

The quantizer here always saturates to the largest finite value and never produces
Inf or NaN; ml_dtypes' casts do not saturate (E4M3FN: 464 -> 448, 465 -> NaN, docs/formats.md#minifloats-exmy).
Ties round to the even code (low bit 0): IEEE round-half-to-even, ml_dtypes' rule.
Zero, and anything that rounds to zero, gets the +0 code 0, whatever its sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from .. import dispatch
from ..errors import InputError

if TYPE_CHECKING:
    import torch

SPECIALS = ("none", "fn", "ieee")


@dataclass(frozen=True)
class ExMy:
    exp_bits: int
    man_bits: int
    specials: str = "none"
    subnormals: bool = True

    def __post_init__(self):
        if self.specials not in SPECIALS:
            raise InputError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.exp_bits < 0 or self.man_bits < 0 or self.exp_bits + self.man_bits == 0:
            raise InputError(f"bad ExMy: E{self.exp_bits}M{self.man_bits}")
        if self.specials != "none" and self.exp_bits == 0:
            raise InputError("a format without exponent bits has no Inf/NaN codes")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.exp_bits else 0

    def magnitude(self, code: int) -> float:
        """|value| of the positive code ``code`` (< 2^(E+M)); NaN and Inf where the format has them."""
        e, m = code >> self.man_bits, code & ((1 << self.man_bits) - 1)
        e_all, m_all = (1 << self.exp_bits) - 1, (1 << self.man_bits) - 1
        if self.specials == "fn" and e == e_all and m == m_all:
            return math.nan
        if self.specials == "ieee" and e == e_all:
            return math.inf if m == 0 else math.nan
        frac = m / (1 << self.man_bits)
        if e == 0:
            return math.ldexp(frac, 1 - self.bias) if self.subnormals else 0.0
        return math.ldexp(1.0 + frac, e - self.bias)

    @cached_property
    def values(self) -> tuple[float, ...]:
        """Every code's value in code order (2^bits entries); NaN codes are float('nan')."""
        half = [self.magnitude(c) for c in range(1 << (self.exp_bits + self.man_bits))]
        return tuple(half) + tuple(-v for v in half)

    @cached_property
    def n_finite(self) -> int:
        """Positive codes 0 .. n_finite-1 are finite (specials sit at the top of the code range)."""
        half = self.values[: 1 << (self.exp_bits + self.man_bits)]
        return next((c for c, v in enumerate(half) if not math.isfinite(v)), len(half))

    @property
    def max_finite(self) -> float:
        return self.values[self.n_finite - 1]

    @cached_property
    def magnitude_table(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """(sorted distinct finite magnitudes, the code of each): what ``encode`` rounds to."""
        codes, mags = [], []
        for c in range(self.n_finite):  # magnitudes never decrease with the code
            if not mags or self.values[c] != mags[-1]:
                codes.append(c)
                mags.append(self.values[c])
        return tuple(mags), tuple(codes)

    # The tensor methods below import torch where they run: the value facts above are read by
    # `lowbit formats` and `lowbit bits`, which must start without it (formats.catalog).
    @cached_property
    def _table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted distinct finite magnitudes, their midpoints, the code of each) as tensors."""
        import torch

        from .rounding import midpoints

        mags, codes = self.magnitude_table
        t = torch.tensor(mags, dtype=torch.float32)
        return t, midpoints(t), torch.tensor(codes, dtype=torch.int32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float32 values -> uint8 codes: nearest, ties to even, saturating, +0 for zero."""
        import torch

        from .rounding import nearest_ties_even, nearest_ties_lower

        fast = dispatch.lookup("round", "exmy")
        if fast is not None:
            return fast(self, x)
        mags, mids, codes = self._table
        a = x.abs()
        if codes.numel() == self.n_finite:  # table index == code: index parity is code parity
            idx = nearest_ties_even(a, mags, mids)
        else:  # subnormals off: fix ties by the parity of the code itself
            idx = nearest_ties_lower(a, mids)
            on_mid = idx < mids.numel()
            tie = on_mid & (a == mids[idx.clamp(max=mids.numel() - 1)]) & (codes[idx] % 2 == 1)
            idx = torch.where(tie, idx + 1, idx)
        code = codes[idx]
        negative = (x < 0) & (code > 0)
        return (code | (negative.to(torch.int32) << (self.exp_bits + self.man_bits))).to(torch.uint8)

    @cached_property
    def round_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same rule as ``encode``, as flat tables for a table-rounding kernel:
        (midpoints, code of each sorted slot, 1 where a tie leaves the slot's odd code)."""
        import torch

        _, mids, codes = self._table
        tie_up = (codes % 2 == 1).to(torch.uint8)  # on a midpoint, leave an odd code: ties to even
        return mids.contiguous(), codes.to(torch.uint8), tie_up

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes -> float32 values (table look-up)."""
        import torch

        return self.value_tensor[codes.to(torch.int64)]

    @cached_property
    def value_tensor(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.values, dtype=torch.float32)


# The formats lowbit uses, by name (OCP OFP8 v1.0, OCP MX v1.0 §5.3, docs/formats.md#minifloats-exmy).
E2M1 = ExMy(2, 1)  # OCP MXFP4 element, ml_dtypes float4_e2m1fn: max 6
E3M0 = ExMy(3, 0)  # max 16
E1M2 = ExMy(1, 2)  # uniform 0 .. 3.5
E0M3 = ExMy(0, 3)  # uniform 0 .. 1.75
E2M3 = ExMy(2, 3)  # OCP MXFP6, ml_dtypes float6_e2m3fn: max 7.5
E3M2 = ExMy(3, 2)  # OCP MXFP6, ml_dtypes float6_e3m2fn: max 28
E4M3FN = ExMy(4, 3, "fn")  # OCP OFP8 E4M3, max 448
E5M2 = ExMy(5, 2, "ieee")  # OCP OFP8 E5M2, max 57344
