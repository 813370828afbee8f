"""Codebook formats: NormalFloat nf2..nf8 and bitsandbytes' fp4, scaled by block absmax.

Encoding follows bitsandbytes ``quantize_4bit`` (docs/formats.md#normalfloat-and-bitsandbytes-fp4):
absmax per block as fp32,
nearest code of x / absmax against float32 midpoints, ties to the lower code.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

# the level tables, computed without torch (formats.levels); re-exported for their readers here
from .levels import BNB_FP4_VALUES, NF_DELTA, normal_float_values  # noqa: F401
from .registry import GridCodec
from .rounding import midpoints, nearest_ties_lower
from .spec import CODES, PACKED, SCALE, Anatomy, Field, FormatSpec

if TYPE_CHECKING:
    import torch


@cache
def codebook_table(spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values in code order, midpoints of the sorted values, code of each sorted slot
    or None when codes are already sorted, as NFk's are)."""
    import torch

    values = torch.tensor(spec.values, dtype=torch.float32)
    order = torch.argsort(values, stable=True)  # bnb_fp4 holds +0 and -0: +0 sorts first
    is_sorted = bool((order == torch.arange(order.numel())).all())
    return values, midpoints(values[order]), None if is_sorted else order.to(torch.uint8)


class AbsmaxCodebook(GridCodec, family="codebook"):
    ANATOMY = Anatomy(
        "an fp32 absmax per block", "w = level[q] * absmax",
        (Field("codes", CODES, "index q of the level nearest w / absmax (ties to the lower), " + PACKED,
               per="element"),
         Field("scales", SCALE, "fp32 absmax = max|w|")))

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
        return {"scales": absmax if ratio is None else absmax * ratio.to(absmax.dtype)}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        return encode_levels(blocks, scales["scales"], *codebook_table(spec)[1:], partial=partial)

    @classmethod
    def decode(cls, spec, codes, scales):
        import torch

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
    import torch

    safe = scales.clamp(min=1e-38)[:, None]
    scaled = (blocks / safe if partial else blocks * (1.0 / safe)).clamp_(-1, 1)
    idx = nearest_ties_lower(scaled, mids)
    return idx.to(torch.uint8) if order is None else order[idx]
