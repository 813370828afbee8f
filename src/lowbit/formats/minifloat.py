"""Minifloat formats ExMy: fp4_e2m1, fp4_e3m0, fp4_e1m2, fp4_e0m3, fp8_e4m3fn, fp8_e5m2.

Rules: docs/formats.md#minifloats-exmy. The formats and their params: ``formats.catalog``.

Per block (default 64): ``scale = absmax / max_finite`` (fp32, part ``scales``), codes are
``x / scale`` rounded to the nearest representable value, ties to even (ml_dtypes' rule),
saturating at +-max_finite: the quantizer never produces Inf or NaN, while ml_dtypes'
casts do not saturate (E4M3FN: 465 -> NaN). Zero gets the +0 code 0. Decode is
``values[code] * scale``; an all-zero block has scale 0 and decodes to exact zeros.
Codes are in the format's own bit order (``sign << (E+M) | exp << M | mant``).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from .. import dispatch
from .exmy import ExMy
from .registry import GridCodec
from .spec import CODES, PACKED, SCALE, Anatomy, Field, FormatSpec

if TYPE_CHECKING:
    import torch


@cache
def exmy_of(spec: FormatSpec) -> ExMy:
    p = dict(spec.params)
    return ExMy(p["exp_bits"], p["man_bits"], p["specials"], p.get("subnormals", True))


class AbsmaxMinifloat(GridCodec, family="minifloat"):
    ANATOMY = Anatomy(
        "an fp32 scale s = max|w| / {vmax} per block", "w = level[q] * s",
        (Field("codes", CODES, "sign-exponent-mantissa code q of w / s, nearest, ties to even, saturating; "
               + PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = max|w| / {vmax}")))

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        absmax = blocks.abs().amax(dim=1)
        if ratio is not None:
            absmax = absmax * ratio.to(absmax.dtype)
        return {"scales": absmax / exmy_of(spec).max_finite}  # (n_blocks,) fp32

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        import torch

        s = scales["scales"]
        safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero block: 0 / 1 = 0
        return exmy_of(spec).encode(blocks / safe[:, None])

    @classmethod
    def decode(cls, spec, codes, scales):
        return decode_table(spec.family, codes, exmy_of(spec).value_tensor, scales["scales"])

    @classmethod
    def table_form(cls, spec, parts):
        return exmy_of(spec).value_tensor, parts["scales"], None

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block: the absmax element always saturates to max_finite."""
        return parts["scales"].abs().mul_(exmy_of(spec).max_finite)


def decode_table(family: str, codes: torch.Tensor, table: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``table[codes] * factor[:, None]`` for (n_blocks, block) codes, by a kernel where one is registered."""
    import torch

    fast = dispatch.lookup("lut_scale", family)
    if fast is not None:
        return fast(codes, table, factor)
    return table[codes.to(torch.int64)] * factor[:, None]
