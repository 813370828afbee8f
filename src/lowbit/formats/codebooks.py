"""Codebook formats: NormalFloat nf2..nf8 and bitsandbytes' fp4, scaled by block absmax.

Encoding follows bitsandbytes ``quantize_4bit`` (docs/formats.md#normalfloat-and-bitsandbytes-fp4):
absmax per block as fp32,
nearest code of x / absmax against float32 midpoints, ties to the lower code.
"""

from __future__ import annotations

from functools import cache

import torch
from scipy.special import ndtri  # = scipy.stats.norm.ppf, without importing scipy.stats (0.8 s)

from .registry import GridCodec, define
from .rounding import midpoints, nearest_ties_lower
from .spec import FormatSpec

# QLoRA / bitsandbytes create_normal_map offset: the quantile that maps to the largest
# code, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.9677083 (arXiv 2305.14314;
# docs/formats.md#normalfloat-and-bitsandbytes-fp4).
NF_DELTA = 0.9677083


def normal_float_values(bits: int) -> tuple[float, ...]:
    """NFk values, sorted, as float32: reproduces bitsandbytes' NF4 table bit for bit."""
    half = 2 ** (bits - 1)
    pos = ndtri(torch.linspace(NF_DELTA, 0.5, half + 1, dtype=torch.float32)[:-1].numpy())
    neg = -ndtri(torch.linspace(NF_DELTA, 0.5, half, dtype=torch.float32)[:-1].numpy())
    v = torch.tensor([*pos.tolist(), 0.0, *neg.tolist()], dtype=torch.float32).sort().values
    return tuple((v / v.max()).tolist())


# bitsandbytes get_4bit_type("fp4"): codes 0..7 are magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12,
# bit 3 is the sign (docs/formats.md#normalfloat-and-bitsandbytes-fp4).
# Not OCP E2M1: no subnormal 0.5, max 1 after the /12.
# Code 8 is +0.0 in bnb's table (its CPU C kernel decodes it as -0.0, its torch path as +0.0).
_BNB_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
BNB_FP4_VALUES = tuple(
    torch.tensor([m / 12 for m in _BNB_FP4_MAGNITUDES] + [0.0 - m / 12 for m in _BNB_FP4_MAGNITUDES])
    .float()
    .tolist()
)


@cache
def codebook_table(spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values in code order, midpoints of the sorted values, code of each sorted slot
    or None when codes are already sorted, as NFk's are)."""
    values = torch.tensor(spec.values, dtype=torch.float32)
    order = torch.argsort(values, stable=True)  # bnb_fp4 holds +0 and -0: +0 sorts first
    is_sorted = bool((order == torch.arange(order.numel())).all())
    return values, midpoints(values[order]), None if is_sorted else order.to(torch.uint8)


class AbsmaxCodebook(GridCodec, family="codebook"):
    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
        return {"scales": absmax if ratio is None else absmax * ratio.to(absmax.dtype)}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        return encode_levels(blocks, scales["scales"], *codebook_table(spec)[1:], partial=partial)

    @classmethod
    def decode(cls, spec, codes, scales):
        values, _, _ = codebook_table(spec)
        return values[codes.to(torch.int64)] * scales["scales"][:, None]

    @classmethod
    def table_form(cls, spec, parts):
        return codebook_table(spec)[0], parts["scales"], None

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block: the absmax element always takes a +-1 code
        (a searched scale: a bound)."""
        return parts["scales"].abs().mul_(max(abs(v) for v in spec.values))


def encode_levels(blocks, scales, mids, order, *, partial):
    """Nearest level of ``blocks / scales`` (clamped to [-1, 1]), ties to the lower level.

    bitsandbytes' reference multiplies full blocks by the reciprocal and divides the
    trailing partial one (backends/default/ops.py quantize_4bit); match it to the bit.
    """
    safe = scales.clamp(min=1e-38)[:, None]
    scaled = (blocks / safe if partial else blocks * (1.0 / safe)).clamp_(-1, 1)
    idx = nearest_ties_lower(scaled, mids)
    return idx.to(torch.uint8) if order is None else order[idx]


for _b in range(2, 9):
    define(f"nf{_b}", values=normal_float_values(_b), double_quant=True,
           description=f"NormalFloat{_b} (QLoRA), fp32 absmax per block")
define("bnb_fp4", values=BNB_FP4_VALUES, double_quant=True,
       description="bitsandbytes fp4 (not OCP E2M1), fp32 absmax per block")
