"""Integer formats: symmetric absmax (int2..int8) and zero-point (int2_asym..int8_asym).

Rules: docs/formats.md#symmetric-integers and #zero-point-integers. The formats: ``formats.catalog``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import GridCodec
from .spec import CODES, PACKED, SCALE, Anatomy, Field

if TYPE_CHECKING:
    import torch

_TINY = 2.0**-126  # divisor for all-zero blocks (0 / tiny = 0, no NaN): torch.finfo(torch.float32).tiny


def _ratio(ratio, like: torch.Tensor) -> torch.Tensor | float:
    return 1.0 if ratio is None else ratio.to(like.dtype)


class SymmetricInt(GridCodec, family="int"):
    """s = max|x| / Qp, q = clamp(round(x / s), -Qp, Qp), Qp = 2^(b-1) - 1 (narrow range).

    torch.round rounds half to even. Codes store q + Qp, so code 0 is -Qp.
    """

    ANATOMY = Anatomy(
        "an fp32 scale s = max|w| / {qp} per block", "w = (q - {qp}) * s",
        (Field("codes", CODES, "q = round(w / s) + {qp}, " + PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = max|w| / {qp} (narrow range: code 0 is -{qp})")))

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        absmax = blocks.abs().amax(dim=1)
        if ratio is not None:
            absmax = absmax * _ratio(ratio, absmax)
        return {"scales": absmax / (2 ** (spec.bits - 1) - 1)}  # (n_blocks,)

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        import torch

        qp = 2 ** (spec.bits - 1) - 1
        q = torch.round(blocks / scales["scales"].clamp(min=_TINY)[:, None]).clamp_(-qp, qp)
        return (q + qp).to(torch.uint8)

    @classmethod
    def decode(cls, spec, codes, scales):
        import torch

        q = codes.to(torch.float32) - (2 ** (spec.bits - 1) - 1)
        return q * scales["scales"][:, None]

    @classmethod
    def table_form(cls, spec, parts):
        import torch

        return torch.arange(2**spec.bits, dtype=torch.float32) - (2 ** (spec.bits - 1) - 1), parts["scales"], None

    @classmethod
    def levels(cls, spec, scales):
        import torch

        qp = 2 ** (spec.bits - 1) - 1
        return torch.arange(-qp, qp + 1, dtype=torch.float32), -qp, qp

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block: the absmax element always takes code +-Qp
        (a searched scale: a bound, the element the scale was fitted to may take less)."""
        return parts["scales"].abs().mul_(2 ** (spec.bits - 1) - 1)


class AsymmetricInt(GridCodec, family="int_asym"):
    """s = (max - min) / (2^b - 1), z = round(-min / s), q = clamp(round(x / s) + z, 0, 2^b - 1).

    The range is widened to include 0 (min <= 0 <= max), as PyTorch's affine observers do:
    zero stays exact and z always fits the code range, even for an all-positive block,
    where a naive zero point would fall outside it. A float16 ``zeros`` part (chosen by the
    ``@hqq`` searches) is a float zero, q = clamp(round(x / s + z), 0, 2^b - 1), as hqq stores it.
    """

    SCALE_PARTS = ("scales", "zeros")
    LINEAR_SCALE = False  # decode is (q - z) * s: the zero point moves with the scale

    ANATOMY = Anatomy(
        "an fp32 scale s and a uint8 zero point z per block", "w = (q - z) * s",
        (Field("codes", CODES, "q = round(w / s) + z, clamped to 0..{qmax}, " + PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = (max - min) / {qmax}, the range widened to include 0"),
         Field("zeros", SCALE, "uint8 zero point z = round(-min / s): the code of 0 (with @hqq: a float16 z, "
                               "q = round(w / s + z), as hqq stores it)", dtype="uint8")),
        no_double_quant="double quantization (bitsandbytes) compresses the absmax of symmetric formats, not a "
                        "scale paired with a zero point")

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        import torch

        qmax = 2**spec.bits - 1
        lo = blocks.amin(dim=1).clamp(max=0)
        hi = blocks.amax(dim=1).clamp(min=0)
        if ratio is not None:
            lo, hi = lo * _ratio(ratio, lo), hi * _ratio(ratio, hi)
        scales = (hi - lo) / qmax
        zeros = torch.round(-lo / scales.clamp(min=_TINY)).clamp_(0, qmax)
        return {"scales": scales, "zeros": zeros.to(torch.uint8)}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        import torch

        qmax = 2**spec.bits - 1
        safe = scales["scales"].clamp(min=_TINY)
        z = scales["zeros"]
        if z.is_floating_point():  # a float zero (@hqq) is added before rounding, as hqq's round(w * scale + zero)
            q = torch.round(blocks / safe[:, None] + z.to(torch.float32)[:, None])
        else:
            q = torch.round(blocks / safe[:, None]) + z.to(torch.float32)[:, None]
        return q.clamp_(0, qmax).to(torch.uint8)

    @classmethod
    def decode(cls, spec, codes, scales):
        import torch

        z = scales["zeros"].to(torch.float32)[:, None]
        return (codes.to(torch.float32) - z) * scales["scales"][:, None]

    @classmethod
    def table_form(cls, spec, parts):
        import torch

        return torch.arange(2**spec.bits, dtype=torch.float32), parts["scales"], parts["zeros"].to(torch.float32)

    @classmethod
    def surrogate(cls, spec, blocks, codes, scales):
        """LSQ+ (Bhalgat et al. 2020, arXiv 2004.09576): y = x / s + z on the code range
        [0, 2^b - 1]; a float ``zeros`` part gets the gradient -s outside it, 0 inside."""
        import torch

        s = scales["scales"][:, None]
        z = scales["zeros"][:, None]
        z = z if z.is_floating_point() else z.to(torch.float32)
        y = blocks / s + z
        yc = y.clamp(0, 2**spec.bits - 1)
        return (codes.to(torch.float32) + (yc - yc.detach()) - z) * s

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block, at code 0 or 2^b - 1 (decode's (q - z) * s).

        The block's min and max take those codes except in an exact double tie, where the
        max may take 2^b - 2: then this bounds the block's peak from above.
        """
        import torch

        z, s = parts["zeros"].to(torch.float32), parts["scales"]
        return torch.maximum((((2**spec.bits - 1) - z) * s).abs(), ((0 - z) * s).abs())
