"""Integer formats: symmetric absmax (int2..int8) and zero-point (int2_asym..int8_asym). SPEC.md §1."""

from __future__ import annotations

import torch

from .. import kernels
from ..scaling.packing import pack_codes, unpack_codes
from .registry import Codec, register
from .spec import FormatSpec

_TINY = torch.finfo(torch.float32).tiny  # divisor for all-zero blocks: 0 / tiny = 0, no NaN


class SymmetricInt(Codec, family="int"):
    """s = max|x| / Qp, q = clamp(round(x / s), -Qp, Qp), Qp = 2^(b-1) - 1 (narrow range).

    torch.round rounds half to even. Codes store q + Qp, so code 0 is -Qp.
    """

    @classmethod
    def encode(cls, spec, blocks, *, partial, tensor_parts):
        qp = 2 ** (spec.bits - 1) - 1
        scales = blocks.abs().amax(dim=1) / qp  # (n_blocks,)
        q = torch.round(blocks / scales.clamp(min=_TINY)[:, None]).clamp_(-qp, qp)
        return {"codes": (q + qp).to(torch.uint8), "scales": scales}

    @classmethod
    def decode(cls, spec, parts, n_blocks, block):
        qp = 2 ** (spec.bits - 1) - 1
        q = parts["codes"].view(n_blocks, block).to(torch.float32) - qp
        return q * parts["scales"][:, None]

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block: the absmax element always takes code +-Qp."""
        return parts["scales"].abs().mul_(2 ** (spec.bits - 1) - 1)

    @classmethod
    def fast_encode(cls, spec, flat, block):
        n, qp = flat.numel(), 2 ** (spec.bits - 1) - 1
        flat = flat.contiguous()
        codes = kernels.empty(n, torch.uint8)
        scales = torch.empty((n + block - 1) // block, dtype=torch.float32)
        kernels.native.lowbit_int_sym_quantize(flat.data_ptr(), n, block, qp, codes.data_ptr(), scales.data_ptr())
        return {"codes": pack_codes(codes, spec.bits, pad_code=qp), "scales": scales}  # qp: the code of 0

    @classmethod
    def fast_decode(cls, spec, parts, n, block):
        codes = unpack_codes(parts["codes"], spec.bits, n).contiguous()
        scales = parts["scales"].contiguous()
        out = kernels.empty(n, torch.float32)
        kernels.native.lowbit_int_sym_dequantize(
            codes.data_ptr(), scales.data_ptr(), n, block, 2 ** (spec.bits - 1) - 1, out.data_ptr()
        )
        return out


class AsymmetricInt(Codec, family="int_asym"):
    """s = (max - min) / (2^b - 1), z = round(-min / s), q = clamp(round(x / s) + z, 0, 2^b - 1).

    The range is widened to include 0 (min <= 0 <= max), as PyTorch's affine observers do:
    zero stays exact and z always fits the code range, even for an all-positive block,
    where a naive zero point would fall outside it.
    """

    @classmethod
    def encode(cls, spec, blocks, *, partial, tensor_parts):
        qmax = 2**spec.bits - 1
        lo = blocks.amin(dim=1).clamp(max=0)
        hi = blocks.amax(dim=1).clamp(min=0)
        scales = (hi - lo) / qmax
        safe = scales.clamp(min=_TINY)
        zeros = torch.round(-lo / safe).clamp_(0, qmax)
        q = (torch.round(blocks / safe[:, None]) + zeros[:, None]).clamp_(0, qmax)
        return {"codes": q.to(torch.uint8), "scales": scales, "zeros": zeros.to(torch.uint8)}

    @classmethod
    def decode(cls, spec, parts, n_blocks, block):
        q = parts["codes"].view(n_blocks, block).to(torch.float32)
        z = parts["zeros"].to(torch.float32)[:, None]
        return (q - z) * parts["scales"][:, None]

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block, at code 0 or 2^b - 1 (decode's (q - z) * s).

        The block's min and max take those codes except in an exact double tie, where the
        max may take 2^b - 2: then this bounds the block's peak from above.
        """
        z, s = parts["zeros"].to(torch.float32), parts["scales"]
        return torch.maximum((((2**spec.bits - 1) - z) * s).abs(), ((0 - z) * s).abs())


for _b in range(2, 9):
    _qp = 2 ** (_b - 1) - 1
    register(
        FormatSpec(
            name=f"int{_b}", id=_b - 1, family="int", bits=_b, default_block_size=64,
            values=tuple(float(v) for v in range(-_qp, _qp + 1)), double_quant=True,
            description=f"symmetric absmax int{_b}, narrow range [-{_qp}, {_qp}], fp32 scale per block",
        )
    )
    register(
        FormatSpec(
            name=f"int{_b}_asym", id=10 + _b - 1, family="int_asym", bits=_b, default_block_size=64,
            values=tuple(float(v) for v in range(2**_b)),
            description=f"zero-point uint{_b}, fp32 scale + uint8 zero point per block",
        )
    )
