"""Plain casts: fp16 and bf16, 16 bits per weight, no scales (docs/formats.md#reference-floats).

What ``model.half()`` or ``model.to(torch.bfloat16)`` does to a weight, as a format, so that
``lowbit compare --formats fp16,bf16`` shows what a half-precision cast alone costs beside the
low-bit formats. Each weight is its own block of one (there is nothing per block to store); the
part ``values`` holds it in the target dtype, rounded by torch's cast (nearest, ties to even;
past the range it is Inf, which ``lowbit.representable`` reports as an overflow).
"""

from __future__ import annotations

from .registry import Codec
from .spec import CODES, Anatomy, Field


class Cast(Codec, family="cast"):
    KIND = "a plain cast: every weight is stored alone, with no scale"

    ANATOMY = Anatomy(
        "none: every weight is stored alone", "w = the stored {dtype} value",
        (Field("values", CODES, "the weight cast to {dtype}: nearest, ties to even (Inf past its range)",
               per="element"),),
        fixed_by="a plain cast has nothing per block",
        no_double_quant="there are no scales to compress")

    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        import torch

        return {"values": blocks.to(getattr(torch, spec.param("dtype")))}  # (n, 1)

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        import torch

        return parts["values"].view(n_blocks, block).to(torch.float32)

    @classmethod
    def peak(cls, spec, parts):
        import torch

        return parts["values"].reshape(-1).abs().to(torch.float32)
